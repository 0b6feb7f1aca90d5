"""Parity check against golden outputs of the original PyTorch L2D (``l2d-jax verify-torch``).

A golden folder (format: ``tests/goldens/README.md``) holds ``base/`` (an HF model dir),
``cases.npz`` and ``meta.json``, and for an L2D set also ``l2d_settings.json``,
``l2d_state.safetensors`` and ``train_grads.npz``. ``verify_golden(dir)`` converts the set
(base from ``base/``, flow parameters through the original-state import with its base
check), recomputes every case whose key it knows and compares with the README's measure
``max|ours - ref| / max(1, max|ref|)`` (padded positions excluded).

Every key of ``cases.npz`` is one of: an output checked by a handler of ``CASE_HANDLERS``
(regex -> handler), an input (``INPUT_KEYS``), skipped with a reason (``SKIPPED_KEYS``), or
unknown (which fails the run). A handler returns one or more ``CaseResult``; an exception
inside a handler fails that case only. Adding a case kind is one entry in ``CASE_HANDLERS``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from l2d_jax import diffusion, solvers
from l2d_jax.convert.names import get_param
from l2d_jax.errors import L2DError

# Tolerances of the goldens README (float32 implementation).
TOL_LOGITS = 2e-4
TOL_REPR = 1e-5  # flow representations, x1 estimates, weighted representations, x_t
TOL_TRAJ = 1e-4  # velocities and ODE trajectories
TOL_LOSS = 1e-5
TOL_GRAD = 1e-4
TOL_T0_OWN_BASE = 1e-5  # t = 0 logits against our own base logits
TOL_GRID = 0.0  # time grids: torch.linspace reproduced bit for bit
TOL_IDS = 0.0  # token ids: identical (err = number of differing ids)

GENERATION_SKIP_REASON = "generation: see the Generation issue"


@dataclasses.dataclass
class CaseResult:
    name: str
    err: float | None
    tol: float
    passed: bool
    note: str | None = None

    def to_json(self) -> dict:
        d = {"name": self.name, "err": self.err, "tol": self.tol, "passed": self.passed}
        if self.note:
            d["note"] = self.note
        return d


def rel_err(ours, ref, valid: np.ndarray | None = None) -> float:
    """``max|ours - ref| / max(1, max|ref|)`` over the positions where ``valid`` (B, T) holds."""
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        raise ValueError(f"shape {ours.shape} differs from the golden's {ref.shape}")
    if valid is not None:
        sel = np.asarray(valid).astype(bool)
        ours, ref = ours[sel], ref[sel]
    if ref.size == 0:
        return 0.0
    diff = np.abs(ours - ref)
    if np.isnan(diff).any():
        return math.inf
    return float(diff.max() / max(1.0, float(np.abs(ref).max())))


def compare(name: str, ours, ref, tol: float, valid=None, note=None) -> CaseResult:
    err = rel_err(ours, ref, valid)
    return CaseResult(name, err, tol, bool(err <= tol), note)


def compare_ids(name: str, ours, ref) -> CaseResult:
    ours, ref = np.asarray(ours), np.asarray(ref)
    if ours.shape != ref.shape:
        return CaseResult(name, None, TOL_IDS, False, f"shape {ours.shape} differs from the golden's {ref.shape}")
    err = float(np.sum(ours != ref))
    return CaseResult(name, err, TOL_IDS, err <= TOL_IDS, None if err == 0 else f"ours {ours.tolist()}")


# --------------------------------------------------------------------------- model functions


def guidance_dropout(class_labels, uniform, num_classes: int, p: float):
    """Training-mode label dropout of the original: (B,) labels broadcast to the (B, T) shape
    of ``uniform`` (U[0, 1) draws); each position becomes the null class ``num_classes``
    where its draw is < p."""
    labels = jnp.broadcast_to(jnp.asarray(class_labels, jnp.int32).reshape(-1, 1), uniform.shape)
    return jnp.where(jnp.asarray(uniform) < jnp.float32(p), num_classes, labels)


def train_loss(model, input_ids, labels, timesteps, noise, *, class_labels=None, shifted: bool = True):
    """The training loss (``l2d_jax.train.step.loss_terms``) with given t and standard-normal
    noise, in eval mode (class_labels (B,) or already dropped out (B, T), or None).

    shifted=False (HF labels): noise is (B, T-1, D) as the original draws it (position i
    encodes labels[i + 1]); it is padded to T (the last flow position is zero).
    Returns (mean loss, per-token losses (0 where ignored), logits (B, T, V) float32).
    """
    from l2d_jax.train.step import loss_terms

    if not shifted:
        noise = jnp.pad(noise, ((0, 0), (0, 1), (0, 0)))
    terms = loss_terms(model, input_ids, labels, class_labels=class_labels, shifted=shifted, train=False,
                       t=timesteps, noise=noise)
    return terms.losses.sum() / terms.valid.sum(), terms.losses, terms.logits


def train_flow_input(model, labels, timesteps, noise):
    """x_t of the shifted-label training forward: (1 - t) sigma noise + t phi(labels, -100 -> 0)."""
    targets, _ = diffusion.flow_targets(labels, True)
    return diffusion.interpolate(noise, model.flow_representation(targets), timesteps,
                                 model.settings.noise_rescaling, jnp.dtype(model.cfg.dtype))


def trainable_filter(settings):
    """What training differentiates: the flow half, or every parameter with
    ``base_params_to_freeze = "none"``."""
    from l2d_jax.models.l2d import FLOW

    return nnx.Param if settings.base_params_to_freeze == "none" else FLOW


def train_grads(model, input_ids, labels, timesteps, noise, *, class_labels=None):
    """Gradients of the shifted-label training loss w.r.t. the trainable parameters: a State
    holding only the trainable half (the base gets none)."""
    graphdef, trainable, rest = nnx.split(model, trainable_filter(model.settings), ...)
    return _train_grads(graphdef, trainable, rest, input_ids, labels, timesteps, noise, class_labels)


@functools.partial(jax.jit, static_argnums=0)
def _train_grads(graphdef, trainable, rest, input_ids, labels, timesteps, noise, class_labels):
    def loss_fn(tr):
        return train_loss(nnx.merge(graphdef, tr, rest), input_ids, labels, timesteps, noise,
                          class_labels=class_labels)[0]

    return jax.grad(loss_fn)(trainable)


def grads_by_original_name(model, grads) -> dict[str, np.ndarray]:
    """A gradient State (from ``train_grads``) as {original parameter name: (original layout)}."""
    from l2d_jax.convert.original_names import original_names

    pure = nnx.to_pure_dict(grads)
    out = {}
    for e in original_names(model.settings, model.cfg):
        if e.alias_of is not None or not e.trainable:
            continue
        g = np.asarray(get_param(pure, e.path), np.float32)
        out[e.name] = g.T if e.transpose else g
    return out


@functools.partial(jax.jit, static_argnums=0)
def _base_logits(graphdef, state, ids, positions, mask):
    return nnx.merge(graphdef, state)(ids, positions, attention_mask=mask).logits


@functools.partial(jax.jit, static_argnums=0)
def _l2d_logits(graphdef, state, ids, t, x_t, labels):
    return nnx.merge(graphdef, state)(ids, t, x_t, class_labels=labels).logits


@functools.partial(jax.jit, static_argnums=0)
def _l2d_base_path(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids).logits


@functools.partial(jax.jit, static_argnums=0)
def _repr(graphdef, state, ids):
    return nnx.merge(graphdef, state).flow_representation(ids)


@functools.partial(jax.jit, static_argnums=0)
def _table(graphdef, state):
    return nnx.merge(graphdef, state).flow_table()


@functools.partial(jax.jit, static_argnums=(0, 7))
def _train(graphdef, state, ids, labels, t, noise, class_labels, shifted):
    m = nnx.merge(graphdef, state)
    loss, token_losses, logits = train_loss(m, ids, labels, t, noise, class_labels=class_labels, shifted=shifted)
    x_t = train_flow_input(m, labels, t, noise) if shifted else None
    return logits, x_t, loss, token_losses


@functools.partial(jax.jit, static_argnums=0)
def _velocity(graphdef, state, ids, x_t, t, labels):
    """compute_velocity of the original (average x1 at temperature 1, no normalisation)."""
    m = nnx.merge(graphdef, state)
    logits = m(ids, t, x_t, class_labels=labels).logits
    x1 = diffusion.estimate_x1(logits, m.flow_table(), "average", 1.0, normalize=False)
    v = diffusion.velocity(x1, x_t, t, m.settings.velocity_schedule)
    return logits, x1, v


@functools.partial(jax.jit, static_argnames=("graphdef", "method", "max_points", "variant"))
def _nstep(graphdef, state, ids, x0, num_points, temperature, labels, *, method, max_points, variant):
    """The original's nstep_inference (average x1 at a constant temperature) and the logits
    after it. variant: "precompute" (main path once, l2d_jax.nstep), "noprecompute" (every
    velocity runs the full forward) or "lasttok" (the ODE over the LAST position only, reading
    the cache of the whole sequence). Returns (trajectory (max_points, ...), final logits)."""
    from l2d_jax import nstep as nstep_lib
    from l2d_jax.models.llm import init_cache

    m = nnx.merge(graphdef, state)
    opts = nstep_lib.ODEOptions.from_settings(m.settings, method=method, x1_estimation="average",
                                              temperature=1.0, final_t=1.0)
    if variant == "precompute":
        out = nstep_lib.nstep(m, ids, x0, num_points, opts, class_labels=labels, temperature=temperature,
                              max_points=max_points, return_trajectory=True)
        return out.trajectory, out.logits
    b, n = ids.shape
    positions = jnp.broadcast_to(jnp.arange(n), (b, n))
    if variant == "noprecompute":
        def flow_logits(x, t, conditional):
            return m(ids, t, x, positions, class_labels=labels if conditional else None).logits
    else:
        kv_valid = jnp.ones((b, n), bool)
        main = m.base(ids, positions, cache=init_cache(m.cfg, b, n), cache_index=0, kv_valid=kv_valid)
        x0 = x0[:, -1:]

        def flow_logits(x, t, conditional):
            return m.flow_only(main.hidden[:, -1:], main.cache, x, t, positions[:, -1:], n - 1, kv_valid,
                               labels if conditional else None)
    g = m.settings.nstep_guidance_parameter
    f = nstep_lib.make_velocity(
        flow_logits, m.flow_table(), opts, delta=nstep_lib.temperature_delta(method, num_points, opts.final_t),
        temperature=temperature, guidance=jnp.float32(1.0 if g is None else g),
        guided=m.settings.use_guidance and labels is not None)
    sol = solvers.integrate_fixed(f, x0, num_points, opts.final_t, method, max_points=max_points,
                                  return_trajectory=True)
    return sol.trajectory, flow_logits(sol.x, jnp.float32(opts.final_t), True)


# --------------------------------------------------------------------------- a golden folder


class Golden:
    """A golden folder with lazily built models and cached intermediate results."""

    def __init__(self, path: str | Path):
        self.dir = Path(path)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"golden folder {self.dir} does not exist")
        for required in ("cases.npz", "base"):
            if not (self.dir / required).exists():
                raise L2DError(f"{self.dir} is not a golden folder: it has no {required}")
        with np.load(self.dir / "cases.npz") as z:
            self.cases = {k: z[k] for k in z.files}
        grads = self.dir / "train_grads.npz"
        self.grads = None
        if grads.is_file():
            with np.load(grads) as z:
                self.grads = {k: z[k] for k in z.files}
        self.is_l2d = (self.dir / "l2d_settings.json").is_file()
        self._cache: dict = {}

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.cases:
            raise KeyError(f"this case needs {key!r}, which cases.npz lacks")
        return self.cases[key]

    def get(self, key: str):
        return self.cases.get(key)

    def memo(self, key, fn: Callable):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    # ---- models
    @functools.cached_property
    def base(self):
        from l2d_jax.convert.hf import load_hf

        return load_hf(self.dir / "base", dtype="float32")[0]

    @functools.cached_property
    def base_split(self):
        return nnx.split(self.base)

    @functools.cached_property
    def settings(self):
        from l2d_jax.convert.original import read_settings

        if not self.is_l2d:
            raise L2DError("this case needs the L2D model, but the folder is base-model-only "
                           "(no l2d_settings.json)")
        return read_settings(self.dir / "l2d_settings.json")[0]

    @functools.cached_property
    def model(self):
        from l2d_jax.convert.original import l2d_from_original, read_state

        state = read_state(self.dir / "l2d_state.safetensors")
        return l2d_from_original(self.base, self.settings, state)

    @functools.cached_property
    def split(self):
        return nnx.split(self.model)

    # ---- shared inputs
    def class_labels(self):
        """(B,) class labels of a guidance set, else None."""
        labels = self.get("class_labels")
        if labels is not None and not self.settings.use_guidance:
            raise L2DError("cases.npz has class_labels but the settings have no guidance classes")
        return None if labels is None else jnp.asarray(labels, jnp.int32)

    def own_base_logits(self, ids_key: str):
        return self.memo(("base_logits", ids_key), lambda: np.asarray(
            _base_logits(*self.base_split, jnp.asarray(self[ids_key]), None, None)))

    def table(self):
        return self.memo("table", lambda: _table(*self.split))

    def l2d_logits(self, ids_key, t, x_t, conditional=True):
        labels = self.class_labels() if conditional else None
        return np.asarray(_l2d_logits(*self.split, jnp.asarray(self[ids_key]), jnp.asarray(t, jnp.float32),
                                      jnp.asarray(x_t, jnp.float32), labels))


# --------------------------------------------------------------------------- case handlers

Handler = Callable[[Golden, str, re.Match], Iterable[CaseResult]]
CASE_HANDLERS: dict[str, Handler] = {}


def case(pattern: str):
    """Registers a handler for the output keys that fully match ``pattern``."""
    def register(fn: Handler) -> Handler:
        CASE_HANDLERS[pattern] = fn
        return fn
    return register


# Keys that are inputs of the cases (checked through the outputs that use them).
INPUT_KEYS = [
    r"class_labels",
    r"base_pad_(input_ids|attention_mask|position_ids)",
    r"base_long_input_ids",
    r"fwd_(input_ids|timesteps|target_ids|noise)",
    r"train_(input_ids|labels|timesteps|noise|guidance_drop_uniform)",
    r"train_unshifted_(labels|timesteps|noise)",
    r"repr_logits",
    r"vel_timesteps",
    r"vel_t[0-9p]+_xt",
    r"nstep_(input_ids|init)",
]
# Keys that are known but not checked, with the reason.
SKIPPED_KEYS = {r"gen_.*": GENERATION_SKIP_REASON}


def _tag_value(tag: str) -> float:
    """'1p0' -> 1.0, '0p25' -> 0.25, '0' -> 0.0, 'm0p5' -> -0.5."""
    sign = -1.0 if tag.startswith("m") else 1.0
    return sign * float(tag.lstrip("m").replace("p", "."))


# ---- base model (CASE 0 and base-only folders)

@case(r"base_pad_logits_hf")
def _case_base_pad(g: Golden, key, m):
    mask = g["base_pad_attention_mask"]
    ids, pos = (jnp.asarray(g[k]) for k in ("base_pad_input_ids", "base_pad_position_ids"))
    ours = _base_logits(*g.base_split, ids, pos, jnp.asarray(mask))
    yield compare(key, ours, g[key], TOL_LOGITS, valid=mask)


@case(r"base_logits_hf")
def _case_base_logits(g: Golden, key, m):
    yield compare(key, g.own_base_logits("fwd_input_ids"), g[key], TOL_LOGITS)


@case(r"base_long_logits_hf")
def _case_base_long(g: Golden, key, m):
    yield compare(key, g.own_base_logits("base_long_input_ids"), g[key], TOL_LOGITS)


@case(r"base_logits_wrapper_noflow")
def _case_wrapper_noflow(g: Golden, key, m):
    yield compare(key, _l2d_base_path(*g.split, jnp.asarray(g["fwd_input_ids"])), g[key], TOL_LOGITS)


# ---- forward (CASE 1)

@case(r"fwd_target_repr")
def _case_fwd_target_repr(g: Golden, key, m):
    yield compare(key, _repr(*g.split, jnp.asarray(g["fwd_target_ids"])), g[key], TOL_REPR)


@case(r"fwd_flow_representation_embeds")
def _case_fwd_xt(g: Golden, key, m):
    x1 = _repr(*g.split, jnp.asarray(g["fwd_target_ids"]))
    ours = diffusion.interpolate(jnp.asarray(g["fwd_noise"]), x1, jnp.asarray(g["fwd_timesteps"]),
                                 g.settings.noise_rescaling, jnp.float32)
    yield compare(key, ours, g[key], TOL_REPR)


@case(r"fwd_logits(_uncond)?")
def _case_fwd_logits(g: Golden, key, m):
    ours = g.l2d_logits("fwd_input_ids", g["fwd_timesteps"], g["fwd_flow_representation_embeds"],
                        conditional=m.group(1) is None)
    yield compare(key, ours, g[key], TOL_LOGITS)


def _t0_own_base(g: Golden, name: str, ours) -> Iterable[CaseResult]:
    """The exact property of preserve_behavior_at_flow_start: t = 0 gives the base logits."""
    if g.settings.subtract_flow_start:
        yield compare(f"{name} vs own base", ours, g.own_base_logits("fwd_input_ids"), TOL_T0_OWN_BASE)


@case(r"fwd_logits_t0")
def _case_fwd_t0(g: Golden, key, m):
    ours = g.l2d_logits("fwd_input_ids", np.zeros(g["fwd_input_ids"].shape, np.float32),
                        g["fwd_flow_representation_embeds"])
    yield compare(key, ours, g[key], TOL_LOGITS)
    yield from _t0_own_base(g, key, ours)


# ---- training (CASE 2)

def _train_outputs(g: Golden, shifted: bool, conditional: bool = True):
    def run():
        pre = "train_" if shifted else "train_unshifted_"
        labels = g[f"{pre}labels"]
        ids = g["train_input_ids"]
        cls = g.class_labels() if conditional else None
        if cls is not None and shifted and "train_guidance_drop_uniform" in g.cases:
            s = g.settings
            cls = guidance_dropout(cls, jnp.asarray(g["train_guidance_drop_uniform"]),
                                   s.guidance_modulation_num_classes, s.guidance_modulation_training_dropout)
        out = _train(*g.split, jnp.asarray(ids), jnp.asarray(labels), jnp.asarray(g[f"{pre}timesteps"]),
                     jnp.asarray(g[f"{pre}noise"]), cls, shifted)
        return tuple(None if o is None else np.asarray(o) for o in out) + (None if cls is None else np.asarray(cls),)
    return g.memo(("train", shifted, conditional), run)


@case(r"train_(logits|loss|token_losses|flow_representation_embeds)")
def _case_train(g: Golden, key, m):
    logits, x_t, loss, token_losses, _ = _train_outputs(g, True)
    ours, tol = {"logits": (logits, TOL_LOGITS), "loss": (loss, TOL_LOSS), "token_losses": (token_losses, TOL_LOSS),
                 "flow_representation_embeds": (x_t, TOL_REPR)}[m.group(1)]
    yield compare(key, ours, g[key], tol)


@case(r"train_class_labels_after_dropout")
def _case_train_dropout(g: Golden, key, m):
    yield compare_ids(key, _train_outputs(g, True)[-1], g[key])


@case(r"train_unshifted_(logits|loss)")
def _case_train_unshifted(g: Golden, key, m):
    # The README does not say whether the guidance set passed class_labels to this call:
    # with guidance, whichever of conditional / unconditional matches is reported.
    variants = [True, False] if g.get("class_labels") is not None else [True]
    results = []
    for conditional in variants:
        logits, _, loss, _, _ = _train_outputs(g, False, conditional)
        ours, tol = (logits, TOL_LOGITS) if m.group(1) == "logits" else (loss, TOL_LOSS)
        note = None if len(variants) == 1 else ("with class_labels" if conditional else "without class_labels")
        results.append(compare(key, ours, g[key], tol, note=note))
        if results[-1].passed:
            break
    yield results[-1] if results[-1].passed else results[0]


# ---- representations (CASE 3)

@case(r"repr_tokens")
def _case_repr_tokens(g: Golden, key, m):
    yield compare(key, _repr(*g.split, jnp.asarray(g["fwd_input_ids"])), g[key], TOL_REPR)


@case(r"repr_table")
def _case_repr_table(g: Golden, key, m):
    yield compare(key, g.table(), g[key], TOL_REPR)


@case(r"repr_weighted_T([0-9pm]+)(_argmax|_normalized)?")
def _case_repr_weighted(g: Golden, key, m):
    temperature = _tag_value(m.group(1))
    ours = diffusion.estimate_x1(jnp.asarray(g["repr_logits"]), g.table(), "average", temperature,
                                 normalize=m.group(2) == "_normalized",
                                 rescaling=g.settings.flow_representation_rescaling or "none")
    yield compare(key, ours, g[key], TOL_REPR)


# ---- velocities (CASE 4)

def _velocity_outputs(g: Golden, tag: str, conditional: bool):
    def run():
        t = _tag_value(tag)
        ts = g.get("vel_timesteps")
        if ts is not None and ts.size:  # the recorded value (its float64 digits)
            t = float(ts[np.argmin(np.abs(ts - t))])
        labels = g.class_labels() if conditional else None
        out = _velocity(*g.split, jnp.asarray(g["fwd_input_ids"]), jnp.asarray(g[f"vel_t{tag}_xt"], jnp.float32),
                        jnp.float32(t), labels)
        return tuple(np.asarray(o) for o in out)
    return g.memo(("vel", tag, conditional), run)


@case(r"vel_t([0-9p]+)_(logits|x1)(_uncond)?")
def _case_vel_parts(g: Golden, key, m):
    tag, part, uncond = m.groups()
    logits, x1, _ = _velocity_outputs(g, tag, uncond is None)
    if part == "logits":
        yield compare(key, logits, g[key], TOL_LOGITS)
        if _tag_value(tag) == 0.0:
            yield from _t0_own_base(g, key, logits)
    else:
        yield compare(key, x1, g[key], TOL_REPR)


@case(r"vel_t([0-9p]+)(_cond|_uncond|_guided)?")
def _case_vel(g: Golden, key, m):
    tag, kind = m.groups()
    if kind == "_guided":
        gp = g.settings.nstep_guidance_parameter
        ours = diffusion.guidance_mix(_velocity_outputs(g, tag, True)[2], _velocity_outputs(g, tag, False)[2],
                                      1.0 if gp is None else gp)
    else:
        ours = _velocity_outputs(g, tag, kind != "_uncond")[2]
    yield compare(key, ours, g[key], TOL_TRAJ)


# ---- nstep inference (CASE 5)

_NSTEP = r"nstep_(?:(noprecompute|lasttok|uncond)_)?(\w+?)_s(\d+)_T([0-9pm]+)_(traj|final_logits|tgrid)"


def _nstep_outputs(g: Golden, variant: str, method: str, n: int, temperature: float, conditional: bool):
    # one compiled program per (variant, method): N and T are run-time values
    max_points = max([8] + [int(k.group(3)) for k in map(lambda s: re.fullmatch(_NSTEP, s), g.cases) if k])

    def run():
        traj, logits = _nstep(*g.split, jnp.asarray(g["nstep_input_ids"]), jnp.asarray(g["nstep_init"], jnp.float32),
                              jnp.int32(n), jnp.float32(temperature), g.class_labels() if conditional else None,
                              method=method, max_points=max_points, variant=variant)
        return np.asarray(traj)[:n], np.asarray(logits)
    return g.memo(("nstep", variant, method, n, temperature, conditional), run)


@case(_NSTEP)
def _case_nstep(g: Golden, key, m):
    variant, method, n, tag, part = m.groups()
    n, temperature = int(n), _tag_value(tag)
    if part == "tgrid":
        yield compare(key, solvers.time_grid(n, 1.0), g[key], TOL_GRID)
        return
    conditional = variant != "uncond"
    variant = {"noprecompute": "noprecompute", "lasttok": "lasttok"}.get(variant, "precompute")
    traj, logits = _nstep_outputs(g, variant, method, n, temperature, conditional)
    if part == "traj":
        yield compare(key, traj, g[key], TOL_TRAJ)
    else:
        yield compare(key, logits, g[key], TOL_LOGITS)


# ---- generation (CASE 6): l2d_jax.generate with the recorded noise draws, greedy tokens

_GEN = r"gen_(hf_nstep0|dec_nstep0|hf_nstep4_prompt1|dec_nstep4|dec_nstep4_avgT1)_(ids|step_logits)"
INPUT_KEYS += [r"gen_prompt_ids", r"gen_\w+_noise"]


def _gen_outputs(g: Golden, run_name: str):
    """(new ids (1, N), per-step logits (1, N, V), prompt used) of one recorded generation."""
    from l2d_jax import generate as gen
    from l2d_jax.nstep import ODEOptions
    from l2d_jax.sampling import Sampler

    def run():
        prompt = np.asarray(g["gen_prompt_ids"])
        if run_name == "hf_nstep4_prompt1":
            prompt = prompt[:, :1]  # the original's HF generate path runs only with a 1-token prompt
        ids_key = f"gen_{run_name}_ids"
        n_new = g[ids_key].shape[1] - (prompt.shape[1] if run_name.startswith("hf_") else 0)
        ode_steps = 0 if "nstep0" in run_name else 4
        s = g.settings
        overrides = dict(x1_estimation="average", temperature=1.0) if run_name.endswith("avgT1") else {}
        opts = gen.GenerateOptions(max_new_tokens=n_new, ode=ODEOptions.from_settings(s, **overrides),
                                   max_ode_points=4, return_logits=True)  # nstep0 and nstep4 share a program
        # decoding_util is called with class_labels=[1] in guidance sets; HF generate gets none
        labels = [1] if (s.use_guidance and run_name.startswith("dec_")) else None
        noise = g.get(f"gen_{run_name}_noise")
        ids, mask = gen.left_pad([prompt[0].tolist()], pad_id=0)
        out = gen.generate(g.model, ids, mask, ode_steps=ode_steps, sampler=Sampler(0.0),
                           class_labels=labels, init_noise=noise if ode_steps else None, eos_id=-1, opts=opts)
        return np.asarray(out.tokens), np.asarray(out.logits), prompt
    return g.memo(("gen", run_name), run)


@case(_GEN)
def _case_gen(g: Golden, key, m):
    run_name, part = m.groups()
    tokens, logits, prompt = _gen_outputs(g, run_name)
    if part == "step_logits":
        yield compare(key, logits, g[key], TOL_LOGITS)
    elif run_name.startswith("hf_"):
        yield compare_ids(key, np.concatenate([prompt, tokens], axis=1), g[key])
    else:
        yield compare_ids(key, tokens, g[key])


# --------------------------------------------------------------------------- gradients


def _grad_cases(g: Golden) -> tuple[list[CaseResult], list[str], list[dict]]:
    """(results, unknown names, skipped) for train_grads.npz."""
    model = g.model
    cls = g.class_labels()
    if cls is not None and "train_guidance_drop_uniform" in g.cases:
        s = g.settings
        cls = guidance_dropout(cls, jnp.asarray(g["train_guidance_drop_uniform"]), s.guidance_modulation_num_classes,
                               s.guidance_modulation_training_dropout)
    grads = train_grads(model, jnp.asarray(g["train_input_ids"]), jnp.asarray(g["train_labels"]),
                        jnp.asarray(g["train_timesteps"]), jnp.asarray(g["train_noise"]), class_labels=cls)
    ours = grads_by_original_name(model, grads)
    results, skipped = [], []
    for name, value in ours.items():
        if name not in g.grads:
            skipped.append({"name": f"train_grads.npz:{name}", "reason": "absent from train_grads.npz"})
            continue
        results.append(compare(f"train_grads.npz:{name}", value, g.grads[name], TOL_GRAD))
    unknown = [f"train_grads.npz:{k}" for k in g.grads if k not in ours]
    return results, unknown, skipped


# --------------------------------------------------------------------------- expected keys

# Outputs the README lists; one that is absent from cases.npz is reported as skipped.
BASE_ONLY_EXPECTED = ["base_pad_logits_hf", "base_logits_hf", "base_long_logits_hf"]
_VEL_TAGS = ("t0", "t0p25", "t0p7")
L2D_EXPECTED = (
    ["base_pad_logits_hf", "base_logits_hf", "base_logits_wrapper_noflow", "fwd_target_repr",
     "fwd_flow_representation_embeds", "fwd_logits", "fwd_logits_t0", "train_flow_representation_embeds",
     "train_logits", "train_loss", "train_token_losses", "train_unshifted_logits", "train_unshifted_loss",
     "repr_tokens", "repr_table", "repr_weighted_T1p0", "repr_weighted_T0p5", "repr_weighted_T0_argmax",
     "repr_weighted_T1p0_normalized", "nstep_noprecompute_midpoint_s4_T1p0_traj",
     "nstep_lasttok_midpoint_s4_T1p0_traj", "nstep_lasttok_midpoint_s4_T1p0_final_logits"]
    + [f"vel_{t}_{p}" for t in _VEL_TAGS for p in ("logits", "x1")]
    + [f"nstep_{m}_s{n}_{T}_{p}" for m in ("euler", "midpoint") for n in (2, 4, 8) for T in ("T1p0", "T0p5")
       for p in ("traj", "tgrid", "final_logits")]
    + [f"gen_{r}_{p}" for r in ("dec_nstep0", "hf_nstep4_prompt1", "dec_nstep4", "dec_nstep4_avgT1")
       for p in ("ids", "step_logits")] + ["gen_hf_nstep0_ids"])
L2D_EXPECTED_PLAIN = [f"vel_{t}" for t in _VEL_TAGS]
L2D_EXPECTED_GUIDANCE = (
    ["fwd_logits_uncond", "train_class_labels_after_dropout", "nstep_uncond_midpoint_s4_T1p0_traj",
     "nstep_uncond_midpoint_s4_T1p0_final_logits"]
    + [f"vel_{t}_{p}" for t in _VEL_TAGS for p in ("logits_uncond", "x1_uncond", "cond", "uncond", "guided")])


def expected_keys(g: Golden) -> list[str]:
    if not g.is_l2d:
        return BASE_ONLY_EXPECTED
    guided = "class_labels" in g.cases
    return L2D_EXPECTED + (L2D_EXPECTED_GUIDANCE if guided else L2D_EXPECTED_PLAIN)


# --------------------------------------------------------------------------- driver


def classify(key: str) -> tuple[str, object]:
    """("case", (pattern, match)) | ("input", None) | ("skip", reason) | ("unknown", None)."""
    for pattern, _ in CASE_HANDLERS.items():
        m = re.fullmatch(pattern, key)
        if m:
            return "case", (pattern, m)
    if any(re.fullmatch(p, key) for p in INPUT_KEYS):
        return "input", None
    for pattern, reason in SKIPPED_KEYS.items():
        if re.fullmatch(pattern, key):
            return "skip", reason
    return "unknown", None


def verify_golden(path: str | Path, *, report: Callable[[str], None] | None = None) -> dict:
    """Checks every known case of a golden folder. Returns the JSON report
    ``{"set", "cases": [{"name", "err", "tol", "passed"}], "skipped", "unknown_keys", "passed"}``;
    ``passed`` is True only if every checked case passed, at least one was checked and no key
    is unknown. ``report`` receives one line per case."""
    report = report or (lambda line: None)
    g = Golden(path)
    results: list[CaseResult] = []
    skipped: list[dict] = []
    unknown: list[str] = []
    for key in expected_keys(g):
        if key not in g.cases:
            skipped.append({"name": key, "reason": "absent from cases.npz"})
            report(f"{key:58s} skipped: absent from cases.npz")
    for key in sorted(g.cases):
        kind, info = classify(key)
        if kind == "input":
            continue
        if kind == "skip":
            skipped.append({"name": key, "reason": info})
            report(f"{key:58s} skipped: {info}")
            continue
        if kind == "unknown":
            unknown.append(key)
            report(f"{key:58s} UNKNOWN key: the verifier does not know this case")
            continue
        pattern, m = info
        try:
            new = list(CASE_HANDLERS[pattern](g, key, m))
        except Exception as e:  # one broken case must not hide the others
            msg = " ".join(str(e).split()) or type(e).__name__
            new = [CaseResult(key, None, math.nan, False, f"error: {type(e).__name__}: {msg}")]
            if not isinstance(e, (L2DError, KeyError, ValueError)):
                traceback.print_exc()
        for r in new:
            results.append(r)
            report(_line(r))
    if g.grads is not None:
        try:
            grad_results, grad_unknown, grad_skipped = _grad_cases(g)
        except Exception as e:
            msg = " ".join(str(e).split()) or type(e).__name__
            grad_results, grad_unknown, grad_skipped = [
                CaseResult("train_grads.npz", None, TOL_GRAD, False, f"error: {type(e).__name__}: {msg}")], [], []
        for r in grad_results:
            results.append(r)
            report(_line(r))
        unknown += grad_unknown
        skipped += grad_skipped
        for k in grad_unknown:
            report(f"{k:58s} UNKNOWN parameter: not a trainable parameter of these settings")
    elif g.is_l2d:
        skipped.append({"name": "train_grads.npz", "reason": "absent from the folder"})
        report("train_grads.npz: absent, gradients not checked")
    passed = bool(results) and all(r.passed for r in results) and not unknown
    summary = {"set": g.dir.name, "cases": [r.to_json() for r in results], "skipped": skipped,
               "unknown_keys": unknown, "passed": passed}
    n_fail = sum(not r.passed for r in results)
    report(f"{g.dir.name}: {len(results)} case(s) checked, {n_fail} failed, {len(skipped)} skipped, "
           f"{len(unknown)} unknown key(s): {'PASS' if passed else 'FAIL'}")
    return summary


def _line(r: CaseResult) -> str:
    err = "n/a" if r.err is None else f"{r.err:.3e}"
    tail = f"  ({r.note})" if r.note else ""
    return f"{r.name:58s} err={err:>10s}  tol={r.tol:.0e}  {'pass' if r.passed else 'FAIL'}{tail}"


def write_json(summary: dict, path: str | Path) -> None:
    def clean(x):
        return None if isinstance(x, float) and not math.isfinite(x) else x

    summary = dict(summary, cases=[{k: clean(v) for k, v in c.items()} for c in summary["cases"]])
    Path(path).write_text(json.dumps(summary, indent=2))
