"""Benchmark evaluation (``l2d-jax eval --config configs/benchmark.py``): the original's
cfgs/benchmark.cfg (GSM8K, MMLU, MMLU-Pro; 256 new tokens; max_seq_len 2048) plus MATH,
which the paper reports but the released cfg had to drop ("lighteval/MATH" was removed from
the hub; here it reads the copy ``DigitalLearningGmbH/MATH-lighteval``), with the paper's
decoding protocol (spec section 9): 5-shot chat prompts, per token a midpoint ODE
(``steps`` = grid points; 8 = 7 intervals = 14 NFE), x1 SAMPLED at ODE temperature 0 (the
argmax), the next token sampled at temperature 1.0 (no top-k / top-p).

Keys (flat, the original's names where it has one). Override any with
``--config.key=value`` after the command, e.g. ``--config.micro_batch_size=8``.
"""

import ml_collections

# The original's guidance classes (tasks/constants.py SharedTasks), in class-index order.
SHARED_CATEGORIES = ("math", "coding", "general_qa", "other")


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict(type_safe=False)  # schedules may be floats or strings
    # tasks: comma-separated registry names (l2d_jax.evaluation.tasks.task_names())
    c.tasks = "gsm8k,math,mmlu,mmlu_pro"
    # per-task dataset overrides: {"gsm8k": {"source": "path/test.jsonl",
    # "shots_source": "path/train.jsonl"}, "math": {"source": "EleutherAI/hendrycks_math"}}
    c.task_options = ml_collections.ConfigDict(type_safe=False)
    c.steps = "0,8"  # default of --steps: "0"/"base" = the base model alone
    c.limit = -1  # first N examples per task (-1: all)
    # inference (the original's [INFERENCE] section)
    c.micro_batch_size = 64  # prompts per generate call (rounded up to the device count)
    c.max_seq_len = 2048  # examples with prompt + reference answer longer are skipped
    c.generation_max_len = 256
    c.generation_num_return_sequences = 1
    c.generation_temperature = 1.0  # next-token sampling (0 = greedy)
    c.generation_top_k = 0
    c.generation_top_p = 1.0
    # ODE (per generated token)
    c.ode_solver = "midpoint"  # or adaptive: adaptive_heun, bosh3, fehlberg2, dopri5 (then the
    # step count only switches the flow path on: use --steps 0,2; results report mean_nfe)
    c.ode_solver_atol = 1e-5  # adaptive solvers only
    c.ode_solver_rtol = 1e-5
    c.ode_per_sequence = True  # adaptive: each row its own step sizes (False: one for the batch)
    c.ode_max_steps = 1000  # adaptive: step budget per token
    c.nstep_x1_estimation = "sample"
    c.nstep_temperature_schedule = 0.0  # float, or "polynomial_<p>_<end_t>"
    c.code_nstep_temperature_schedule = "polynomial_1_1.0"  # used by code tasks only
    c.nstep_guidance_parameter = -1.0  # CFG weight (< 0: the checkpoint's own setting)
    c.guidance_categories = SHARED_CATEGORIES
    # prompts: None = the tokenizer's chat template (date_string fixed to 26 Jul 2024, as the
    # original's fixed_date_llama3); "base_llama" for base (non-instruct) models
    c.chat_template = ""
    # devices: each process's mesh over its OWN local devices (one model-parallel group per
    # host; hosts split the prompts). fsdp / tensor > 1 shard the model's parameters (a model
    # larger than one device); -1 fills the remaining devices. Flag: --mesh tensor=4
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # model loading
    c.dtype = "bfloat16"
    c.param_dtype = "bfloat16"
    c.seed = 0
    c.out_dir = ""  # default: ./eval_results/<name of the checkpoint>
    c.tokenizer_dir = ""  # default: the checkpoint's own tokenizer
    c.allow_unsandboxed = False  # code tasks: run generated code without the sandbox
    return c
