"""Llama 3.2 1B Instruct + L2D, LoRA (rank 32, alpha 32) on the flow projections.

The original's cfgs/model/llama_3.2_1b_instruct_lad_lora.cfg on top of cfgs/training.cfg:
base model meta-llama/Llama-3.2-1B-Instruct, specified_template_type "fixed_date_llama3",
micro batch 4 per device, 32 samples per optimizer step, bf16 (the original: DeepSpeed ZeRO
stage 1).
"""

from l2d_jax.config import sibling_config

base = sibling_config(__file__, "base")


def get_config(arg=None):
    del arg
    config = base.released_l2d(base.get_config(), lora=True)
    config.pretrained_model_dir = "meta-llama/Llama-3.2-1B-Instruct"
    config.tokenizer_dir = "meta-llama/Llama-3.2-1B-Instruct"
    config.specified_template_type = "fixed_date_llama3"
    config.micro_batch_size = 4
    config.n_samples_before_backprop = 32
    config.wandb_run_name = "llama_3.1_1bi/lad_lora"  # sic: the original's run name says 3.1
    return config
