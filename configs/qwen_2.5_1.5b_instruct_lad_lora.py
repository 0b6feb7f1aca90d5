"""Qwen 2.5 1.5B Instruct + L2D, LoRA (rank 32, alpha 32) on the flow projections.

The original's cfgs/model/qwen_2.5_1.5b_instruct_lad_lora.cfg on top of cfgs/training.cfg:
base model Qwen/Qwen2.5-1.5B-Instruct, the tokenizer's chat template, micro batch 2 per
device, 32 samples per optimizer step, bf16 (the original: DeepSpeed ZeRO stage 1).
"""

from l2d_jax.config import sibling_config

base = sibling_config(__file__, "base")


def get_config(arg=None):
    del arg
    config = base.released_l2d(base.get_config(), lora=True)
    config.pretrained_model_dir = "Qwen/Qwen2.5-1.5B-Instruct"
    config.tokenizer_dir = "Qwen/Qwen2.5-1.5B-Instruct"
    config.specified_template_type = None
    config.micro_batch_size = 2
    config.n_samples_before_backprop = 32
    config.wandb_run_name = "qwen2.5_1.5bi/lad_lora"
    return config
