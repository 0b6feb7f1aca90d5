"""Llama 3.1 8B Instruct + L2D, full separate flow projections (copies of the base weights).

The original's cfgs/model/llama_3.1_8b_instruct_lad.cfg on top of cfgs/training.cfg: base
model meta-llama/Llama-3.1-8B-Instruct, specified_template_type "fixed_date_llama3", micro
batch 1 per device, 32 samples per optimizer step, bf16 (the original: DeepSpeed ZeRO stage
1).
"""

from l2d_jax.config import sibling_config

base = sibling_config(__file__, "base")


def get_config(arg=None):
    del arg
    config = base.released_l2d(base.get_config(), lora=False)
    config.pretrained_model_dir = "meta-llama/Llama-3.1-8B-Instruct"
    config.tokenizer_dir = "meta-llama/Llama-3.1-8B-Instruct"
    config.specified_template_type = "fixed_date_llama3"
    config.micro_batch_size = 1
    config.n_samples_before_backprop = 32
    config.wandb_run_name = "llama_3.1_8bi/lad"
    return config
