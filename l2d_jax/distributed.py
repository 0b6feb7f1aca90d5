"""Multi-host start-up and host-level helpers around ``jax.distributed``.

``initialize(mode, ...)`` connects the processes of one run (one process per host, or per
GPU) before anything touches a JAX backend. Modes:

- ``"tpu"``: a Cloud TPU VM pod slice; ``jax.distributed.initialize()`` without arguments
  finds the coordinator, process count and index itself. Run the SAME command on every
  worker at once (``gcloud compute tpus tpu-vm ssh --worker=all``): a worker that
  initialises alone waits for the others until it times out.
- ``"slurm"``: from ``SLURM_NTASKS`` (processes), ``SLURM_PROCID`` (this process), the first
  host of ``SLURM_STEP_NODELIST`` (else ``SLURM_JOB_NODELIST``) as coordinator on port
  ``L2D_COORDINATOR_PORT`` (default ``DEFAULT_PORT``); with several tasks per node (one per
  GPU), each process takes the GPU ``SLURM_LOCALID`` unless ``local_device_ids`` is given or
  SLURM already left it one GPU (``CUDA_VISIBLE_DEVICES`` with one entry).
- ``"explicit"``: ``coordinator`` ("host:port"), ``num_processes``, ``process_id`` as
  arguments or from ``L2D_COORDINATOR``, ``L2D_NUM_PROCESSES``, ``L2D_PROCESS_ID`` (and
  ``L2D_LOCAL_DEVICE_IDS``, comma-separated).
- ``"local"``: processes on this machine with CPU devices (tests): as explicit, the
  coordinator defaulting to ``localhost:L2D_COORDINATOR_PORT``, and the gloo CPU
  collectives.
- ``"none"``: a single process; nothing to do.
- ``"auto"`` (default): ``explicit`` when ``L2D_COORDINATOR`` is set, ``slurm`` inside a
  SLURM step with more than one task, ``tpu`` when ``TPU_WORKER_HOSTNAMES`` lists more than
  one host, else ``none``. ``L2D_DISTRIBUTED`` overrides the mode (``initialize_from_env``).

Host helpers: ``is_main_process``; ``global_batch_from_local`` (each host passes only its
rows, ``jax.make_array_from_process_local_data`` assembles the global array; the training
step does this in ``Trainer.shape_batch``); ``process_shard`` (this host's share of N work
items, e.g. evaluation prompts) and ``gather_objects`` (everyone's results, in order,
via ``multihost_utils.process_allgather``), as evaluation and ``l2d-jax generate`` use them
(each process its share of the prompts on its own devices); ``on_main`` (a value process 0
computes, e.g. from files only it writes, shared with every process); ``host_copy`` (numpy
copies of arrays sharded over hosts, for process 0 to write an export);
``gather_host_states`` / ``host_state`` (per-host JSON state such as the data position,
through a checkpoint that process 0 writes). Arrays in checkpoints need nothing here: every
process calls orbax's save/restore and orbax writes each shard once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Mapping, Sequence

from l2d_jax.errors import L2DError

MODES = ("auto", "tpu", "slurm", "explicit", "local", "none")
DEFAULT_PORT = 12355
ENV_MODE = "L2D_DISTRIBUTED"
ENV_COORDINATOR = "L2D_COORDINATOR"
ENV_NUM_PROCESSES = "L2D_NUM_PROCESSES"
ENV_PROCESS_ID = "L2D_PROCESS_ID"
ENV_PORT = "L2D_COORDINATOR_PORT"
ENV_LOCAL_DEVICE_IDS = "L2D_LOCAL_DEVICE_IDS"


class DistributedError(L2DError, ValueError):
    """Settings that cannot start a multi-process run."""


@dataclasses.dataclass(frozen=True)
class Setup:
    """What ``initialize`` does (``mode`` "none": nothing). ``coordinator`` etc. None for
    "tpu" (JAX finds them)."""

    mode: str
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None


# --------------------------------------------------------------------------- resolving


def first_slurm_host(nodelist: str) -> str:
    """The first host name of a SLURM node list: ``node[001-004,007],gpu1`` -> ``node001``."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise DistributedError("the SLURM node list is empty")
    m = re.match(r"^([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        raise DistributedError(f"cannot parse the SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    return prefix + re.split(r"[,-]", ranges, maxsplit=1)[0]


def _int_env(env: Mapping[str, str], name: str) -> int | None:
    v = env.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise DistributedError(f"{name}={v!r} is not an integer") from None


def _device_ids(v) -> tuple[int, ...] | None:
    if v is None or v == "":
        return None
    if isinstance(v, int):
        return (v,)
    if isinstance(v, str):
        try:
            return tuple(int(x) for x in v.split(",") if x.strip())
        except ValueError:
            raise DistributedError(f"local device ids {v!r}: expected comma-separated integers") from None
    return tuple(int(x) for x in v)


def detect_mode(env: Mapping[str, str] | None = None) -> str:
    """The mode ``auto`` picks (see the module doc)."""
    env = os.environ if env is None else env
    if env.get(ENV_COORDINATOR):
        return "explicit"
    if (_int_env(env, "SLURM_NTASKS") or 1) > 1 and "SLURM_PROCID" in env and (
            env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")):
        return "slurm"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return "tpu"
    return "none"


def resolve(mode: str = "auto", coordinator: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, local_device_ids: int | Sequence[int] | str | None = None, *,
            env: Mapping[str, str] | None = None) -> Setup:
    """The ``Setup`` that ``initialize`` would use (no JAX calls; arguments win over the
    environment). DistributedError naming the missing setting otherwise."""
    env = os.environ if env is None else env
    if mode not in MODES:
        raise DistributedError(f"distributed mode {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "auto":
        mode = "explicit" if coordinator else detect_mode(env)
    ids = _device_ids(local_device_ids if local_device_ids is not None else env.get(ENV_LOCAL_DEVICE_IDS))
    port = _int_env(env, ENV_PORT) or DEFAULT_PORT
    if mode == "none":
        return Setup("none")
    if mode == "tpu":
        return Setup("tpu", coordinator, num_processes, process_id, ids)
    if mode == "slurm":
        n = num_processes if num_processes is not None else _int_env(env, "SLURM_NTASKS")
        pid = process_id if process_id is not None else _int_env(env, "SLURM_PROCID")
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if coordinator is None:
            if not nodes:
                raise DistributedError("slurm mode: neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set "
                                       "(run inside `srun`)")
            coordinator = f"{first_slurm_host(nodes)}:{port}"
        if n is None or pid is None:
            raise DistributedError("slurm mode: SLURM_NTASKS and SLURM_PROCID must be set (run inside `srun`)")
        tasks_per_node = _int_env(env, "SLURM_NTASKS_PER_NODE") or _tasks_per_node(env)
        visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        if ids is None and tasks_per_node and tasks_per_node > 1 and "SLURM_LOCALID" in env \
                and len(visible) != 1:  # one process per GPU, each seeing all of the node's GPUs
            ids = (_int_env(env, "SLURM_LOCALID"),)
        return Setup("slurm", coordinator, n, pid, ids)
    # explicit / local
    coordinator = coordinator or env.get(ENV_COORDINATOR) or (f"localhost:{port}" if mode == "local" else None)
    n = num_processes if num_processes is not None else _int_env(env, ENV_NUM_PROCESSES)
    pid = process_id if process_id is not None else _int_env(env, ENV_PROCESS_ID)
    missing = [name for name, v in ((f"coordinator ({ENV_COORDINATOR})", coordinator),
                                    (f"num_processes ({ENV_NUM_PROCESSES})", n),
                                    (f"process_id ({ENV_PROCESS_ID})", pid)) if v is None]
    if missing:
        raise DistributedError(f"{mode} mode needs {', '.join(missing)}")
    if not re.match(r"^[^:\s]+:\d+$", coordinator):
        raise DistributedError(f"coordinator {coordinator!r}: expected host:port")
    if not 0 <= pid < n:
        raise DistributedError(f"process_id={pid} is not in [0, num_processes={n})")
    return Setup(mode, coordinator, n, pid, ids)


def _tasks_per_node(env: Mapping[str, str]) -> int | None:
    """Tasks on this node from SLURM_TASKS_PER_NODE ("4(x2),3" -> 4 for the first nodes)."""
    v = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not v:
        return None
    m = re.match(r"^(\d+)", v)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------- initialise


def initialize(mode: str = "auto", coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: int | Sequence[int] | None = None, *,
               env: Mapping[str, str] | None = None, timeout_s: int = 300) -> Setup:
    """Connects this process to the others of the run (see the module doc); returns the
    ``Setup`` used. Call it first, before any JAX computation or device query. A second
    call (already initialised) only returns the setup."""
    import jax

    setup = resolve(mode, coordinator, num_processes, process_id, local_device_ids, env=env)
    if setup.mode == "none":
        return setup
    if jax.distributed.is_initialized():
        return setup
    if setup.mode == "local":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs: dict[str, Any] = {"initialization_timeout": timeout_s}
    if setup.local_device_ids is not None:
        kwargs["local_device_ids"] = list(setup.local_device_ids)
    if setup.mode == "tpu":
        for name, v in (("coordinator_address", setup.coordinator), ("num_processes", setup.num_processes),
                        ("process_id", setup.process_id)):
            if v is not None:
                kwargs[name] = v
        jax.distributed.initialize(**kwargs)
    else:
        jax.distributed.initialize(coordinator_address=setup.coordinator, num_processes=setup.num_processes,
                                   process_id=setup.process_id, **kwargs)
    return setup


def initialize_from_env(mode: str | None = None, env: Mapping[str, str] | None = None) -> Setup:
    """``initialize`` with the mode from ``mode``, else ``$L2D_DISTRIBUTED``, else "auto"; every
    other setting from the environment. The training CLI calls this first."""
    env = os.environ if env is None else env
    return initialize(mode or env.get(ENV_MODE) or "auto", env=env)


# --------------------------------------------------------------------------- host helpers


def is_main_process() -> bool:
    """True on process 0 (the one that writes logs, exports and results)."""
    import jax

    return jax.process_index() == 0


def global_batch_from_local(local_batch, mesh, spec=None, global_shape=None):
    """Global arrays from this host's rows: each leaf of ``local_batch`` (numpy, leading
    batch axis) becomes ``jax.make_array_from_process_local_data`` on ``NamedSharding(mesh,
    spec)``; ``spec`` defaults to the batch sharding (rows over data x fsdp). Hosts pass
    disjoint rows in process order; ``global_shape`` (one shape for every leaf, or a
    matching pytree) defaults to the local shape with the rows of all hosts."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    def one(x, shape=None):
        x = np.asarray(x)
        sp = spec if spec is not None else P(("data", "fsdp"), *([None] * (x.ndim - 1)))
        sharding = NamedSharding(mesh, sp)
        if shape is None:
            shape = (x.shape[0] * jax.process_count(),) + x.shape[1:] if x.ndim else x.shape
        return jax.make_array_from_process_local_data(sharding, x, tuple(shape))

    if global_shape is None or isinstance(global_shape, tuple):
        return jax.tree.map(lambda x: one(x, global_shape), local_batch)
    return jax.tree.map(one, local_batch, global_shape, is_leaf=lambda s: isinstance(s, tuple))


def process_shard(n_items: int, process_index: int | None = None, process_count: int | None = None) -> range:
    """This host's contiguous share of ``n_items`` work items (e.g. prompts): the hosts'
    ranges are in process order, cover every item once and differ in size by at most one."""
    import jax

    i = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    base, extra = divmod(int(n_items), n)
    start = i * base + min(i, extra)
    return range(start, start + base + (1 if i < extra else 0))


def gather_objects(local: Sequence[Any], default: Callable[[Any], Any] | None = None) -> list:
    """Every host's list of JSON-serialisable results, concatenated in process order (with
    ``process_shard``: the original item order). Collective: every process must call it;
    every process gets the full list (process 0 usually writes it). ``default``: as
    ``json.dumps``'s, for values JSON cannot write (e.g. numpy scalars). With one process:
    the list itself, not a JSON copy."""
    import jax
    import numpy as np

    local = list(local)
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    blob = np.frombuffer(json.dumps(local, default=default).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([blob.size], np.int64))).reshape(-1)
    padded = np.zeros((int(sizes.max()),), np.uint8)
    padded[:blob.size] = blob
    everyone = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    out: list = []
    for row, size in zip(everyone, sizes):
        out.extend(json.loads(bytes(row[:int(size)]).decode()))
    return out


def on_main(fn: Callable[[], Any], default: Callable[[Any], Any] | None = None) -> Any:
    """``fn()`` run on process 0 only; every process returns its (JSON) result. Collective.
    For decisions all processes must share (what is already done) and files only process 0
    reads or writes. An exception in ``fn`` is raised on every process (process 0: itself,
    the others: a DistributedError with its message), so none is left waiting in a later
    collective. ``default`` as in ``gather_objects``. With one process: ``fn()`` itself."""
    import jax

    if jax.process_count() == 1:
        return fn()
    main = jax.process_index() == 0
    value, error = None, None
    if main:
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, once the others know
            error = e
    mine = {"value": value, "error": None if error is None else f"{type(error).__name__}: {error}"}
    shared = gather_objects([mine] if main else [], default)[0]
    if error is not None:
        raise error
    if shared["error"] is not None:
        raise DistributedError(f"process 0 failed: {shared['error']}")
    return shared["value"]


def host_copy(tree):
    """numpy copies of a pytree of arrays, also of arrays sharded over several hosts (those
    are all-gathered: collective, every process must call it; each gets the whole tree).
    Used before process 0 writes an export of the trained weights."""
    import jax
    import numpy as np

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(jax.device_get(x))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


PER_PROCESS = "per_process"


def gather_host_states(state: Mapping) -> dict:
    """A checkpointable record of every host's (JSON) state, e.g. its data position: with one
    process the state itself, else ``{"per_process": [state of process 0, 1, ...]}``
    (collective). Orbax writes JSON items from process 0 only, so per-host values must be
    gathered first; ``host_state`` picks this host's back out."""
    import jax

    if jax.process_count() == 1:
        return dict(state)
    return {PER_PROCESS: gather_objects([dict(state)])}


def host_state(saved: Mapping) -> dict:
    """This host's state from ``gather_host_states``'s record (a plain state as is)."""
    import jax

    if PER_PROCESS not in saved:
        return dict(saved)
    states = saved[PER_PROCESS]
    if len(states) != jax.process_count():
        raise DistributedError(f"the checkpoint holds the state of {len(states)} processes, this run has "
                               f"{jax.process_count()}; resume with the same number of processes")
    return dict(states[jax.process_index()])


def sync(name: str) -> None:
    """A barrier across processes (no-op with one)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
