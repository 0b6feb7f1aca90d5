"""``l2d-jax demo``: SmolLM2-135M-Instruct + L2D (released LoRA settings) on generated
arithmetic word problems, then accuracy vs. ODE steps on held-out problems.

An ordinary training config built on ``smollm2_135m_instruct_lad_lora.py`` (and so on
``base.py``): the same command runs the Llama / Qwen configs with ``--config`` pointing at a
copy of this file that loads another sibling. ``configs/demo.py:quick`` is the ``--quick``
size. The demo-only settings (problem counts, seeds, evaluation) are ``demo_settings(arg)``;
``--config.KEY=VALUE`` sets either kind of key.

Sizes (2 CPU cores, float32, 2026-12-04): training conversations hold num_shots + 1 = 3
problems (their later turns look like the 2-shot evaluation prompts; up to ~225 tokens), in
the measured run a step of 8 of them took ~22 s (the cores were shared with a CI rehearsal
for most of it), the 60 steps ~23 min; the evaluation of all 300 held-out problems at base,
2, 4, 8 and 16 grid points (midpoint, batches of 100, each batch prefilled once) took ~9 min
per batch, ~27 min. ``--quick``: 6 steps, 16 problems at base / 2 / 8, a few minutes.
"""

from l2d_jax.config import sibling_config

smollm2 = sibling_config(__file__, "smollm2_135m_instruct_lad_lora")


def get_config(arg=None):
    quick = arg == "quick"
    config = smollm2.get_config()
    config.dtype = "float32"          # CPU: float32 is the fast path
    config.param_dtype = "float32"

    config.data_source = "local"
    config.train_filepaths = ("l2d_demo/data/train.jsonl",)  # the demo sets it to <out>/data/train.jsonl
    config.valid_filepaths = ()
    config.exclude_train_data_category = ()
    config.max_seq_len = 256                   # a 3-problem conversation is at most ~225 tokens
    config.seq_len_buckets = (128, 192, 256)

    config.micro_batch_size = 8
    config.micro_valid_batch_size = 8
    config.n_samples_before_backprop = 8
    config.n_training_steps = 6 if quick else 60
    config.n_epochs = 1
    config.n_warmup_steps = 2 if quick else 6
    config.peak_lr = 1e-3
    config.min_lr = 1e-5
    config.scheduler_type = "warmup_cosine"
    config.seed = 42

    config.log_interval = 1 if quick else 5
    config.validate_interval = 3 if quick else 20  # on the demo's valid.jsonl
    config.num_t_bins = 10  # losses binned by t: does the flow path read x_t?
    config.save_model_interval = 3 if quick else 20
    config.keep_checkpoints = 2
    config.compute_nstep_loss = -1
    config.save_wandb = False
    config.wandb_run_name = "demo_quick" if quick else "demo"
    return config


def demo_settings(arg=None):
    """Demo-only settings (not training keys). ``eval_steps``: ODE grid points (the base
    model always runs too)."""
    quick = arg == "quick"
    return dict(
        n_train=2000,
        n_test=300,
        n_valid=12 if quick else 48,  # validation problems (conversations of num_shots + 1)
        train_seed=1001,
        test_seed=2002,
        valid_seed=3003,
        eval_limit=16 if quick else None,  # first N of the n_test held-out problems (None: all)
        eval_steps=(2, 8) if quick else (2, 4, 8, 16),
        eval_batch_size=16 if quick else 100,
        max_new_tokens=24 if quick else 28,
        num_shots=2,
        eval_seed=0,
    )
