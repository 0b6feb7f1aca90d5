"""L2D hyper-parameters under the original constructor names, with validation.

``L2DSettings`` mirrors the keyword arguments of the original ``FlowLlamaForCausalLM`` /
``FlowQwen2ForCausalLM`` (defaults = the original constructor's), so a settings JSON of
the original loads as is. ``validate`` rejects contradictory settings with a message that
names the keys.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from l2d_jax import solvers
from l2d_jax.errors import L2DError


class SettingsError(L2DError, ValueError):
    """Contradictory or unknown L2D settings."""


ODE_METHODS = solvers.METHODS  # the registry in solvers.py


def _frozen(d: dict) -> tuple:
    """A dict as sorted (key, value) pairs, nested dicts too: hashable, so jit can key on it."""
    return tuple(sorted((k, _frozen(v) if isinstance(v, dict) else v) for k, v in d.items()))


@dataclasses.dataclass(frozen=True)
class L2DSettings:
    base_params_to_freeze: str = "all"  # original default None means "none"; released: all
    default_generation_nstep: int | None = None
    noise_schedule: str = "identity"
    minimum_training_noise: float | None = None
    minimum_training_noise_units: str = "time"
    velocity_schedule: str = "constant"
    flow_representation_space: str = "mapping"
    flow_representation_dim: int | None = None
    flow_representation_num_layers: int | None = None
    flow_representation_normalize: bool = True
    flow_representation_rescaling: str | None = None
    noise_rescaling: float = 1.0
    flow_to_lm_translation_depth: int | None = None
    flow_to_lm_hidden_size: int | None = None
    flow_to_lm_timestep_rescaling: float | None = None
    flow_to_lm_rescale_in_float32: bool = False
    preserve_behavior_at_flow_start: bool = True
    modulate_hidden_states: bool = False
    full_dit_modulation: bool = False
    timestep_modulation_num_layers: int = 2
    timestep_modulation_freq_embedding_size: int = 256
    timestep_modulation_hidden_size: int | None = None
    guidance_modulation_num_classes: int | None = None
    guidance_modulation_training_dropout: float = 0.2
    freeze_modulation_at_flow_start: bool = False
    separate_flow_params: bool = False
    separate_flow_params_with_lora: bool = False
    flow_lora_rank: int = 8
    flow_lora_alpha: float | None = None
    ode_kwargs: tuple[tuple[str, Any], ...] = (("atol", 1e-5), ("method", "midpoint"), ("rtol", 1e-5))
    nstep_final_timestep: float = 1.0
    nstep_x1_estimation: str = "average"
    nstep_normalize_x1_predictions: bool = False
    nstep_clamp_predictions: bool = False
    nstep_temperature_schedule: float | str | None = None
    nstep_guidance_parameter: float | None = None
    reinit_flow_params: bool = False

    # ---- derived values (shapes need the base hidden size H)
    def flow_dim(self, hidden: int) -> int:
        return self.flow_representation_dim or hidden

    def cond_dim(self, hidden: int) -> int:
        return self.timestep_modulation_hidden_size or hidden

    def flow_to_lm_hidden(self, hidden: int) -> int:
        return self.flow_to_lm_hidden_size or hidden

    @property
    def flow_to_lm_depth(self) -> int:
        return 2 if self.flow_to_lm_translation_depth is None else self.flow_to_lm_translation_depth

    @property
    def use_guidance(self) -> bool:
        return bool(self.guidance_modulation_num_classes)

    @property
    def use_lora(self) -> bool:
        return self.separate_flow_params and self.separate_flow_params_with_lora

    @property
    def lora_scale(self) -> float:
        alpha = self.flow_lora_alpha
        if alpha is None or alpha == -1:
            alpha = 2.0 * self.flow_lora_rank
        return float(alpha) / float(self.flow_lora_rank)

    @property
    def subtract_flow_start(self) -> bool:
        """Whether the final head (and with freeze, every chunk) is taken relative to t = 0."""
        return self.preserve_behavior_at_flow_start or self.freeze_modulation_at_flow_start

    @property
    def maximum_timestep(self) -> float:
        return 1.0 - (self.minimum_training_noise or 0.0)

    @property
    def ode(self) -> dict:
        return {k: dict(v) if isinstance(v, tuple) and v and isinstance(v[0], tuple) else v
                for k, v in self.ode_kwargs}

    # ---- construction
    @classmethod
    def from_dict(cls, d: dict) -> "L2DSettings":
        """From original constructor keyword names; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - {"model_or_model_id", "model_loading_kwargs"})
        if unknown:
            raise SettingsError(f"unknown L2D setting(s) {unknown}; known: {sorted(names)}")
        kw = {k: v for k, v in d.items() if k in names}
        if isinstance(kw.get("ode_kwargs"), dict):
            kw["ode_kwargs"] = _frozen(kw["ode_kwargs"])
        s = cls(**kw)
        s.validate()
        return s

    @classmethod
    def from_json(cls, path: str | Path) -> "L2DSettings":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ode_kwargs"] = self.ode
        return d

    def replace(self, **kw) -> "L2DSettings":
        s = dataclasses.replace(self, **kw)
        s.validate()
        return s

    def validate(self, hidden_size: int | None = None) -> None:
        """Raises SettingsError on contradictory settings (the original's asserts, named)."""
        def bad(msg):
            raise SettingsError(msg)

        if self.base_params_to_freeze not in ("all", "none"):
            bad(f"base_params_to_freeze={self.base_params_to_freeze!r}; use 'all' or 'none'")
        if self.noise_schedule not in ("identity", "cosmap"):
            bad(f"noise_schedule={self.noise_schedule!r}; use 'identity' or 'cosmap'")
        if self.velocity_schedule not in ("constant", "edm"):
            bad(f"velocity_schedule={self.velocity_schedule!r}; use 'constant' or 'edm'")
        if self.minimum_training_noise_units != "time":
            bad(f"minimum_training_noise_units={self.minimum_training_noise_units!r} is not "
                "supported (the original supports only 'time')")
        mtn = self.minimum_training_noise or 0.0
        if not 0.0 <= mtn < 1.0:
            bad(f"minimum_training_noise={mtn} must be in [0, 1)")
        space = self.flow_representation_space
        if space not in ("mapping", "embedding", "one-hot"):
            bad(f"flow_representation_space={space!r}; use 'mapping', 'embedding' or 'one-hot'")
        if space == "mapping" and not (self.flow_representation_num_layers or 0) >= 1:
            bad("flow_representation_space='mapping' needs flow_representation_num_layers >= 1")
        if space == "embedding":
            if self.flow_representation_num_layers not in (None, 0):
                bad("flow_representation_space='embedding' needs flow_representation_num_layers 0 or unset")
            if (hidden_size is not None and self.flow_representation_dim is not None
                    and self.flow_representation_dim != hidden_size):
                bad(f"flow_representation_space='embedding' needs flow_representation_dim == hidden "
                    f"size ({self.flow_representation_dim} != {hidden_size})")
        if self.flow_representation_rescaling not in (None, "mult", "div", "none"):
            bad(f"flow_representation_rescaling={self.flow_representation_rescaling!r}; "
                "use 'mult', 'div' or 'none'")
        if not self.noise_rescaling > 0:
            bad(f"noise_rescaling={self.noise_rescaling} must be > 0")
        tr = self.flow_to_lm_timestep_rescaling
        if tr is not None and tr < 0:
            bad(f"flow_to_lm_timestep_rescaling={tr} must be >= 0")
        if tr and not self.flow_representation_normalize:
            bad("flow_to_lm_timestep_rescaling > 0 needs flow_representation_normalize=True")
        if (self.flow_to_lm_depth == 0 and hidden_size is not None
                and self.flow_dim(hidden_size) != hidden_size):
            bad("flow_to_lm_translation_depth=0 needs flow_representation_dim == hidden size")
        if self.separate_flow_params_with_lora and not self.separate_flow_params:
            bad("separate_flow_params_with_lora=True needs separate_flow_params=True")
        if self.use_lora and self.flow_lora_rank < 1:
            bad(f"flow_lora_rank={self.flow_lora_rank} must be >= 1")
        if self.preserve_behavior_at_flow_start and self.modulate_hidden_states \
                and not self.freeze_modulation_at_flow_start:
            bad("modulate_hidden_states with preserve_behavior_at_flow_start needs "
                "freeze_modulation_at_flow_start=True")
        if self.freeze_modulation_at_flow_start and not self.preserve_behavior_at_flow_start:
            bad("freeze_modulation_at_flow_start needs preserve_behavior_at_flow_start=True")
        if self.timestep_modulation_num_layers < 1:
            bad("timestep_modulation_num_layers must be >= 1")
        if self.timestep_modulation_freq_embedding_size % 2:
            bad("timestep_modulation_freq_embedding_size must be even")
        if self.use_guidance and not self.guidance_modulation_training_dropout > 0:
            bad("guidance_modulation_num_classes > 0 needs guidance_modulation_training_dropout > 0")
        if not 0.0 <= self.nstep_final_timestep <= 1.0:
            bad(f"nstep_final_timestep={self.nstep_final_timestep} must be in [0, 1]")
        if self.nstep_x1_estimation not in ("average", "sample"):
            bad(f"nstep_x1_estimation={self.nstep_x1_estimation!r}; use 'average' or 'sample'")
        method = self.ode.get("method", "midpoint")
        if method not in ODE_METHODS:
            bad(f"ode_kwargs method={method!r} is not supported; use one of {', '.join(ODE_METHODS)}")
        ts = self.nstep_temperature_schedule
        if isinstance(ts, str) and not ts.lower().startswith("polynomial_"):
            bad(f"nstep_temperature_schedule={ts!r}; use a float or 'polynomial_<p>_<end_t>'")
