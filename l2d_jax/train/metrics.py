"""Where training metrics go: TensorBoard + console (clu), ``metrics.jsonl``, optional W&B,
a progress bar, and an optional profiler trace.

Only process 0 writes files (the other processes get a console-only clu writer). Heavy
imports (clu pulls in TensorFlow, wandb) happen lazily, when a logger is created. Where clu
is not installed (a bare accelerator image), the logger warns once and writes to the console
and ``metrics.jsonl`` only: no TensorBoard events.

``WORKDIR/metrics.jsonl`` holds one JSON object per line: training lines
``{"step", "loss", "lr", "tokens_per_s", ...}`` every ``log_interval`` steps and validation
lines ``{"step", "val_loss", "val_ppl", ...}``. On resume, lines of steps after the restored
checkpoint are dropped (``truncate_jsonl``), so the file reads as one clean run.

The workdir may be ``gs://...`` (``l2d_jax.storage``): objects there cannot be appended to, so
``metrics.jsonl`` is then uploaded whole, at most every ``REMOTE_FLUSH_S`` seconds and at the
end; TensorBoard events, W&B files and profiler traces are written to a local mirror and
uploaded the same way. A kill (SIGKILL) may lose the last ``REMOTE_FLUSH_S`` seconds of them.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from etils import epath

from l2d_jax import storage

log = logging.getLogger("l2d_jax.train")

JSONL = "metrics.jsonl"
TB_DIR = "tensorboard"
PROFILE_DIR = "profile"
REMOTE_FLUSH_S = 30.0


def _plain(v: Any):
    """A JSON-friendly python scalar (NaN/inf kept as floats; json writes NaN/Infinity)."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    a = np.asarray(v)
    if a.ndim == 0:
        return float(a) if np.issubdtype(a.dtype, np.floating) else a.item()
    return [_plain(x) for x in a.tolist()]


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Every object of a metrics.jsonl, local or remote (missing file: [])."""
    p = storage.as_path(path)
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: skip it
                continue
    return out


def truncate_jsonl(path: str | os.PathLike, max_step: int) -> None:
    """Drops lines whose step is > max_step (and broken lines): the metrics of steps that a
    restart will redo."""
    p = storage.as_path(path)
    if not p.is_file():
        return
    keep = [r for r in read_jsonl(p) if int(r.get("step", 0)) <= max_step]
    storage.atomic_write(p, "".join(json.dumps(r) + "\n" for r in keep))


class _RemoteJsonl:
    """The file-object part the logger uses (write, flush, close) for a JSONL in a bucket:
    the whole text is kept and uploaded on ``flush`` (at most every ``REMOTE_FLUSH_S``
    seconds) and on ``close``; it starts from the object's current content (a resumed run)."""

    def __init__(self, path: epath.Path):
        self.path = path
        self.text = path.read_text() if path.is_file() else ""
        self._sent_at, self._dirty = time.monotonic(), False

    def write(self, line: str) -> None:
        self.text += line
        self._dirty = True

    def flush(self, force: bool = False) -> None:
        if self._dirty and (force or time.monotonic() - self._sent_at >= REMOTE_FLUSH_S):
            storage.atomic_write(self.path, self.text)
            self._sent_at, self._dirty = time.monotonic(), False

    def close(self) -> None:
        self.flush(force=True)


class MetricsLogger:
    """clu writers + metrics.jsonl + optional wandb + progress bar.

    workdir: the run directory; main: whether this is process 0 (the only one writing
    files); wandb_config: None, or ``{"project", "name", "config"}`` to log to Weights &
    Biases (``save_wandb``); total_steps/start_step: for the progress bar.
    """

    def __init__(self, workdir: str | os.PathLike, *, main: bool = True, wandb_config: Mapping | None = None,
                 total_steps: int | None = None, start_step: int = 0, progress: bool = True):
        self.workdir, self.main = storage.as_path(workdir), main
        # TensorBoard / W&B write local files: into the workdir itself, or a mirror of a remote one
        self.files = storage.Mirror(self.workdir) if main else None
        self._synced_at = time.monotonic()
        self.writer = _scalar_writer(self.files.local / TB_DIR if main else None, main)
        self.jsonl = None
        if main:
            path = self.workdir / JSONL
            self.jsonl = _RemoteJsonl(path) if storage.is_remote(path) else open(path, "a")
        self.wandb = None
        if main and wandb_config is not None:
            import wandb

            self.wandb = wandb.init(project=wandb_config.get("project", "l2d-jax"), name=wandb_config.get("name"),
                                    config=dict(wandb_config.get("config") or {}),
                                    dir=str(self.files.local), resume="allow", id=wandb_config.get("id"))
        self.bar = None
        if main and progress and total_steps:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, mininterval=1.0)

    # ---------------------------------------------------------------- writing

    def _write(self, step: int, scalars: Mapping[str, Any]) -> None:
        flat = {k: _plain(v) for k, v in scalars.items()}
        numeric = {k: v for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.writer.write_scalars(step, numeric)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": int(step), **flat}) + "\n")
            self.jsonl.flush()
        if self.wandb is not None:
            self.wandb.log(numeric, step=step)
        self._sync_mirror()

    def _sync_mirror(self, force: bool = False) -> None:
        """Uploads the local mirror's new event files (a remote workdir; nothing for a local
        one), at most every ``REMOTE_FLUSH_S`` seconds unless ``force``."""
        if self.files is None or self.files.remote is None:
            return
        if force or time.monotonic() - self._synced_at >= REMOTE_FLUSH_S:
            self.writer.flush()
            self.files.sync()
            self._synced_at = time.monotonic()

    def log_train(self, step: int, scalars: Mapping[str, Any]) -> None:
        """One training line: at least loss, lr, tokens_per_s."""
        self._write(step, scalars)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{float(scalars['loss']):.4f}",
                                 tok_s=f"{float(scalars.get('tokens_per_s', 0)):.0f}",
                                 lr=f"{float(scalars.get('lr', 0)):.3g}", refresh=False)

    def log_validation(self, step: int, scalars: Mapping[str, Any]) -> None:
        """One validation line (val_* keys)."""
        self._write(step, scalars)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def flush(self) -> None:
        self.writer.flush()
        if self.jsonl is not None:
            self.jsonl.flush()
        self._sync_mirror()

    def close(self) -> None:
        self.flush()
        self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        if self.files is not None:
            self.files.close()  # uploads what a remote workdir still lacks
            self.files = None


def _scalar_writer(tb_dir: Path | None, main: bool):
    """clu's default writer (TensorBoard + console on the main process, console elsewhere);
    without clu, a console-only writer and a warning saying what is missing."""
    try:
        from clu import metric_writers
    except ImportError as e:
        log.warning("clu is not installed (%s): metrics go to the console and metrics.jsonl only, "
                    "no TensorBoard events; `pip install clu tensorflow-cpu tensorboard` adds them", e)
        return _ConsoleWriter()
    return metric_writers.create_default_writer(str(tb_dir) if main else None, just_logging=not main,
                                                asynchronous=False)


class _ConsoleWriter:
    """The part of clu's MetricWriter interface the logger uses, writing to ``log``."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        log.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in scalars.items()))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- validation


def validation_scalars(sums: Mapping[str, float], num_t_bins: int = 0, nstep_points: int = 0) -> dict:
    """val_* metrics from summed eval outputs (``Trainer.eval_step`` sums over batches).

    val_loss: token-weighted mean CE (the original averages per-batch means instead);
    val_ppl = exp(val_loss); val_acc_expected: mean probability of the label (temperature 1);
    val_acc_greedy: argmax accuracy; val_binned_loss/t<a>-<b> (+ _ppl, _count) per t bin;
    with nstep: val_nstep_loss, val_nstep_ppl, val_nstep_acc_expected, val_nstep_acc_greedy.
    """
    n = max(float(sums["n_tokens"]), 1.0)
    loss = float(sums["loss_sum"]) / n
    out = {"val_loss": loss, "val_ppl": _exp(loss), "val_acc_expected": float(sums["prob_sum"]) / n,
           "val_acc_greedy": float(sums["greedy_correct"]) / n, "val_tokens": float(sums["n_tokens"])}
    if num_t_bins and "binned_loss_sum" in sums:
        out.update(binned_scalars(sums["binned_loss_sum"], sums["binned_count"], "val_"))
    if nstep_points >= 2 and "nstep_loss_sum" in sums:
        nl = float(sums["nstep_loss_sum"]) / n
        out.update({"val_nstep_loss": nl, "val_nstep_ppl": _exp(nl),
                    "val_nstep_acc_expected": float(sums["nstep_prob_sum"]) / n,
                    "val_nstep_acc_greedy": float(sums["nstep_greedy_correct"]) / n,
                    "val_nstep_points": int(nstep_points)})
    return out


def bin_keys(num_bins: int) -> list[str]:
    """``t0.0-0.1``, ... for ``num_bins`` equal bins of [0, 1]: the original's names (one
    decimal) where they are distinct, more decimals where one would merge bins (20 bins:
    ``t0.00-0.05``; the original's keys collide there)."""
    edges = [i / num_bins for i in range(num_bins + 1)]
    digits = next(d for d in range(1, 8) if len({f"{e:.{d}f}" for e in edges}) == len(edges))
    return [f"t{a:.{digits}f}-{b:.{digits}f}" for a, b in zip(edges[:-1], edges[1:])]


def binned_scalars(loss_sums, counts, prefix: str = "") -> dict:
    """``<prefix>binned_loss/t0.0-0.1`` (mean loss, NaN when empty), ``_ppl`` and ``_count``."""
    loss_sums, counts = np.asarray(loss_sums, np.float64), np.asarray(counts, np.float64)
    out = {}
    for i, key in enumerate(bin_keys(len(counts))):
        mean = loss_sums[i] / counts[i] if counts[i] > 0 else float("nan")
        out[f"{prefix}binned_loss/{key}"] = float(mean)
        out[f"{prefix}binned_ppl/{key}"] = _exp(mean)
        out[f"{prefix}binned_count/{key}"] = int(counts[i])
    return out


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


def plot_training(metrics_path: str | os.PathLike, png: str | os.PathLike) -> Path | None:
    """A PNG of a run's ``metrics.jsonl``: training and validation loss vs. step (left) and the
    validation loss per t bin, one line per validation (right; L2D learns to read x_t where it
    falls towards t = 1). None when the file holds no loss yet."""
    rows = read_jsonl(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    binned = [r for r in val if any(k.startswith("val_binned_loss/") for k in r)]
    fig, axes = plt.subplots(1, 2 if binned else 1, figsize=(12 if binned else 6.5, 4.2), squeeze=False)
    ax = axes[0, 0]
    if train:
        ax.plot(*zip(*train), lw=1.2, label="training loss")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy", title="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if binned:
        ax = axes[0, 1]
        cmap = plt.get_cmap("viridis")
        for i, r in enumerate(binned):
            bins = [(k.split("/", 1)[1], v) for k, v in r.items() if k.startswith("val_binned_loss/")]
            mids = [sum(float(x) for x in key[1:].split("-")) / 2 for key, _ in bins]
            ax.plot(mids, [v for _, v in bins], "o-", ms=3, label=f"step {r['step']}",
                    color=cmap(i / max(len(binned) - 1, 1)))
        ax.set(xlabel="t (bin centre)", ylabel="validation cross-entropy", xlim=(0, 1),
               title="validation loss by t")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    storage.atomic_write(png, buf.getvalue())
    return storage.native(png)


# --------------------------------------------------------------------------- profiler


class Profiler:
    """A ``jax.profiler`` trace of some steps into ``WORKDIR/profile``.

    ``profile_steps``: falsy = off; an int n = the n steps after the first step of this
    process (which compiles); ``[first, last]`` = those optimizer steps (1-based, inclusive).
    Call ``before(step)`` before running step ``step`` and ``after(step)`` once it finished.
    """

    def __init__(self, workdir: str | os.PathLike, profile_steps, start_step: int, main: bool = True):
        self.dir = storage.as_path(workdir) / PROFILE_DIR
        self._mirror: storage.Mirror | None = None  # created with the first trace
        self.active = False
        self.first = self.last = None
        if not profile_steps or not main:
            return
        if isinstance(profile_steps, (int, np.integer)):
            self.first, self.last = start_step + 2, start_step + 1 + int(profile_steps)
        else:
            self.first, self.last = (int(x) for x in profile_steps)

    def before(self, step: int) -> None:
        if self.first is not None and step == self.first and not self.active:
            import jax

            self._mirror = storage.Mirror(self.dir)
            self._mirror.local.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self._mirror.local))
            self.active = True
            log.info("profiler: tracing steps %d..%d into %s", self.first, self.last, self.dir)

    def after(self, step: int, block_on=None) -> None:
        if self.active and step >= self.last:
            import jax

            if block_on is not None:
                jax.block_until_ready(block_on)
            jax.profiler.stop_trace()
            self.active = False
            self._mirror.sync()

    def close(self) -> None:
        if self.active:
            import jax

            jax.profiler.stop_trace()
            self.active = False
        if self._mirror is not None:
            self._mirror.close()
            self._mirror = None
