"""Llama 3.1 8B Instruct + L2D, LoRA (rank 32, alpha 32) on the flow projections.

The original's cfgs/model/llama_3.1_8b_instruct_lad_lora.cfg on top of cfgs/training.cfg:
base model meta-llama/Llama-3.1-8B, specified_template_type "base_llama", micro batch 1 per
device, 32 samples per optimizer step, bf16 (the original: DeepSpeed ZeRO stage 2).
"""

from l2d_jax.config import sibling_config

base = sibling_config(__file__, "base")


def get_config(arg=None):
    del arg
    config = base.released_l2d(base.get_config(), lora=True)

    # As released: this file trains the BASE Llama-3.1-8B (not Instruct) with the Instruct
    # tokenizer and the "### Question / ### Answer" (base_llama) template for evaluation
    # prompts. Its training data, like the original's, uses the tokenizer's own (Llama 3.1
    # chat) template: train_data_template = "original" (see l2d_jax.train.templates).
    config.pretrained_model_dir = "meta-llama/Llama-3.1-8B"
    config.tokenizer_dir = "meta-llama/Llama-3.1-8B-Instruct"
    config.specified_template_type = "base_llama"
    config.micro_batch_size = 1
    config.n_samples_before_backprop = 32
    config.wandb_run_name = "llama_3.1_8bi/lad_lora"
    return config
