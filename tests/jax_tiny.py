"""Tiny random JAX models (no torch): a Llama-shaped LLM and an L2D model whose flow
parameters are perturbed away from their no-op initialisation, so the flow path matters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from l2d_jax.models.l2d import FLOW, L2DModel, init_l2d
from l2d_jax.models.llm import LLM, LLMConfig, init_llm
from l2d_jax.settings import L2DSettings

HF_CONFIG = dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
                 tie_word_embeddings=False)

# The released `_lad_lora` settings (spec section 9) at toy sizes.
LORA_SETTINGS = dict(
    base_params_to_freeze="all", noise_schedule="identity", flow_representation_space="mapping",
    flow_representation_dim=16, flow_representation_num_layers=1, flow_representation_normalize=True,
    flow_representation_rescaling="mult", noise_rescaling=64.0, flow_to_lm_translation_depth=2,
    flow_to_lm_hidden_size=16, flow_to_lm_timestep_rescaling=1.0, flow_to_lm_rescale_in_float32=True,
    preserve_behavior_at_flow_start=True, modulate_hidden_states=False, full_dit_modulation=True,
    timestep_modulation_num_layers=2, timestep_modulation_freq_embedding_size=256,
    timestep_modulation_hidden_size=16, freeze_modulation_at_flow_start=False, separate_flow_params=True,
    separate_flow_params_with_lora=True, flow_lora_rank=4, flow_lora_alpha=4.0,
    nstep_x1_estimation="sample", nstep_temperature_schedule=0.0, minimum_training_noise=0.0)


def tiny_llm(seed: int = 0, **overrides) -> LLM:
    return init_llm(LLMConfig.from_hf({**HF_CONFIG, **overrides}), seed)


def tiny_l2d(seed: int = 0, perturb: float = 0.1, settings: dict | None = None, **llm_overrides) -> L2DModel:
    """L2D model with every flow parameter moved by N(0, perturb^2) (0: as initialised)."""
    model = init_l2d(tiny_llm(seed, **llm_overrides), L2DSettings.from_dict(settings or LORA_SETTINGS), seed + 1)
    if perturb:
        nnx.update(model, _perturbed(nnx.state(model, FLOW), seed + 2, perturb))
    return model


def _perturbed(state, seed: int, scale: float):
    """Every leaf plus N(0, scale^2) noise drawn on the host (cheap: no compile)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype), state)
