"""Built-in model shapes (HF ``config.json`` dicts, no weights) and the released L2D settings.

``PRESETS`` maps a short name to the hub config of the base model (values as published on
the Hugging Face hub); ``random_model(preset, dtype, l2d)`` builds a random-weight ``LLM``
or ``L2DModel`` of that shape for benchmarks and ahead-of-time checks, where the values of
the weights do not matter. ``tiny`` is a toy shape for tests.

``RELEASED_LORA`` / ``RELEASED_FULL`` are the L2D settings of the released ``_lad_lora`` /
``_lad`` configs (spec section 9; ``tests/original_cfgs/*_lad*.cfg``) under the original
constructor names of ``l2d_jax.settings.L2DSettings``.
"""

from __future__ import annotations

import copy
from l2d_jax.errors import UsageError

_LLAMA3_ROPE = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)

PRESETS: dict[str, dict] = {
    # HuggingFaceTB/SmolLM2-135M-Instruct
    "smollm2-135m": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=576,
        intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        head_dim=64, hidden_act="silu", max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=100000.0, rope_scaling=None, tie_word_embeddings=True, attention_bias=False,
        mlp_bias=False, bos_token_id=1, eos_token_id=2, pad_token_id=2),
    # meta-llama/Llama-3.2-1B-Instruct
    "llama-3.2-1b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=2048,
        intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        head_dim=64, hidden_act="silu", max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling=dict(_LLAMA3_ROPE, factor=32.0), tie_word_embeddings=True,
        attention_bias=False, mlp_bias=False, bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009]),
    # meta-llama/Llama-3.1-8B(-Instruct)
    "llama-3.1-8b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, hidden_act="silu", max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling=dict(_LLAMA3_ROPE, factor=8.0), tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009]),
    # Qwen/Qwen2.5-1.5B-Instruct
    "qwen2.5-1.5b": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=151936, hidden_size=1536,
        intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
        hidden_act="silu", max_position_embeddings=32768, max_window_layers=21, rms_norm_eps=1e-6,
        rope_theta=1000000.0, sliding_window=32768, use_sliding_window=False,
        tie_word_embeddings=True, attention_bias=True, bos_token_id=151643, eos_token_id=151645),
    # Qwen/Qwen2.5-7B-Instruct
    "qwen2.5-7b": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=152064, hidden_size=3584,
        intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        hidden_act="silu", max_position_embeddings=32768, max_window_layers=28, rms_norm_eps=1e-6,
        rope_theta=1000000.0, sliding_window=131072, use_sliding_window=False,
        tie_word_embeddings=False, attention_bias=True, bos_token_id=151643, eos_token_id=151645),
    # toy shape for tests (llama, tied, GQA)
    "tiny": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128, hidden_size=32,
        intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        hidden_act="silu", max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False),
}

# The released `_lad_lora` settings (spec section 9), original constructor names.
RELEASED_LORA: dict = dict(
    base_params_to_freeze="all", noise_schedule="identity", flow_representation_space="mapping",
    flow_representation_dim=256, flow_representation_num_layers=1, flow_representation_normalize=True,
    flow_representation_rescaling="mult", flow_to_lm_translation_depth=2, flow_to_lm_hidden_size=256,
    flow_to_lm_timestep_rescaling=1.0, flow_to_lm_rescale_in_float32=True,
    preserve_behavior_at_flow_start=True, modulate_hidden_states=False, full_dit_modulation=True,
    timestep_modulation_num_layers=2, timestep_modulation_freq_embedding_size=256,
    timestep_modulation_hidden_size=256, freeze_modulation_at_flow_start=False,
    separate_flow_params=True, separate_flow_params_with_lora=True, flow_lora_rank=32,
    flow_lora_alpha=32.0, nstep_final_timestep=1.0, nstep_x1_estimation="sample",
    nstep_normalize_x1_predictions=False, nstep_temperature_schedule=0.0,
    minimum_training_noise=0.0, minimum_training_noise_units="time", noise_rescaling=64.0)

# The released `_lad` settings: the same with full separate flow parameters, no LoRA.
RELEASED_FULL: dict = {k: v for k, v in RELEASED_LORA.items()
                       if k not in ("separate_flow_params_with_lora", "flow_lora_rank", "flow_lora_alpha")}

L2D_SETTINGS = {"lora": RELEASED_LORA, "full": RELEASED_FULL}


def hf_config(preset: str) -> dict:
    """A copy of the HF config dict of ``preset``; ValueError naming the known presets."""
    if preset not in PRESETS:
        raise UsageError(f"unknown model preset {preset!r}; known: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[preset])


def l2d_settings(l2d: str | dict):
    """``L2DSettings`` from "lora" / "full" (the released settings) or a settings dict."""
    from l2d_jax.settings import L2DSettings

    if isinstance(l2d, dict):
        return L2DSettings.from_dict(l2d)
    if l2d not in L2D_SETTINGS:
        raise UsageError(f"unknown L2D settings {l2d!r}; use 'lora' or 'full'")
    return L2DSettings.from_dict(L2D_SETTINGS[l2d])


def random_fill(module, seed: int = 0, std: float = 0.02):
    """Replaces every parameter of an (abstract or concrete) module in place by N(0, std^2)
    draws in its own dtype; norm weights (1-D ``norm`` axes) become 1 + N(0, std^2)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(module)
    pure = nnx.to_pure_dict(state)
    leaves, treedef = jax.tree_util.tree_flatten(pure)

    @jax.jit(static_argnames=("shape", "dtype", "offset"))
    def draw(key, shape, dtype, offset):
        return (offset + std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(pure)[0]]
    key = jax.random.PRNGKey(seed)
    out = []
    for i, (path, leaf) in enumerate(zip(paths, leaves)):
        offset = 1.0 if ("norm" in path and len(leaf.shape) == 1) else 0.0
        out.append(draw(jax.random.fold_in(key, i), tuple(leaf.shape), jnp.dtype(leaf.dtype), offset))
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(treedef, out))
    return nnx.merge(graphdef, state)


def random_model(preset: str, dtype: str = "float32", l2d: str | dict | None = None, *, seed: int = 0):
    """A random-weight model of a preset shape, parameters and computation in ``dtype``.

    The base ``LLM`` is built abstractly (``nnx.eval_shape``, no memory) and filled with
    N(0, 0.02^2) draws, one jitted draw per tensor. ``l2d``: None (the LLM alone), "lora" or
    "full" (the released settings) or a settings dict: an ``L2DModel`` with FRESH flow
    parameters (initialised as for training: the modulation heads start at zero).
    Returns ``(model, hf_config)``.
    """
    from flax import nnx

    from l2d_jax.models.llm import LLM, LLMConfig

    hf = hf_config(preset)
    cfg = LLMConfig.from_hf(hf, dtype=dtype)
    base = random_fill(nnx.eval_shape(lambda: LLM(cfg, rngs=nnx.Rngs(0))), seed=seed)
    if l2d is None:
        return base, hf
    from l2d_jax.models.l2d import L2DModel

    return L2DModel(base, l2d_settings(l2d), rngs=nnx.Rngs(seed + 1)), hf
