"""``l2d-jax env``: what this Python, JAX and machine are, and whether JAX uses the accelerator.

Prints the interpreter, platform, versions of the packages that decide where JAX runs (jax,
jaxlib, the CUDA / TPU plugins) and of the main libraries, JAX's backend and devices, the
process count, and the environment variables that steer JAX and l2d-jax.

Accelerators are also detected WITHOUT JAX (``detect_accelerators``): an NVIDIA GPU by
``nvidia-smi`` on PATH or ``/dev/nvidia0``, a TPU by ``/dev/accel*`` (v4 and older) or
``/dev/vfio/<group>`` (v5e / v5p / v6e). When one is present but JAX runs on the CPU, a loud
warning on stderr (and ``warnings`` in ``--json``) names the fix: the install target that
brings JAX's plugin (``./install.sh --target cuda12`` / ``--target tpu``), or unsetting
``JAX_PLATFORMS=cpu``. ``--require cpu|gpu|tpu`` exits with ``REQUIRE_EXIT`` when JAX's
default backend is another one, so that launch scripts refuse to train on the CPU by accident.

``L2D_PROBE_ROOT`` (tests) moves the ``/dev`` probes under another root directory.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REQUIRE_EXIT = 3
# Distributions whose versions are reported (None when not installed).
PACKAGES = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin",
            "jax-cuda13-pjrt", "libtpu", "flax", "optax", "orbax-checkpoint", "transformers",
            "torch", "l2d-jax")
ENV_PREFIXES = ("JAX_", "XLA_", "L2D_", "TPU_", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")
# JAX's default_backend() names; "gpu" is what launch scripts ask for (cuda, or rocm).
BACKEND_NAMES = {"cpu": ("cpu",), "gpu": ("gpu", "cuda", "rocm"), "tpu": ("tpu",)}
FIX = {"gpu": "./install.sh --venv DIR --target cuda12 (or cuda13, for a CUDA 13 driver)",
       "tpu": "./install.sh --venv DIR --target tpu"}
PLUGINS = {"gpu": ("jax-cuda12-plugin", "jax-cuda13-plugin"), "tpu": ("libtpu",)}


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution, None where it is not installed."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _nvidia_smi_names(exe: str) -> list[str]:
    """GPU names from ``nvidia-smi``; empty when it fails (no driver, no GPU)."""
    try:
        out = subprocess.run([exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def detect_accelerators(root: str | os.PathLike | None = None, path: str | None = None) -> dict:
    """Accelerators seen without JAX: ``{"gpu": [evidence...], "tpu": [evidence...]}``.

    ``root`` is where ``/dev`` is looked up (default ``$L2D_PROBE_ROOT`` or ``/``), ``path`` the
    PATH searched for ``nvidia-smi`` (default ``$PATH``). An empty list: none found.
    """
    dev = Path(root if root is not None else os.environ.get("L2D_PROBE_ROOT", "/")) / "dev"
    gpu: list[str] = []
    smi = shutil.which("nvidia-smi", path=path)
    if smi:  # counts only when it lists a GPU (a login node may have the tool without a GPU)
        gpu += [f"nvidia-smi: {name}" for name in _nvidia_smi_names(smi)]
    if (dev / "nvidia0").exists():
        gpu.append(str(dev / "nvidia0"))
    tpu = [str(p) for p in sorted(dev.glob("accel*"))]
    vfio = dev / "vfio"
    if vfio.is_dir():  # /dev/vfio/vfio is the control node on any VFIO host; groups are numbers
        tpu += [str(p) for p in sorted(vfio.iterdir()) if p.name.isdigit()]
    return {"gpu": gpu, "tpu": tpu}


def jax_info() -> dict:
    """JAX's default backend, devices and process count; ``error`` when the backend fails."""
    try:
        import jax

        devices = jax.devices()
        kinds: dict[str, int] = {}
        for d in devices:
            kinds[d.device_kind] = kinds.get(d.device_kind, 0) + 1
        return {"backend": jax.default_backend(), "device_count": len(devices),
                "local_device_count": jax.local_device_count(), "device_kinds": kinds,
                "process_count": jax.process_count(), "process_index": jax.process_index()}
    except Exception as e:  # noqa: BLE001 - a broken backend is what this command reports
        return {"backend": None, "error": " ".join(str(e).split()) or type(e).__name__}


def backend_kind(backend: str | None) -> str | None:
    """``cpu``, ``gpu`` or ``tpu`` for a JAX backend name (None if unknown)."""
    return next((kind for kind, names in BACKEND_NAMES.items() if backend in names), None)


def accelerator_warnings(accelerators: dict, backend: str | None, versions: dict,
                         environ: dict) -> list[str]:
    """One warning per accelerator that is present while JAX does not run on it, naming the fix."""
    warnings = []
    kind = backend_kind(backend)
    for acc, evidence in accelerators.items():
        if not evidence or kind == acc:
            continue
        where = f"{acc.upper()} present ({evidence[0]}) but JAX runs on {backend or 'no backend'}"
        platforms = environ.get("JAX_PLATFORMS", "")
        if platforms and not any(n in platforms for n in BACKEND_NAMES[acc]):
            fix = f"unset JAX_PLATFORMS (it is {platforms!r})"
        elif not any(versions.get(p) for p in PLUGINS[acc]):
            fix = f"JAX's {acc.upper()} plugin is not installed: {FIX[acc]}"
        else:
            fix = (f"the plugin is installed ({', '.join(p for p in PLUGINS[acc] if versions.get(p))}) "
                   f"but JAX did not load it: see JAX's warning above (driver, a process holding the "
                   f"device), or reinstall with {FIX[acc]}")
        warnings.append(f"{where}: {fix}")
    return warnings


def collect(environ: dict | None = None) -> dict:
    """The full report of ``l2d-jax env``."""
    environ = dict(os.environ if environ is None else environ)
    versions = package_versions()
    accelerators = detect_accelerators()
    info = jax_info()
    return {
        "python": sys.version.split()[0], "executable": sys.executable,
        "platform": platform.platform(), "machine": platform.machine(),
        "versions": versions, **info, "accelerators": accelerators,
        "env": {k: v for k, v in sorted(environ.items()) if k.startswith(ENV_PREFIXES)},
        "warnings": accelerator_warnings(accelerators, info.get("backend"), versions, environ),
    }


def format_report(report: dict) -> str:
    """The human-readable form of ``collect()``."""
    lines = [f"python      {report['python']} ({report['executable']})",
             f"platform    {report['platform']}"]
    installed = [f"{k} {v}" for k, v in report["versions"].items() if v]
    lines.append("packages    " + ", ".join(installed))
    if report.get("backend") is None:
        lines.append(f"jax backend NONE: {report.get('error')}")
    else:
        kinds = ", ".join(f"{n} x {k}" for k, n in report["device_kinds"].items())
        lines.append(f"jax backend {report['backend']}: {report['device_count']} device(s) ({kinds}), "
                     f"{report['local_device_count']} local, process {report['process_index']} of "
                     f"{report['process_count']}")
    for acc, evidence in report["accelerators"].items():
        lines.append(f"{acc} seen     {', '.join(evidence) if evidence else 'none'}")
    env = report["env"]
    lines.append("env         " + (" ".join(f"{k}={v}" for k, v in env.items()) if env else "(none set)"))
    return "\n".join(lines)


def run(args) -> int:
    """``l2d-jax env`` (see ``add_parser``)."""
    report = collect()
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_report(report))
    for w in report["warnings"]:
        print(f"\n!!! WARNING: {w} !!!\n", file=sys.stderr)
    if args.require and backend_kind(report.get("backend")) != args.require:
        got = report.get("backend") or f"none ({report.get('error')})"
        platforms = report["env"].get("JAX_PLATFORMS")
        if platforms:
            got += f" (JAX_PLATFORMS={platforms})"
        fix = FIX.get(args.require, "set JAX_PLATFORMS=cpu")
        print(f"error: --require {args.require}: JAX's default backend is {got}; fix: {fix}", file=sys.stderr)
        return REQUIRE_EXIT
    return 0


def add_parser(subparsers) -> None:
    """Adds ``env`` to the ``l2d-jax`` subcommands."""
    p = subparsers.add_parser(
        "env", help="Python, package versions, JAX backend and devices; warns when JAX misses an accelerator",
        description="Report the environment: Python, platform, versions (jax, jaxlib, CUDA/TPU plugins, "
                    "flax, optax, orbax, transformers, torch), JAX's backend, devices and processes, and "
                    "the JAX_/XLA_/L2D_ variables. Warns on stderr when a GPU or TPU is present but JAX "
                    f"runs on the CPU. Exit {REQUIRE_EXIT} with --require when JAX's backend differs.")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--require", choices=tuple(BACKEND_NAMES), default=None,
                   help=f"exit {REQUIRE_EXIT} unless JAX's default backend is this one (launch scripts)")
    p.set_defaults(func=run)
