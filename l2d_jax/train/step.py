"""The L2D training loss and ONE jitted, sharded optimizer step (spec sections 2, 9, 10).

Pieces, from the inside out:

- ``loss_terms``: per-token cross entropies of one (micro-)batch. Samples t per token
  (noise schedule, ``minimum_training_noise``), eps ~ N(0, I), the guidance class dropout per
  POSITION (training mode), builds ``x_t = (1 - t) sigma eps + t phi(labels)`` with gradients
  flowing into phi through the target (not detached), runs the model and takes CE over the
  non-ignored tokens. Shifted labels by default; ``shifted_labels=False`` is the HF-style
  branch of ``diffusion.flow_targets`` / ``loss_for_labels``.
- ``Trainer``: splits an ``L2DModel`` into the trainable half (the ``flow`` parameters, or
  everything with ``base_params_to_freeze == "none"``) and the frozen rest, places both on a
  ``(data, fsdp, tensor)`` mesh by the logical-axis rules, and jits
  ``train_step(state, frozen, batch) -> (state, metrics)`` with explicit in/out shardings
  and the state donated. The frozen base is an argument of its own: it is neither donated,
  nor differentiated, nor given optimizer state, so its buffers are bit-identical after any
  number of steps.

Mixed precision: trainable parameters are float32 master copies; the model casts every
parameter to its compute dtype at use (``LLMConfig.dtype``: bfloat16 runs compute in bf16,
gradients come back in float32). The frozen base stays in its own ``param_dtype``.

Rematerialisation (``remat``, a named policy of ``block.REMAT_POLICIES`` applied to the
scanned decoder block, main + flow stream): ``"none"`` keeps every activation; ``"full"``
keeps only each layer's inputs and recomputes the rest in the backward pass;
``"save_dots"`` keeps the projections' outputs and recomputes the cheap ops around them.
Configs say ``remat_policy``; ``remat=True`` / ``False`` (and the old ``"layer"``) are
aliases of ``"full"`` / ``"none"``.

Sharding: parameters live sharded by the logical-axis rules (``l2d_jax.sharding``); inside
the step they are gathered over data/fsdp for the computation (FSDP; see ``Trainer``), the
batch is split over (data, fsdp), and the optimizer state is sharded like the parameters.

Batches: one optimizer step takes ``n_samples_before_backprop`` rows (global), shaped
``(A, M, T)`` with ``M = micro_batch_size * dp`` rows per micro-step (``dp = data * fsdp``
mesh devices) and ``A = n_samples_before_backprop / M`` accumulation steps, which run inside
the jitted step in a ``lax.scan``. Sizes that do not divide fail early, naming the numbers.

Loss normalisation (``loss_normalization``):

- ``"micro_batch_mean"`` (the original): the rows are cut into groups of
  ``micro_batch_size`` consecutive rows (what one device of the original holds for one
  micro-step); each group's loss is its token mean; the step's loss is the mean over the
  groups. The result does not depend on the mesh. The original's DeepSpeed engine divides
  each micro-batch loss by the accumulation count and then, a quirk, divides again when
  accumulating, so its gradient is this mean divided by A (harmless under Adam apart from
  eps and the clipping threshold). WE TAKE THE CLEAN MEAN GRADIENT (no second division).
  Groups without any non-ignored token (padding rows) are left out of the mean (the
  original would produce NaN for them).
- ``"token_weighted"``: sum of token losses over the whole step / number of tokens.

Randomness: the step's key is ``fold_in(state.key, state.step)``; row r of the step batch
draws its t, eps and guidance dropout from ``fold_in(step key, r)`` (``row_keys``), so the
draws, and with them the loss, depend neither on the mesh nor on the accumulation count.

Non-finite loss or gradient norm: the update is skipped (parameters, optimizer state and
step stay as they were) and ``metrics["finite"]`` is False; the training loop stops on it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from l2d_jax import diffusion, sharding as shd
from l2d_jax.errors import L2DError, UsageError
from l2d_jax.models.block import REMAT_POLICIES
from l2d_jax.models.l2d import FLOW, broadcast_labels, broadcast_t

LOSS_NORMALIZATIONS = ("micro_batch_mean", "token_weighted")
REMAT_ALIASES = {True: "full", False: "none", None: "none", "layer": "full"}
BATCH_AXES = ("data", "fsdp")


class BatchSizeError(L2DError, ValueError):
    """Batch sizes that do not fit the mesh or each other."""


# --------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The static settings of the step (hashable; part of the compiled program)."""

    micro_batch_size: int  # rows per data-parallel device per micro-step
    n_samples_before_backprop: int  # rows per optimizer step, global
    loss_normalization: str = "micro_batch_mean"
    shifted_labels: bool = True
    remat: str = "none"
    num_t_bins: int = 0

    def __post_init__(self):
        if self.loss_normalization not in LOSS_NORMALIZATIONS:
            raise UsageError(f"loss_normalization must be one of {LOSS_NORMALIZATIONS}, "
                             f"got {self.loss_normalization!r}")
        if self.remat not in REMAT_POLICIES:
            raise UsageError(f"remat_policy must be one of {tuple(REMAT_POLICIES)} (remat=True/False are "
                             f"aliases of 'full' / 'none'), got {self.remat!r}")
        if self.micro_batch_size < 1 or self.n_samples_before_backprop < 1:
            raise BatchSizeError(f"micro_batch_size ({self.micro_batch_size}) and n_samples_before_backprop "
                                 f"({self.n_samples_before_backprop}) must be >= 1")

    @classmethod
    def from_config(cls, cfg: Mapping) -> "StepConfig":
        return cls(micro_batch_size=int(cfg["micro_batch_size"]),
                   n_samples_before_backprop=int(cfg.get("n_samples_before_backprop")
                                                 or cfg["micro_batch_size"]),
                   loss_normalization=cfg.get("loss_normalization", "micro_batch_mean"),
                   shifted_labels=bool(cfg.get("shifted_labels", True)), remat=remat_policy(cfg),
                   num_t_bins=int(cfg.get("num_t_bins") or 0))


def remat_policy(cfg: Mapping) -> str:
    """The config's rematerialisation policy: ``remat_policy`` when set, else ``remat`` read
    through ``REMAT_ALIASES`` (True: "full", False: "none")."""
    policy = cfg.get("remat_policy") or None
    if policy is None:
        remat = cfg.get("remat", "none")
        policy = REMAT_ALIASES.get(remat, remat)
    return policy


def accumulation_steps(step_cfg: StepConfig, mesh: Mesh) -> tuple[int, int]:
    """(A, M): accumulation steps per optimizer step and rows per micro-step. Raises
    BatchSizeError naming the numbers when they do not divide."""
    dp = shd.data_parallel_size(mesh)
    m = step_cfg.micro_batch_size * dp
    n = step_cfg.n_samples_before_backprop
    if n % m:
        raise BatchSizeError(
            f"n_samples_before_backprop={n} is not a multiple of micro_batch_size={step_cfg.micro_batch_size} "
            f"x data-parallel devices {dp} (mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}) = {m}")
    return n // m, m


# --------------------------------------------------------------------------- the loss


class LossTerms(NamedTuple):
    losses: jax.Array  # (B, T') float32 per-token CE, 0 where ignored
    valid: jax.Array  # (B, T') bool
    t: jax.Array  # (B, T') the noise level of each loss position
    logits: jax.Array  # (B, T, V) float32


def guidance_dropout(class_labels: jax.Array, num_classes: int, p: float, keys: jax.Array) -> jax.Array:
    """(B, T) labels with each POSITION replaced by the null class (num_classes) w.p. p;
    keys (B, 2), one per row."""
    n = class_labels.shape[1]
    drop = jax.vmap(lambda k: jax.random.uniform(k, (n,)))(keys) < p
    return jnp.where(drop, num_classes, class_labels)


def forward(model, input_ids: jax.Array, t: jax.Array, x_t: jax.Array, class_labels=None, *,
            remat: str = "none") -> jax.Array:
    """Training forward (main + flow streams, no cache): logits (B, T, V) float32; ``remat``:
    the scanned block's rematerialisation policy."""
    return model(input_ids, t, x_t, class_labels=class_labels, remat=remat).logits


def row_keys(key: jax.Array, first_row, n: int) -> jax.Array:
    """(n, 2) keys ``fold_in(key, first_row + i)``: one per row of a step batch, so a row's
    draws do not depend on how rows are grouped into micro-steps or laid out on the mesh."""
    return jax.vmap(lambda r: jax.random.fold_in(key, r))(first_row + jnp.arange(n))


def loss_terms(model, input_ids: jax.Array, labels: jax.Array, key: jax.Array | None = None, *,
               class_labels: jax.Array | None = None, shifted: bool = True, train: bool = True,
               t: jax.Array | None = None, noise: jax.Array | None = None,
               remat: str = "none") -> LossTerms:
    """Per-token L2D losses of one batch. input_ids, labels (B, T) (labels -100 = ignored).

    ``key``: one key per row (B, 2) (see ``row_keys``) or one key (2,) (split into rows);
    each row draws its t (T,), noise (T, D) and guidance dropout (T,) from its own key.
    ``t`` (B, T) and ``noise`` (B, T, D) standard normal may be given instead (tests,
    goldens). ``class_labels`` (B,) or None; in training mode each position's class is
    dropped to the null class w.p. ``guidance_modulation_training_dropout``.
    """
    s = model.settings
    b, n = input_ids.shape
    dt = jnp.dtype(model.cfg.dtype)
    d = s.flow_dim(model.cfg.hidden_size)
    if key is not None and key.ndim == 1:
        key = jax.random.split(key, b)
    keys = None if key is None else jax.vmap(lambda k: jax.random.split(k, 3))(key)  # (B, 3, 2)
    if t is None:
        t = jax.vmap(lambda k: diffusion.sample_timesteps(k, (n,), s.noise_schedule,
                                                          s.minimum_training_noise or 0.0))(keys[:, 0])
    t = broadcast_t(t, b, n)
    targets, flow_mask = diffusion.flow_targets(labels, shifted)
    x1 = model.flow_representation(targets)  # gradients flow into phi through the target
    if noise is None:
        noise = jax.vmap(lambda k: jax.random.normal(k, (n, d), jnp.float32))(keys[:, 1])
    x_t = diffusion.interpolate(noise, x1, t, s.noise_rescaling, dt)
    if not shifted:
        x_t = jnp.where(flow_mask[..., None], x_t, jnp.zeros_like(x_t))
    if s.use_guidance and class_labels is not None:
        class_labels = broadcast_labels(class_labels, b, n)
        if train:
            class_labels = guidance_dropout(class_labels, s.guidance_modulation_num_classes,
                                            s.guidance_modulation_training_dropout, keys[:, 2])
    elif not s.use_guidance:
        class_labels = None
    logits = forward(model, input_ids, t, x_t, class_labels, remat=remat)
    _, losses = diffusion.loss_for_labels(logits, labels, shifted)
    valid = (labels if shifted else labels[:, 1:]) != -100
    return LossTerms(losses, valid, t if shifted else t[:, :-1], logits)


def t_bins(t: jax.Array, num_bins: int) -> jax.Array:
    """Bin index of each t as the original's ``calculate_binned_losses`` (bucketize of
    linspace(0, 1, n+1) with the last edge + 1e-6, right=True, minus 1)."""
    edges = np.linspace(0.0, 1.0, num_bins + 1).astype(np.float32)
    edges[-1] += 1e-6
    return jnp.searchsorted(jnp.asarray(edges), t, side="right") - 1


def binned_sums(losses: jax.Array, valid: jax.Array, t: jax.Array, num_bins: int) -> tuple[jax.Array, jax.Array]:
    """(loss sums (n,), token counts (n,)) per t bin over the valid tokens."""
    onehot = jax.nn.one_hot(t_bins(t, num_bins), num_bins, dtype=jnp.float32) * valid[..., None]
    return (onehot * losses[..., None]).sum(axis=(0, 1)), onehot.sum(axis=(0, 1))


# --------------------------------------------------------------------------- state


class TrainState(NamedTuple):
    """The donated, checkpointed training state (a pytree). Base params live outside it."""

    step: jax.Array  # int32 (): optimizer updates applied
    params: dict  # trainable parameters (pure dict, top-level "flow" and maybe "base"), float32
    opt_state: Any
    key: jax.Array  # uint32 (2,): the run key; step keys are fold_in(key, step)


def _strip_value(path: str) -> str:
    return path[:-len(".value")] if path.endswith(".value") else path


class _Half:
    """One half (trainable or frozen) of the model state: nnx.State <-> pure dict."""

    def __init__(self, state: nnx.State):
        self.treedef = jax.tree.structure(state)
        pure = nnx.to_pure_dict(state)
        a = [_strip_value(jax.tree_util.keystr(p)) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
        b = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(pure)[0]]
        if a != b:  # leaf orders must agree for to_state
            raise AssertionError("nnx.State and its pure dict flatten in different orders")
        self.pure_treedef = jax.tree.structure(pure)

    def to_state(self, pure) -> nnx.State:
        return jax.tree.unflatten(self.treedef, jax.tree.leaves(pure))


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """Splits the model, holds the shardings and the jitted steps. See the module doc.

    model: an ``L2DModel`` (its parameters are taken as the initial values); tx: an optax
    transformation (``optim.make_optimizer``); schedule: the lr as a function of the update
    count (for the metrics); mesh, rules: where things go.
    """

    def __init__(self, model, step_cfg: StepConfig, tx: optax.GradientTransformation,
                 schedule: Callable | None, mesh: Mesh, rules=shd.RULES, *, return_grads: bool = False):
        self.settings, self.llm_cfg = model.settings, model.cfg
        self.step_cfg, self.tx, self.schedule, self.mesh, self.rules = step_cfg, tx, schedule, mesh, rules
        self.return_grads = return_grads  # tests: metrics["grads"] = the accumulated gradient
        self.accum, self.micro_rows = accumulation_steps(step_cfg, mesh)
        self.train_base = model.settings.base_params_to_freeze == "none"
        trainable = nnx.Param if self.train_base else FLOW
        self.graphdef, train_state, frozen_state = nnx.split(model, trainable, ...)
        self._train, self._frozen = _Half(train_state), _Half(frozen_state)

        def shardings(state, compute=False):  # pure dicts like the halves' parameters
            return nnx.to_pure_dict(shd.state_shardings(state, mesh, rules, compute=compute)) \
                if jax.tree.leaves(state) else {}

        self.param_shardings, self.frozen_shardings = shardings(train_state), shardings(frozen_state)
        self._init_params = nnx.to_pure_dict(train_state)
        self._init_frozen = nnx.to_pure_dict(frozen_state)
        self.replicated = NamedSharding(mesh, P())
        # FSDP: parameters (trainable and frozen) are stored sharded over fsdp (and tensor)
        # and gathered over data/fsdp for the computation inside the step (the gradients are
        # reduce-scattered back), keeping only the tensor-parallel split: the stacked decoder
        # layers one layer at a time inside the scan (``sharding.gather_layers``: at most a
        # layer or two is whole on a device), the rest (embedding, head, small MLPs) up front.
        # Besides being the usual FSDP schedule, gathering avoids an XLA SPMD miscompile seen
        # with jax 0.10.2 on CPU: with weights sharded (fsdp, tensor) used directly by the
        # backward pass while the batch is sharded over (data, fsdp), on a (2, 2, 2) mesh,
        # gradients came out wrong (tests/test_train_step.py checks every mesh against one device).
        self.compute_shardings = shardings(train_state, compute=True)
        self.frozen_compute_shardings = shardings(frozen_state, compute=True)
        abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), self._init_params)
        abstract_opt = jax.eval_shape(tx.init, abstract_params)
        opt_shardings = optax.tree_utils.tree_map_params(
            tx, lambda _, sh: sh, abstract_opt, self.param_shardings,
            transform_non_params=lambda _: self.replicated)
        self.state_shardings = TrainState(self.replicated, self.param_shardings, opt_shardings, self.replicated)
        self.abstract_state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), abstract_params, abstract_opt,
                                         jax.ShapeDtypeStruct((2,), jnp.uint32))
        metric_shardings = self.replicated
        if return_grads:  # a dict prefix: every metric replicated, the gradients like the params
            metric_shardings = None
        self.train_step = jax.jit(self._train_step, in_shardings=(self.state_shardings, self.frozen_shardings,
                                                                  self.batch_shardings(accumulated=True)),
                                  out_shardings=(self.state_shardings, metric_shardings), donate_argnums=(0,))
        self._eval_fns: dict = {}

    # ---------------------------------------------------------------- placement

    def batch_shardings(self, accumulated: bool = True) -> dict:
        """Shardings of the batch dict; ``class_labels`` only with guidance."""
        lead = (None,) if accumulated else ()
        out = {"input_ids": NamedSharding(self.mesh, P(*lead, BATCH_AXES, None)),
               "labels": NamedSharding(self.mesh, P(*lead, BATCH_AXES, None))}
        if self.settings.use_guidance:
            out["class_labels"] = NamedSharding(self.mesh, P(*lead, BATCH_AXES))
        return out

    def abstract_state_with_shardings(self) -> TrainState:
        """ShapeDtypeStructs carrying this mesh's NamedShardings (restore targets)."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract_state, self.state_shardings)

    def init_state(self, seed_or_key) -> TrainState:
        """Initial state from the model's parameters (cast to float32), placed on the mesh."""
        key = (jax.random.PRNGKey(seed_or_key) if isinstance(seed_or_key, (int, np.integer))
               else jnp.asarray(seed_or_key, jnp.uint32))
        # a jitted cast: always fresh buffers, so donating the state never frees the model's arrays
        params = jax.jit(lambda p: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), p),
                         out_shardings=self.param_shardings)(self._init_params)
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings.opt_state)(params)
        return TrainState(jax.device_put(jnp.int32(0), self.replicated), params, opt_state,
                          jax.device_put(key, self.replicated))

    def frozen_params(self) -> dict:
        """The frozen half (the base, unless it trains), placed on the mesh."""
        return jax.device_put(self._init_frozen, self.frozen_shardings)

    def release_model_copies(self) -> None:
        """Drops the references to the initial parameter values (after init_state and
        frozen_params have placed them), so host/device memory can be freed."""
        self._init_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self._init_params)
        self._init_frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self._init_frozen)

    def model(self, params: Mapping, frozen: Mapping):
        """An L2DModel from trainable + frozen pure dicts (inside or outside jit)."""
        return nnx.merge(self.graphdef, self._train.to_state(params), self._frozen.to_state(frozen))

    def shape_batch(self, input_ids: np.ndarray, labels: np.ndarray, class_labels=None,
                    accumulated: bool = True) -> dict:
        """Host arrays of one step (rows = n_samples_before_backprop, or M for eval) ->
        the jit's batch dict, reshaped to (A, M, T) and placed on the mesh. Multi-host:
        each process passes its own rows (make_array_from_process_local_data)."""
        input_ids = np.asarray(input_ids, np.int32)
        rows_local = input_ids.shape[0]
        nproc = jax.process_count()
        rows = rows_local * nproc
        want = self.step_cfg.n_samples_before_backprop if accumulated else self.micro_rows
        if accumulated and rows != want:
            raise BatchSizeError(f"a step batch has {rows} rows, n_samples_before_backprop is {want}")
        dp = shd.data_parallel_size(self.mesh)
        if not accumulated and rows % dp:
            raise BatchSizeError(f"an eval batch has {rows} rows, not a multiple of the data-parallel "
                                 f"devices (mesh data x fsdp = {dp})")
        arrays = {"input_ids": input_ids, "labels": np.asarray(labels, np.int32)}
        if self.settings.use_guidance:  # no class labels: the null class (unconditional)
            null = self.settings.guidance_modulation_num_classes
            arrays["class_labels"] = (np.full((rows_local,), null, np.int32) if class_labels is None
                                      else np.asarray(class_labels, np.int32))
        out = {}
        shardings = self.batch_shardings(accumulated)
        for name, a in arrays.items():
            if accumulated:
                a = a.reshape((self.accum, self.micro_rows // nproc) + a.shape[1:])
                global_shape = (self.accum, self.micro_rows) + a.shape[2:]
            else:
                global_shape = (rows,) + a.shape[1:]
            out[name] = jax.make_array_from_process_local_data(shardings[name], a, global_shape)
        return out

    # ---------------------------------------------------------------- the step

    def _objective_parts(self, step_labels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(number of non-empty micro_batch_size groups, number of tokens) of a step batch."""
        valid = step_labels != -100
        if not self.step_cfg.shifted_labels:
            valid = valid[..., 1:]
        per_row = valid.sum(-1)  # (A, M)
        groups = per_row.reshape(-1, self.step_cfg.micro_batch_size).sum(-1)
        return (groups > 0).sum().astype(jnp.float32), per_row.sum().astype(jnp.float32)

    def _contribution(self, terms: LossTerms, n_groups, n_tokens) -> jax.Array:
        """This micro-step's share of the step objective (its gradient is accumulated)."""
        if self.step_cfg.loss_normalization == "token_weighted":
            return terms.losses.sum() / jnp.maximum(n_tokens, 1.0)
        mb = self.step_cfg.micro_batch_size
        sums = terms.losses.reshape(-1, mb * terms.losses.shape[-1]).sum(-1)
        counts = terms.valid.reshape(-1, mb * terms.valid.shape[-1]).sum(-1)
        means = jnp.where(counts > 0, sums / jnp.maximum(counts, 1), 0.0)
        return means.sum() / jnp.maximum(n_groups, 1.0)

    def _train_step(self, state: TrainState, frozen: dict, batch: dict):
        cfg = self.step_cfg
        key = jax.random.fold_in(state.key, state.step)
        n_groups, n_tokens = self._objective_parts(batch["labels"])
        row_sharding = NamedSharding(self.mesh, P(BATCH_AXES, None))
        nb = max(cfg.num_t_bins, 1)

        def objective(params, mb, k):
            params = jax.tree.map(jax.lax.with_sharding_constraint, params, self.compute_shardings)
            gathered = jax.tree.map(jax.lax.with_sharding_constraint, frozen, self.frozen_compute_shardings)
            model = self.model(params, gathered)
            with shd.gather_layers(self.mesh, self.rules):
                terms = loss_terms(model, mb["input_ids"], mb["labels"], k, class_labels=mb.get("class_labels"),
                                   shifted=cfg.shifted_labels, train=True, remat=cfg.remat)
            return self._contribution(terms, n_groups, n_tokens), terms._replace(logits=None)

        def micro(carry, xs):
            grads, loss, token_sum, bins_l, bins_c = carry
            mb, a = xs
            mb = {k: jax.lax.with_sharding_constraint(v, row_sharding if v.ndim == 2 else
                                                      NamedSharding(self.mesh, P(BATCH_AXES)))
                  for k, v in mb.items()}
            keys = row_keys(key, a * self.micro_rows, self.micro_rows)
            (c, terms), g = jax.value_and_grad(objective, has_aux=True)(state.params, mb, keys)
            if cfg.num_t_bins:
                bl, bc = binned_sums(terms.losses, terms.valid, terms.t, nb)
                bins_l, bins_c = bins_l + bl, bins_c + bc
            grads = jax.tree.map(jnp.add, grads, g)
            return (grads, loss + c, token_sum + terms.losses.sum(), bins_l, bins_c), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        init = (zeros, jnp.float32(0), jnp.float32(0), jnp.zeros(nb), jnp.zeros(nb))
        (grads, loss, token_sum, bins_l, bins_c), _ = jax.lax.scan(
            micro, init, (batch, jnp.arange(self.accum)))
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = TrainState(state.step + 1, params, opt_state, state.key)
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        metrics = {"loss": loss, "token_loss": token_sum / jnp.maximum(n_tokens, 1.0), "n_tokens": n_tokens,
                   "grad_norm": grad_norm, "finite": finite,
                   "lr": (self.schedule(state.step) if self.schedule is not None else jnp.float32(0))}
        if cfg.num_t_bins:
            metrics["binned_loss_sum"], metrics["binned_count"] = bins_l, bins_c
        if self.return_grads:
            metrics["grads"] = grads
        return new, metrics

    # ---------------------------------------------------------------- evaluation

    def eval_step(self, params: Mapping, frozen: Mapping, batch: dict, key: jax.Array,
                  nstep_points: int = 0, ode_options=None) -> dict:
        """Validation sums of one batch (rows a multiple of data x fsdp): loss_sum, n_tokens, prob_sum
        (probability of the label at temperature 1), greedy_correct, binned sums, and with
        ``nstep_points >= 2`` the same after an ODE of that many grid points
        (nstep_loss_sum, nstep_greedy_correct, nstep_prob_sum)."""
        sig = (int(nstep_points), ode_options)
        if sig not in self._eval_fns:
            self._eval_fns[sig] = jax.jit(
                lambda p, f, b, k: self._eval(p, f, b, k, *sig),
                in_shardings=(self.param_shardings, self.frozen_shardings, self.batch_shardings(False),
                              self.replicated), out_shardings=self.replicated)
        return self._eval_fns[sig](params, frozen, batch, key)

    def _eval(self, params, frozen, batch, key, nstep_points, ode_options):
        with shd.gather_layers(self.mesh, self.rules):  # one layer whole on a device at a time
            return self._eval_sums(params, frozen, batch, key, nstep_points, ode_options)

    def _eval_sums(self, params, frozen, batch, key, nstep_points, ode_options):
        cfg = self.step_cfg
        model = self.model(params, frozen)
        ids, labels = batch["input_ids"], batch["labels"]
        class_labels = batch.get("class_labels")
        k_loss, k_ode = jax.random.split(key)
        terms = loss_terms(model, ids, labels, row_keys(k_loss, 0, ids.shape[0]), class_labels=class_labels,
                           shifted=cfg.shifted_labels, train=False)
        out = {"loss_sum": terms.losses.sum(), "n_tokens": terms.valid.sum().astype(jnp.float32)}
        out.update(_accuracy_sums(terms.logits, labels, cfg.shifted_labels, prefix=""))
        if cfg.num_t_bins:
            out["binned_loss_sum"], out["binned_count"] = binned_sums(terms.losses, terms.valid, terms.t,
                                                                      cfg.num_t_bins)
        if nstep_points >= 2:
            from l2d_jax.nstep import nstep

            s = model.settings
            k_x0, k_x1 = jax.random.split(k_ode)
            d = s.flow_dim(model.cfg.hidden_size)
            x0 = jax.random.normal(k_x0, ids.shape + (d,), jnp.float32) * s.noise_rescaling
            res = nstep(model, ids, x0, nstep_points, ode_options, class_labels=class_labels, key=k_x1)
            _, nl = diffusion.loss_for_labels(res.logits, labels, cfg.shifted_labels)
            out["nstep_loss_sum"] = nl.sum()
            out.update(_accuracy_sums(res.logits, labels, cfg.shifted_labels, prefix="nstep_"))
        return out


def _accuracy_sums(logits, labels, shifted: bool, prefix: str) -> dict:
    if not shifted:
        logits, labels = logits[:, :-1], labels[:, 1:]
    valid = labels != -100
    safe = jnp.where(valid, labels, 0)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    p_label = jnp.exp(jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0])
    greedy = jnp.argmax(logits, axis=-1) == safe
    return {f"{prefix}prob_sum": jnp.where(valid, p_label, 0.0).sum(),
            f"{prefix}greedy_correct": (greedy & valid).sum().astype(jnp.float32)}
