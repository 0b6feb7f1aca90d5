"""Code benchmarks (``l2d-jax eval --config configs/benchmark_code.py``): the original's
cfgs/benchmark_code.cfg: HumanEval (instruct variant) and MBPP, 512 new tokens, 10 samples
per problem (pass@1/5/10), micro batch 32, max_seq_len 2048; the ODE samples x1 with the
temperature schedule ``polynomial_1_1.0`` (T = 1 - t), the next token at temperature 1.0.
Generated programs run in the sandbox (``l2d_jax.evaluation.sandbox``; 3 s per program)."""

from l2d_jax.config import sibling_config

benchmark = sibling_config(__file__, "benchmark")


def get_config(arg=None):
    del arg
    c = benchmark.get_config()
    c.tasks = "humaneval,mbpp"
    c.micro_batch_size = 32
    c.max_seq_len = 2048
    c.generation_max_len = 512
    c.generation_num_return_sequences = 10
    c.nstep_temperature_schedule = "polynomial_1_1.0"
    c.code_nstep_temperature_schedule = "polynomial_1_1.0"
    return c
