"""``train(cfg, workdir)``: the L2D training run, restartable at any point.

Sections: setup (model, mesh, optimizer) -- checkpoints -- data -- the loop -- validation
-- export. The step itself is ``l2d_jax.train.step.Trainer``.

WORKDIR layout::

    WORKDIR/config.json          the resolved config (a restart must use the same one)
    WORKDIR/checkpoints/<step>/  orbax: ``state`` (step, trainable params, optimizer state,
                                 PRNG key), ``data`` (the training iterator's position),
                                 ``meta`` (epoch, tokens seen, mesh)
    WORKDIR/metrics.jsonl        see ``l2d_jax.train.metrics``
    WORKDIR/data_stats.json      counts of the data pipeline (examples, dropped turns, ...)
    WORKDIR/tensorboard/         TensorBoard event files
    WORKDIR/profile/             profiler traces (``profile_steps``)
    WORKDIR/export/              final weights in the converted-checkpoint layout
                                 (``l2d_jax.checkpoint``, kind "l2d"): load with
                                 ``l2d_jax.convert.loading.load_l2d`` or ``load_trained``

WORKDIR may be a local path or ``gs://bucket/path`` (``l2d_jax.storage``): checkpoints go there
through orbax (tensorstore's gcs driver, committed by orbax's marker files), the other files
through ``etils.epath``; TensorBoard events and profiler traces are written locally and
uploaded at each flush and at the end.

Restart behaviour:

- A run started on a WORKDIR that holds checkpoints resumes AUTOMATICALLY from the latest
  readable one (state, data position, PRNG key), on whatever mesh this run has: arrays are
  restored against abstract targets carrying this mesh's ``NamedSharding``.
- A latest checkpoint that cannot be read (truncated or missing files) is moved aside to
  ``checkpoints/corrupt-<step>-<time>`` with a warning, and the previous one is used.
- SIGTERM: the handler only sets a flag; the loop finishes the running step, saves a
  checkpoint (waiting for it to be written), and ``train`` returns with status
  "preempted"; the CLI then exits with ``EXIT_PREEMPTED`` (75, EX_TEMPFAIL: "try again"),
  so that schedulers can tell preemption from completion (0) and errors (2). SIGKILL
  needs nothing: the restart resumes from the last completed checkpoint.
- A non-finite loss or gradient norm stops the run with ``TrainingDiverged`` (an
  ``L2DError``: CLI exit 2) naming the step; that step's update is not applied and no
  checkpoint is written after it, so the last good checkpoint stays the latest.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax
import numpy as np

from etils import epath

from l2d_jax import checkpoint, config as config_lib, distributed, sharding as shd, storage
from l2d_jax.checkpoint import WORKDIR_CHECKPOINTS, WORKDIR_CONFIG, WORKDIR_EXPORT, save_checkpoint
from l2d_jax.convert.loading import build_base, latest_export_or_checkpoint, load_trained  # noqa: F401 (API)
from l2d_jax.errors import L2DError
from l2d_jax.models.l2d import L2DModel
from l2d_jax.nstep import FIXED_GRID, ODEOptions
from l2d_jax.train import metrics as metrics_lib, optim, step as step_lib
from l2d_jax.train.data import make_dataset
from l2d_jax.train.step import TrainState

log = logging.getLogger("l2d_jax.train")

EXIT_PREEMPTED = 75
CHECKPOINTS, EXPORT, CONFIG_JSON = WORKDIR_CHECKPOINTS, WORKDIR_EXPORT, WORKDIR_CONFIG


class TrainingDiverged(L2DError):
    """The loss (or gradient norm) became NaN or infinite."""


@dataclasses.dataclass
class TrainResult:
    status: str  # "completed" | "preempted"
    step: int  # optimizer steps done
    workdir: Path | epath.Path  # epath for a URI (gs://...)
    export_dir: Path | epath.Path | None = None
    last_checkpoint: int | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_PREEMPTED if self.status == "preempted" else 0


# --------------------------------------------------------------------------- small helpers


def _is_main() -> bool:
    return jax.process_index() == 0


def _cfg_dict(cfg) -> dict:
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return json.loads(json.dumps(d, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def llm_hf_config(llm_cfg) -> dict:
    """An HF ``config.json`` dict that ``LLMConfig.from_hf`` reads back as ``llm_cfg``."""
    hf = dict(model_type=llm_cfg.model_type, vocab_size=llm_cfg.vocab_size, hidden_size=llm_cfg.hidden_size,
              intermediate_size=llm_cfg.intermediate_size, num_hidden_layers=llm_cfg.num_layers,
              num_attention_heads=llm_cfg.num_heads, num_key_value_heads=llm_cfg.num_kv_heads,
              head_dim=llm_cfg.head_dim, rms_norm_eps=llm_cfg.rms_norm_eps, rope_theta=llm_cfg.rope_theta,
              tie_word_embeddings=llm_cfg.tie_word_embeddings, attention_bias=llm_cfg.attention_bias,
              max_position_embeddings=llm_cfg.max_position_embeddings, hidden_act="silu")
    if llm_cfg.rope_scaling is not None:
        hf["rope_scaling"] = {"rope_type": "llama3", **dict(llm_cfg.rope_scaling)}
    return hf


class _SigtermFlag:
    """Installs a SIGTERM handler that sets a flag (main thread only); restores on exit."""

    def __init__(self):
        self.set = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler
            self._old = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.set = True
        log.warning("SIGTERM received: saving a checkpoint after the current step, then exiting")

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


# --------------------------------------------------------------------------- checkpoints


class Checkpoints:
    """Orbax ``CheckpointManager`` over ``WORKDIR/checkpoints`` (items state, data, meta), local
    or ``gs://``."""

    def __init__(self, directory: str | os.PathLike, keep: int, enabled: bool = True):
        self.dir, self.keep, self.enabled = storage.as_path(directory, arrays=True), keep, enabled
        self._mgr = None
        if enabled:
            self._open()

    def _open(self):
        import orbax.checkpoint as ocp

        if self._mgr is not None:
            self._mgr.close()
        self._mgr = ocp.CheckpointManager(
            self.dir, item_names=("state", "data", "meta"),
            options=ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True,
                                                 enable_async_checkpointing=True))

    def steps(self) -> list[int]:
        return sorted(self._mgr.all_steps()) if self._mgr is not None else []

    def save(self, step: int, state, data_state: Mapping, meta: Mapping, wait: bool = False) -> None:
        """Collective (every process calls it). ``data_state``: this host's iterator position;
        orbax writes JSON from process 0 only, so the hosts' positions are gathered first."""
        import orbax.checkpoint as ocp

        if self._mgr is None:
            return
        if step in self._mgr.all_steps():  # e.g. SIGTERM right after a regular save
            return
        data_state = distributed.gather_host_states(dict(data_state))
        self._mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state._asdict()),
                                                     data=ocp.args.JsonSave(dict(data_state)),
                                                     meta=ocp.args.JsonSave(dict(meta))))
        if wait:
            self._mgr.wait_until_finished()

    def restore_latest(self, abstract_state) -> tuple[Any, dict, dict, int] | None:
        """(state, data state, meta, step) of the newest readable checkpoint, or None.
        Unreadable ones are moved aside with a warning."""
        if self._mgr is None:
            return None
        target = abstract_state._asdict()
        treedef = jax.tree.structure(abstract_state)
        for step in sorted(self._mgr.all_steps(), reverse=True):
            try:
                r = self._restore(step, target)
                restored = r["state"]
                leaves = [restored[k] for k in TrainState._fields]
                state = jax.tree.unflatten(treedef, jax.tree.leaves(leaves))
                if int(state.step) != step:
                    raise ValueError(f"checkpoint {step} holds step {int(state.step)}")
                return state, distributed.host_state(dict(r["data"] or {})), dict(r["meta"] or {}), step
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back
                msg = " ".join(str(e).split())[:300]
                log.warning("checkpoint %s/%d is unreadable (%s: %s); falling back to the previous one",
                            self.dir, step, type(e).__name__, msg)
                self._quarantine(step)
        return None

    def _restore(self, step: int, target: dict) -> dict:
        """Items of checkpoint ``step`` with the state restored onto ``target``; a state written
        before the layers were stacked (format 1: one subtree per layer in the parameters and
        the optimizer moments) is restored per layer and stacked onto the target's shardings."""
        import orbax.checkpoint as ocp

        def restore(t):
            return self._mgr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(t), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))

        try:
            return restore(target)
        except Exception as stacked_error:  # noqa: BLE001 - a format-1 state, or unreadable
            try:
                r = dict(restore(checkpoint.map_layer_stacks(target, checkpoint.per_layer_target)))
            except Exception:  # noqa: BLE001
                raise stacked_error from None
            state = checkpoint.map_layer_stacks(r["state"], checkpoint.stacked)
            r["state"] = jax.tree.map(lambda x, t: jax.device_put(x, t.sharding), state, target)
            log.info("checkpoint %s/%d was written before the layers were stacked: converted on load",
                     self.dir, step)
            return r

    def _quarantine(self, step: int) -> None:
        src = self.dir / str(step)
        if _is_main() and src.exists():
            dst = self.dir / f"corrupt-{step}-{int(time.time())}"
            src.rename(dst)  # local: os.rename; in a bucket: object by object
            log.warning("moved %s to %s", src, dst)
        distributed.sync(f"l2d_quarantine_{step}")  # every host sees the move before listing again
        self._open()

    def wait(self) -> None:
        if self._mgr is not None:
            self._mgr.wait_until_finished()

    def close(self) -> None:
        if self._mgr is not None:
            self._mgr.wait_until_finished()
            self._mgr.close()
            self._mgr = None


# --------------------------------------------------------------------------- data


def _num_examples(ds) -> int:
    """Examples over all hosts."""
    for get in (lambda: ds.global_size(), lambda: len(ds), lambda: ds.stats["examples"]):
        try:
            n = int(get())
            return n
        except (TypeError, KeyError, AttributeError):
            continue
    raise L2DError("the training dataset does not tell its size (len(dataset))")


def _pad_rows(arrays: list[np.ndarray], rows: int, fill: int) -> np.ndarray:
    """Stacks (n_i, T_i) arrays into (rows, max T), padding with ``fill``."""
    t = max(a.shape[1] for a in arrays)
    out = np.full((rows, t), fill, np.int32)
    r = 0
    for a in arrays:
        out[r:r + a.shape[0], :a.shape[1]] = a
        r += a.shape[0]
    return out


class StepBatches:
    """Micro-batches from ``dataset.batches(rows_per_host)`` (an endless stream over epochs,
    see ``l2d_jax.train.data``) grouped into optimizer steps of ``accum`` micro-batches,
    padded to their longest length (a bucket)."""

    def __init__(self, ds, rows_per_host: int, accum: int, pad_id: int, null_class: int = 0):
        self.ds, self.rows, self.accum, self.pad_id, self.null_class = ds, rows_per_host, accum, pad_id, null_class
        self._it: Iterator | None = None

    @property
    def epoch(self) -> int:
        return int(self.ds.state().get("epoch", 0))

    def next_step(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
        """(input_ids, labels, class_labels) with accum * rows_per_host rows, or None when
        the stream ends (a finite dataset)."""
        if self._it is None:
            self._it = iter(self.ds.batches(self.rows))
        ids, labels, classes = [], [], []
        for _ in range(self.accum):
            b = next(self._it, None)
            if b is None:
                break
            ids.append(np.asarray(b.input_ids, np.int32))
            labels.append(np.asarray(b.labels, np.int32))
            classes.append(None if b.class_labels is None else np.asarray(b.class_labels, np.int32))
        if not ids:
            return None
        total = self.accum * self.rows
        x = _pad_rows(ids, total, self.pad_id)
        y = _pad_rows(labels, total, -100)  # rows of a cut-short final step carry no loss
        cl = None
        if any(c is not None for c in classes):
            cl = np.full((total,), self.null_class, np.int32)
            r = 0
            for a, c in zip(ids, classes):
                if c is not None:
                    cl[r:r + a.shape[0]] = c
                r += a.shape[0]
        return x, y, cl

    def state(self) -> dict:
        return {"dataset": self.ds.state()}

    def restore(self, d: Mapping) -> None:
        if d:
            self.ds.restore(d["dataset"])
        self._it = None


# --------------------------------------------------------------------------- the run


def _resolve_interval(v, per_epoch: int) -> int:
    v = int(v)
    return max(1, math.ceil(-v * per_epoch)) if v < 0 else max(1, v)


def train(cfg, workdir: str | os.PathLike, *, config_path: str | os.PathLike | None = None,
          progress: bool = True) -> TrainResult:
    """Runs (or resumes) training as described in the module doc. Returns a TrainResult."""
    from flax import nnx

    main = _is_main()
    _setup_logging()
    wd = storage.check_access(workdir, arrays=True, write=True)  # a bad scheme or bucket fails here
    config_lib.validate_config(cfg)
    cfg_json = _cfg_dict(cfg)
    if main:
        wd.mkdir(parents=True, exist_ok=True)
        _check_same_config(wd, cfg_json)
        storage.atomic_write(wd / CONFIG_JSON, json.dumps(cfg_json, indent=2, sort_keys=True))

    # ---------------------------------------------------------------- setup
    mesh_cfg = cfg.get("mesh") or {}
    mesh = shd.make_mesh(int(mesh_cfg.get("data", -1)), int(mesh_cfg.get("fsdp", 1)),
                         int(mesh_cfg.get("tensor", 1)))
    rules = shd.rules_from_config(dict(cfg.get("sharding_rules") or {}))
    step_cfg = step_lib.StepConfig.from_config(cfg)
    step_lib.accumulation_steps(step_cfg, mesh)  # fail early on batch sizes
    log.info("mesh %s on %d devices (%s)", dict(mesh.shape), mesh.size, jax.devices()[0].platform)

    base, tokenizer = build_base(cfg)
    settings = config_lib.l2d_settings(cfg)
    if cfg.get("compute_diff_at_training"):
        log.warning("compute_diff_at_training is not implemented here; ignored")
    pad_id = _pad_id(tokenizer)

    train_ds = make_dataset(cfg, tokenizer, "train")
    _record_data_stats(wd, "train", train_ds, main)
    n_train = _num_examples(train_ds)
    if n_train == 0:
        raise L2DError("the training set is empty after filtering (check train_filepaths, "
                       "exclude_train_data_category and max_seq_len)")
    valid_ds = None
    if cfg.get("valid_filepaths"):
        valid_ds = make_dataset(cfg, tokenizer, "valid")
        _record_data_stats(wd, "valid", valid_ds, main)
    total = config_lib.total_training_steps(cfg, n_train)
    per_epoch = max(1, math.ceil(n_train / step_cfg.n_samples_before_backprop))
    log_every = _resolve_interval(cfg["log_interval"], per_epoch)
    val_every = _resolve_interval(cfg["validate_interval"], per_epoch)
    save_every = _resolve_interval(cfg.get("save_model_interval") or val_every, per_epoch)

    model = L2DModel(base, settings, rngs=nnx.Rngs(int(cfg["seed"])))
    hf_config = llm_hf_config(model.cfg)
    llm_cfg = model.cfg
    tx, schedule = optim.make_optimizer(cfg, total,
                                        mask=lambda p: optim.decay_mask(p, settings, llm_cfg))
    trainer = step_lib.Trainer(model, step_cfg, tx, schedule, mesh, rules)
    del model, base

    # ---------------------------------------------------------------- checkpoints
    ckpts = Checkpoints(wd / CHECKPOINTS, int(cfg["keep_checkpoints"]),
                        enabled=bool(cfg["save_model"]))
    data = StepBatches(train_ds, config_lib.batch_size_per_host(cfg, "train"), trainer.accum, pad_id,
                       null_class=settings.guidance_modulation_num_classes or 0)
    restored = ckpts.restore_latest(trainer.abstract_state_with_shardings())
    tokens_seen = 0
    if restored is not None:
        state, data_state, meta, at = restored
        data.restore(data_state)
        tokens_seen = int(meta.get("tokens_seen", 0))
        log.info("resumed from %s/%d (epoch %d)", ckpts.dir, at, data.epoch)
    else:
        state = trainer.init_state(int(cfg["seed"]))
        at = 0
    frozen = trainer.frozen_params()
    trainer.release_model_copies()
    last_ckpt = at if restored is not None else None

    logger = None
    if cfg["save_log"] or not main:
        if main:
            metrics_lib.truncate_jsonl(wd / metrics_lib.JSONL, at)
        wandb_cfg = None
        if cfg.get("save_wandb"):
            wandb_cfg = {"project": cfg["wandb_project"],
                         "name": config_lib.run_name(cfg, config_path), "config": cfg_json,
                         "id": config_lib.run_name(cfg, config_path)}
        logger = metrics_lib.MetricsLogger(wd, main=main, wandb_config=wandb_cfg, total_steps=total,
                                           start_step=at, progress=progress)
    profiler = metrics_lib.Profiler(wd, int(cfg.get("profile_steps") or 0), at, main=main)

    # ---------------------------------------------------------------- validation
    valid_start = None
    nstep_points = int(cfg.get("compute_nstep_loss") or 0)
    ode_opts = ODEOptions.from_settings(settings)
    if nstep_points >= 2 and ode_opts.method not in FIXED_GRID:
        log.warning("compute_nstep_loss: the validation ODE needs a fixed-grid method, not %r; skipped",
                    ode_opts.method)
        nstep_points = 0
    if nstep_points == 1:
        log.warning("compute_nstep_loss=1: an ODE needs >= 2 grid points; skipped")
        nstep_points = 0
    if valid_ds is not None:
        valid_start = valid_ds.state() if hasattr(valid_ds, "state") else None
    val_rows = config_lib.batch_size_per_host(cfg, "valid")
    eval_key = jax.random.fold_in(jax.random.PRNGKey(int(cfg["seed"])), 0x7FFFFFFF)

    def validate(at_step: int) -> dict | None:
        if valid_ds is None:
            return None
        if valid_start is not None:
            valid_ds.restore(valid_start)
        sums: dict[str, float] = {}
        t0 = time.time()
        for i, b in enumerate(valid_ds.batches(val_rows)):
            ids = _pad_rows([np.asarray(b.input_ids, np.int32)], val_rows, pad_id)
            labels = _pad_rows([np.asarray(b.labels, np.int32)], val_rows, -100)
            cl = None
            if b.class_labels is not None:
                cl = np.full((val_rows,), settings.guidance_modulation_num_classes or 0, np.int32)
                cl[:len(b.class_labels)] = np.asarray(b.class_labels)
            batch = trainer.shape_batch(ids, labels, cl, accumulated=False)
            out = trainer.eval_step(state.params, frozen, batch, jax.random.fold_in(eval_key, i),
                                    nstep_points, ode_opts if nstep_points else None)
            for k, v in jax.device_get(out).items():
                sums[k] = sums.get(k, 0.0) + np.asarray(v, np.float64)
        if not sums:
            log.warning("the validation set is empty; no validation metrics")
            return None
        scalars = metrics_lib.validation_scalars(sums, step_cfg.num_t_bins, nstep_points)
        scalars["val_s"] = time.time() - t0
        if logger is not None:
            logger.log_validation(at_step, scalars)
        log.info("validation at step %d: loss %.4f ppl %.3f acc %.4f", at_step, scalars["val_loss"],
                 scalars["val_ppl"], scalars["val_acc_greedy"])
        return scalars

    # ---------------------------------------------------------------- the loop
    window: list[dict] = []
    t_last = time.time()
    step_no = at
    status = "completed"
    pending = None  # (step number, metrics on device, positions, time dispatched)

    def process(p) -> None:
        """Host-side bookkeeping of a finished step (one step behind the dispatch)."""
        nonlocal t_last, tokens_seen
        n, met, positions = p
        met = jax.device_get(met)
        if not bool(met["finite"]):
            raise TrainingDiverged(
                f"non-finite loss at step {n} (loss={float(met['loss'])}, grad_norm={float(met['grad_norm'])}); "
                f"training stopped and that update was not applied. The last good checkpoint is "
                f"{_ckpt_text(ckpts, last_ckpt)}; lower peak_lr or check the data before restarting")
        now = time.time()
        tokens_seen += positions
        window.append({**{k: np.asarray(v) for k, v in met.items()}, "positions": positions,
                       "seconds": now - t_last})
        t_last = now
        if logger is not None:
            logger.advance()
        if n % log_every == 0 or n == total:
            secs = sum(w["seconds"] for w in window)
            scalars = {"loss": float(np.mean([w["loss"] for w in window])),
                       "lr": float(met["lr"]),
                       "tokens_per_s": sum(w["positions"] for w in window) / max(secs, 1e-9),
                       "loss_tokens_per_s": float(sum(w["n_tokens"] for w in window)) / max(secs, 1e-9),
                       "token_loss": float(np.mean([w["token_loss"] for w in window])),
                       "grad_norm": float(np.mean([w["grad_norm"] for w in window])),
                       "step_s": secs / len(window), "epoch": data.epoch, "tokens_seen": tokens_seen}
            scalars["ppl"] = metrics_lib._exp(scalars["loss"])
            if step_cfg.num_t_bins:
                scalars.update(metrics_lib.binned_scalars(sum(w["binned_loss_sum"] for w in window),
                                                          sum(w["binned_count"] for w in window), "train_"))
            if logger is not None:
                logger.log_train(n, scalars)
            window.clear()

    def save(n: int, wait: bool = False) -> None:
        nonlocal last_ckpt
        if not ckpts.enabled:
            return
        ckpts.save(n, state, data.state(), {"step": n, "epoch": data.epoch, "tokens_seen": tokens_seen,
                                             "mesh": dict(mesh.shape)}, wait=wait)
        last_ckpt = n

    try:
        with _SigtermFlag() as sigterm:
            while step_no < total:
                got = data.next_step()
                if got is None:
                    log.info("data exhausted after %d steps", step_no)
                    total = step_no
                    break
                ids, labels, classes = got
                batch = trainer.shape_batch(ids, labels, classes)
                profiler.before(step_no + 1)
                state, met = trainer.train_step(state, frozen, batch)
                step_no += 1
                if pending is not None:
                    process(pending)
                pending = (step_no, met, int(ids.shape[0] * ids.shape[1] * jax.process_count()))
                profiler.after(step_no, block_on=met)
                boundary = (step_no % val_every == 0 or step_no % save_every == 0 or step_no == total
                            or sigterm.set)
                if boundary:
                    process(pending)
                    pending = None
                if step_no % val_every == 0 or step_no == total:
                    validate(step_no)
                if sigterm.set:
                    save(step_no, wait=True)
                    status = "preempted"
                    log.warning("preempted: checkpoint %d written; exiting with code %d", step_no, EXIT_PREEMPTED)
                    break
                if step_no % save_every == 0 or step_no == total:
                    save(step_no)
                if boundary:
                    t_last = time.time()  # validation and saving do not count as step time
            if pending is not None:
                process(pending)
                pending = None
            if status == "completed" and ckpts.enabled and step_no > 0 and step_no not in ckpts.steps():
                save(step_no)
    finally:
        profiler.close()
        ckpts.close()  # waits for checkpoints being written
        if logger is not None:
            logger.close()

    # ---------------------------------------------------------------- export
    export_dir = None
    if status == "completed":
        if jax.process_count() > 1:  # arrays sharded over hosts: every host gathers (collective)
            state = state._replace(params=distributed.host_copy(state.params))
            frozen = distributed.host_copy(frozen)
        if main:
            export_dir = _export(wd, trainer, state, frozen, hf_config, tokenizer, settings, cfg)
        if jax.process_count() > 1:
            distributed.sync("l2d_export")  # the others wait for process 0's export before exiting
    return TrainResult(status, step_no, storage.native(workdir), export_dir, last_ckpt)


def _ckpt_text(ckpts: Checkpoints, step: int | None) -> str:
    return f"{ckpts.dir}/{step}" if step is not None else "none (no checkpoint was written yet)"


DATA_STATS = "data_stats.json"


def _record_data_stats(wd: epath.Path, split: str, ds, main: bool) -> None:
    """Logs the dataset's counts (examples, turns dropped as too long, ...) and keeps them in
    ``WORKDIR/data_stats.json``."""
    stats = dict(getattr(ds, "stats", {}) or {})
    log.info("%s data: %s", split, ", ".join(f"{k}={v}" for k, v in stats.items()
                                             if isinstance(v, (int, float, str))))
    if not main:
        return
    path = wd / DATA_STATS
    all_stats = json.loads(path.read_text()) if path.is_file() else {}
    all_stats[split] = json.loads(json.dumps(stats, default=str))
    storage.atomic_write(path, json.dumps(all_stats, indent=2, sort_keys=True))


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, (list, tuple)):
            v = v[0] if v else None
        if v is not None:
            return int(v)
    return 0


def _check_same_config(wd: epath.Path, cfg_json: dict) -> None:
    """A restart must not silently change what the checkpoints were trained with."""
    path = wd / CONFIG_JSON
    ckpt_dir = wd / CHECKPOINTS
    if not path.is_file() or not ckpt_dir.is_dir() or not any(p.name.isdigit() for p in ckpt_dir.iterdir()):
        return
    old = {**config_lib.ADDED_KEYS, **json.loads(path.read_text())}  # keys added since it was written
    changed = sorted(k for k in set(old) | set(cfg_json)
                     if old.get(k) != cfg_json.get(k) and k not in _RESTART_FREE_KEYS)
    if changed:
        raise L2DError(f"{wd} holds checkpoints of a run with a different config (keys {changed}); "
                       "use another --workdir or the same config")


# keys a restart may change without invalidating the checkpoints
_RESTART_FREE_KEYS = {"mesh", "sharding_rules", "log_interval", "validate_interval", "save_model_interval",
                      "keep_checkpoints", "profile_steps", "save_wandb", "wandb_project", "wandb_run_name",
                      "wandb_group_name", "save_dir", "remat", "remat_policy", "micro_batch_size", "micro_valid_batch_size",
                      "compute_nstep_loss", "num_t_bins", "save_log"}


def _export(wd: epath.Path, trainer, state, frozen, hf_config, tokenizer, settings, cfg) -> Path | epath.Path:
    params = jax.device_get(state.params)
    frozen_host = jax.device_get(frozen)
    base_params = params.get("base") if "base" in params else frozen_host.get("base")
    out = save_checkpoint(wd / EXPORT, base_params=base_params, hf_config=hf_config, tokenizer=tokenizer,
                          kind="l2d", flow_params=params["flow"], l2d_settings=settings.to_dict(),
                          dtype=str(cfg.get("param_dtype", "float32")), overwrite=True)
    log.info("exported the final weights to %s", out)
    return out


def _setup_logging() -> None:
    root = logging.getLogger("l2d_jax")
    if not root.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("[%(asctime)s] %(levelname)s %(name)s: %(message)s"))
        root.addHandler(h)
        root.setLevel(logging.INFO)
        root.propagate = False  # absl (clu) also logs through the root logger
