"""A seconds-long run on CPU: random tiny Llama, character tokenizer, synthetic arithmetic chats.

``pretrained_model_dir = "random:tiny"`` builds a 2-layer Llama (vocab 96, hidden 32) with
random weights and a character-level tokenizer in code (``l2d_jax.config.build_base``), and
``synthetic:arithmetic:N`` generates N short math conversations (``l2d_jax.train.data``):
nothing is downloaded. L2D values: the released LoRA settings at toy sizes.
"""

from l2d_jax.config import RANDOM_TINY, sibling_config

base = sibling_config(__file__, "base")


def get_config(arg=None):
    del arg
    config = base.released_l2d(base.get_config(), lora=True)
    config.pretrained_model_dir = RANDOM_TINY
    config.tokenizer_dir = RANDOM_TINY
    config.specified_template_type = None
    config.dtype = "float32"
    config.param_dtype = "float32"

    config.data_source = "synthetic"
    config.train_filepaths = ("synthetic:arithmetic:64",)
    config.valid_filepaths = ("synthetic:arithmetic:8",)
    config.max_seq_len = 64
    config.seq_len_bucket_size = 32  # two padded lengths: 32, 64

    config.micro_batch_size = 1
    config.micro_valid_batch_size = 2
    config.n_samples_before_backprop = 8  # divisible by 1 x any data-parallel size up to 8
    config.n_training_steps = 4
    config.n_warmup_steps = 2
    config.peak_lr = 1e-3
    config.min_lr = 1e-5

    config.log_interval = 1
    config.validate_interval = 2
    config.save_model_interval = 2
    config.keep_checkpoints = 2
    config.compute_nstep_loss = 2  # exercise the validation ODE (2 grid points)
    config.save_dir = "./experiments/lad/"
    config.wandb_run_name = "tiny_test"

    # toy sizes (tests/jax_tiny.py LORA_SETTINGS)
    config.flow_representation_dim = 16
    config.flow_to_lm_hidden_size = 16
    config.timestep_modulation_hidden_size = 16
    config.flow_lora_rank = 4
    config.flow_lora_alpha = 4.0
    return config
