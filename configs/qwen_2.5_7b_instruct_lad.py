"""Qwen 2.5 7B Instruct + L2D, full separate flow projections (copies of the base weights).

The original's cfgs/model/qwen_2.5_7b_instruct_lad.cfg on top of cfgs/training.cfg: base
model Qwen/Qwen2.5-7B-Instruct, the tokenizer's chat template, micro batch 1 per device, 32
samples per optimizer step, bf16 (the original: DeepSpeed ZeRO stage 2).
"""

from l2d_jax.config import sibling_config

base = sibling_config(__file__, "base")


def get_config(arg=None):
    del arg
    config = base.released_l2d(base.get_config(), lora=False)
    config.pretrained_model_dir = "Qwen/Qwen2.5-7B-Instruct"
    config.tokenizer_dir = "Qwen/Qwen2.5-7B-Instruct"
    config.specified_template_type = None
    config.micro_batch_size = 1
    config.n_samples_before_backprop = 32
    config.wandb_run_name = "qwen2.5_7bi/lad"
    return config
