"""Shared defaults: the original's cfgs/training.cfg plus its training-CLI defaults.

Every key of ``l2d_jax.config.SCHEMA`` is set here explicitly. Where the original's training
CLI defaults differ from its model classes (L2D_SPEC section 10) the CLI's value is used,
since that is what an original run got for a key its .cfg files leave out. The released
model configs (``configs/<model>_lad[_lora].py``) start from this and call
``released_l2d`` for the [LAD] values they all share.

Not a runnable experiment on its own (no base model): load a model config instead.
"""

from l2d_jax.config import new_config

SMOLTALK_SUBSETS = ("self-oss-instruct", "metamathqa-50k", "numina-cot-100k", "openhermes-100k",
                    "smol-magpie-ultra")


def get_config(arg=None):
    del arg
    return new_config(dict(
        # ---- model (each model config sets these)
        pretrained_model_dir="",
        tokenizer_dir=None,            # None: the tokenizer of pretrained_model_dir
        specified_template_type=None,  # None | "fixed_date_llama3" | "base_llama"
        train_data_template="original",  # as the original's training (see l2d_jax.train.templates)
        dtype="bfloat16",              # the original trains with DeepSpeed bf16 = True
        param_dtype="bfloat16",
        remat=False,                   # the original: no activation checkpointing
        remat_policy=None,             # none / full / save_dots (None: from remat)
        shifted_labels=True,           # train_forward_step's labels are shifted

        # ---- data (training.cfg [DATA], [TRAINING])
        data_source="hf",
        train_filepaths=tuple(f"HuggingFaceTB/smoltalk,{s},train" for s in SMOLTALK_SUBSETS),
        valid_filepaths=tuple(f"HuggingFaceTB/smoltalk,{s},test" for s in SMOLTALK_SUBSETS),
        exclude_train_data_category=("advice-seeking", "brainstorming", "creative-writing", "editing",
                                     "planning", "role-playing"),
        max_seq_len=2048,
        truncate_or_drop="drop",       # the original drops the first too-long turn and the rest ("truncate", "error")
        seq_len_buckets=(),            # () -> 256, 512, ..., max_seq_len
        seq_len_bucket_size=256,
        use_data_split_guidance=False,
        guidance_categories=(),

        # ---- batch and optimizer (training CLI defaults; model configs set micro batches, lr)
        micro_batch_size=32,
        micro_valid_batch_size=32,
        n_samples_before_backprop=32,
        n_training_steps=-1,           # original: 1e8, capped by n_epochs
        n_epochs=1,
        peak_lr=1e-3,
        min_lr=1e-6,
        n_warmup_steps=100,
        scheduler_type="warmup_decay",
        cosine_min_ratio=0.1,
        weight_decay=0.01,
        adam_betas=(0.9, 0.95),
        adam_eps=1e-8,
        grad_clip=1.0,
        loss_normalization="micro_batch_mean",
        seed=42,

        # ---- validation diagnostics
        ode_solver="midpoint",
        ode_solver_atol=1e-5,
        ode_solver_rtol=1e-5,
        compute_nstep_loss=8,
        num_t_bins=0,
        compute_diff_at_training=False,

        # ---- logging / saving (training.cfg [LOGGING/SAVING])
        log_interval=100,
        validate_interval=2000,
        save_model_interval=2000,      # original: unset -> validate_interval
        save_dir="./experiments/lad/",
        save_model=True,
        save_log=True,
        keep_checkpoints=3,
        profile_steps=0,
        save_wandb=False,
        wandb_project="lad",
        wandb_run_name=None,
        wandb_group_name="training",

        # ---- devices (DeepSpeed ZeRO 1/2 shard optimizer state over data parallel ranks;
        # here: plain data parallelism unless fsdp > 1)
        mesh=dict(data=-1, fsdp=1, tensor=1),
        sharding_rules={},

        # ---- L2D (L2DSettings field names; training-CLI defaults)
        base_params_to_freeze="all",
        default_generation_nstep=None,
        noise_schedule="identity",
        minimum_training_noise=None,
        minimum_training_noise_units="time",
        velocity_schedule="constant",
        flow_representation_space="mapping",
        flow_representation_dim=256,
        flow_representation_num_layers=1,
        flow_representation_normalize=True,
        flow_representation_rescaling="mult",
        noise_rescaling=256.0,
        flow_to_lm_translation_depth=2,
        flow_to_lm_hidden_size=256,
        flow_to_lm_timestep_rescaling=1.0,
        flow_to_lm_rescale_in_float32=True,
        preserve_behavior_at_flow_start=True,
        modulate_hidden_states=False,
        full_dit_modulation=True,
        timestep_modulation_num_layers=2,
        timestep_modulation_freq_embedding_size=256,
        timestep_modulation_hidden_size=2048,
        guidance_modulation_num_classes=0,  # derived from use_data_split_guidance
        guidance_modulation_training_dropout=0.2,
        freeze_modulation_at_flow_start=True,
        separate_flow_params=True,
        separate_flow_params_with_lora=False,
        flow_lora_rank=32,
        flow_lora_alpha=None,          # None: 2 x rank
        nstep_final_timestep=1.0,
        nstep_x1_estimation="sample",
        nstep_normalize_x1_predictions=False,
        nstep_clamp_predictions=False,
        nstep_temperature_schedule=0.0,
        nstep_guidance_parameter=1.0,
        reinit_flow_params=False,
    ))


def released_l2d(config, *, lora: bool):
    """The [LAD] section every released model .cfg shares (L2D_SPEC section 9), and the
    [TRAINING] values they share. ``lora``: the ``_lad_lora`` files (LoRA rank 32, alpha 32)."""
    config.base_params_to_freeze = "all"
    config.noise_schedule = "identity"
    config.flow_representation_space = "mapping"
    config.flow_representation_dim = 256
    config.flow_representation_num_layers = 1
    config.flow_representation_normalize = True
    config.flow_representation_rescaling = "mult"
    config.flow_to_lm_translation_depth = 2
    config.flow_to_lm_hidden_size = 256
    config.flow_to_lm_timestep_rescaling = 1.0
    config.flow_to_lm_rescale_in_float32 = True
    config.preserve_behavior_at_flow_start = True
    config.modulate_hidden_states = False
    config.full_dit_modulation = True
    config.timestep_modulation_num_layers = 2
    config.timestep_modulation_freq_embedding_size = 256
    config.timestep_modulation_hidden_size = 256
    config.freeze_modulation_at_flow_start = False
    config.separate_flow_params = True
    config.separate_flow_params_with_lora = lora
    config.flow_lora_rank = 32
    config.flow_lora_alpha = 32.0 if lora else None
    config.nstep_final_timestep = 1.0
    config.nstep_x1_estimation = "sample"
    config.nstep_normalize_x1_predictions = False
    config.nstep_temperature_schedule = 0.0
    config.compute_diff_at_training = False  # "no analysis for faster training"
    config.compute_nstep_loss = -1
    config.minimum_training_noise = 0.0
    config.minimum_training_noise_units = "time"
    config.noise_rescaling = 64.0
    # [TRAINING]
    config.micro_valid_batch_size = 4
    config.n_warmup_steps = 100
    config.peak_lr = 1e-4
    config.min_lr = 1e-6
    config.dtype = "bfloat16"  # [DISTRIBUTED] bf16 = True
    config.param_dtype = "bfloat16"
    return config
