"""Runs untrusted (model-written) Python programs in a throw-away sandbox.

``execute(program, timeout_s=3.0)`` -> ``{"status", "returncode", "output_tail", "duration_s",
"reason", "sandbox"}`` where ``status`` is

- ``passed``:  the program exited with code 0;
- ``failed``:  it exited non-zero by itself (a failed assert, an exception, a syntax error);
- ``timeout``: it was still running after ``timeout_s`` seconds of wall clock (then killed);
- ``error``:   it was stopped by the sandbox: killed by a signal (CPU limit SIGXCPU, file-size
  limit SIGXFSZ, SIGKILL, SIGSEGV...), or it died of an uncaught ``MemoryError`` (the address-
  space limit), of an uncaught fork/thread failure with EAGAIN (the process-count limit), of
  an uncaught EFBIG/ENOSPC or output past the file-size limit, or bubblewrap could not set
  the sandbox up. ``reason`` says which.

Honesty note on ``error``: a ``MemoryError`` or ``EAGAIN`` that the program catches itself is
the program's business (it may still pass or fail); only one that ends the program is reported
as ``error``, because then the limit, not the program's own logic, decided the outcome. A
program that calls ``sys.exit`` with one of the sandbox's reserved codes (250-253) or with
128 + a signal number is also reported as ``error``; either way it is not ``passed``.

Design (Linux, bubblewrap ``bwrap``)
------------------------------------
One ``bwrap`` process per program, started in a new session (its own process group), with
new mount, PID, network, IPC and UTS namespaces:

- ``--ro-bind / /``: the whole host file system read-only; ``--perms 1777 --size N --tmpfs
  /tmp``: a private, size-capped (64 MiB) tmpfs that is the working directory and the only
  writable place (``--dev /dev`` and ``--proc /proc`` are the sandbox's own). The program is
  copied in read-only from a memfd (``--ro-bind-data``) and its output goes to a memfd, so
  nothing at all is written on the host's disks.
- ``--unshare-net``: a fresh network namespace with no interfaces but its own loopback; host
  listeners on 127.0.0.1 and the outside world are unreachable.
- ``--unshare-pid``: when the program (PID 2 under bwrap's reaper, PID 1) exits or bwrap is
  killed, the kernel kills every process left in the namespace; ``--die-with-parent`` ties
  that to this process, and on timeout we SIGKILL bwrap's whole process group.
- Resource limits (set by a small bootstrap just before the program runs, so bwrap itself is
  not limited): RLIMIT_AS (2 GiB), RLIMIT_CPU (ceil(timeout)+1 s soft, +1 s hard),
  RLIMIT_FSIZE (16 MiB; also caps the output memfd), RLIMIT_NPROC (64), RLIMIT_CORE 0.
- RLIMIT_NPROC does not bind uid 0 (the kernel exempts the global root user, and a user
  namespace that maps to root still runs as kernel uid 0). So:
  * run as root ("privileged" mode): bwrap runs without a user namespace and gives the
    program only CAP_SETUID/CAP_SETGID; the bootstrap drops to a fresh random unprivileged
    uid/gid (2e9 + random, no groups, all capabilities gone, no_new_privs set by bwrap) before
    the program runs. Now RLIMIT_NPROC binds (and is per-uid, so concurrent sandboxes do not
    share a budget), the program cannot read root-only files, and afterwards any process of
    that uid still alive is SIGKILLed (a sweep of /proc). Directories on the interpreter's path
    that the unprivileged uid cannot traverse (e.g. ``/root`` for a pyenv Python) are masked
    with an empty tmpfs and only the interpreter's prefixes are bound back read-only.
  * run as another user ("userns" mode): ``--unshare-user`` maps the caller's (non-root) uid,
    so RLIMIT_NPROC binds; it counts per user namespace, i.e. per sandbox.
- The process environment is a minimal fixed one (no tokens or paths leak in); stdin is
  /dev/null.

Where bwrap is missing or fails its self-test (e.g. user namespaces disabled), ``execute``
raises :class:`SandboxUnavailable` naming the fix, unless ``allow_unsandboxed=True`` (CLI
``--unsafe-no-sandbox``): then the program runs in a plain child process (own session, own
temp dir as cwd, the same rlimits, killed with its process group) and a warning is issued;
file system and network are NOT isolated then, and as root RLIMIT_NPROC does not bind.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

from l2d_jax.errors import L2DError

DEFAULT_TIMEOUT_S = 3.0
DEFAULT_MEMORY_BYTES = 2 << 30
DEFAULT_FILE_SIZE_BYTES = 16 << 20
DEFAULT_MAX_PROCESSES = 64
DEFAULT_TMPFS_BYTES = 64 << 20
DEFAULT_OUTPUT_LIMIT = 4000  # characters of output kept (the tail)

MEMORY_EXIT = 251  # the bootstrap's exit code for an uncaught MemoryError
NPROC_EXIT = 252  # ... for an uncaught fork/thread-creation EAGAIN
FSIZE_EXIT = 253  # ... for an uncaught EFBIG/ENOSPC (file-size limit, full tmpfs)
UID_BASE = 2_000_000_000  # privileged mode: the program's uid is UID_BASE + random below UID_SPAN
UID_SPAN = 100_000_000

FIX_HINT = ("install bubblewrap (`apt-get install bubblewrap`; the project's install.sh does "
            "it) and make sure it can create namespaces (as non-root: user namespaces enabled, "
            "e.g. `sysctl kernel.unprivileged_userns_clone=1`); or, at your own risk, pass "
            "allow_unsandboxed=True / --unsafe-no-sandbox to run model-written code with "
            "resource limits only")


class SandboxUnavailable(L2DError):
    """No working sandbox and the caller did not opt out."""


# The bootstrap runs inside the sandbox: limits, privilege drop, then the program in a fresh
# namespace. Its own names are not visible to the program (a separate globals dict).
_BOOTSTRAP = r"""
import errno, json, os, resource, sys
cfg = json.loads(sys.argv[1])
for name, soft, hard in cfg["rlimits"]:
    try:
        resource.setrlimit(getattr(resource, name), (soft, hard))
    except (ValueError, OSError) as e:
        print("sandbox: cannot set %%s: %%s" %% (name, e), file=sys.stderr)
        os._exit(250)
if cfg.get("uid") is not None:
    os.setgroups([])
    os.setgid(cfg["gid"])
    os.setuid(cfg["uid"])
path = cfg["program"]
with open(path, encoding="utf-8") as f:
    src = f.read()
sys.argv = [path]
g = {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__}
del cfg, f
code = compile(src, path, "exec")
del src
def _die(code, msg, tb=True):
    try:
        sys.stdout.flush()
        if tb:
            import traceback
            traceback.print_exc()
        sys.stderr.write("sandbox: " + msg + "\n")
        sys.stderr.flush()
    except BaseException:
        pass
    os._exit(code)
try:
    exec(code, g)
except MemoryError:
    _die(%d, "MemoryError (memory limit)")
except (BlockingIOError, RuntimeError) as e:
    if getattr(e, "errno", None) == errno.EAGAIN or "can't start new thread" in str(e):
        _die(%d, "process/thread limit")
    raise
except OSError as e:
    if e.errno in (errno.EFBIG, errno.ENOSPC):
        _die(%d, "file size / space limit", tb=False)
    raise
""" % (MEMORY_EXIT, NPROC_EXIT, FSIZE_EXIT)

# The program's whole environment (python runs with -I, so PYTHON* variables would be ignored).
_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp",
        "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclasses.dataclass(frozen=True)
class Limits:
    timeout_s: float = DEFAULT_TIMEOUT_S
    memory_bytes: int = DEFAULT_MEMORY_BYTES
    file_size_bytes: int = DEFAULT_FILE_SIZE_BYTES
    max_processes: int = DEFAULT_MAX_PROCESSES
    tmpfs_bytes: int = DEFAULT_TMPFS_BYTES

    def rlimits(self) -> list[tuple[str, int, int]]:
        cpu = int(math.ceil(self.timeout_s)) + 1
        return [("RLIMIT_CPU", cpu, cpu + 1),
                ("RLIMIT_AS", self.memory_bytes, self.memory_bytes),
                ("RLIMIT_FSIZE", self.file_size_bytes, self.file_size_bytes),
                ("RLIMIT_NPROC", self.max_processes, self.max_processes),
                ("RLIMIT_CORE", 0, 0)]


# ----------------------------------------------------------------------------- availability
_status_lock = threading.Lock()
_status_cache: dict[str, dict] = {}
_warned_unsandboxed = False


def _bwrap_path() -> str | None:
    return shutil.which("bwrap")


def _mode() -> str:
    return "privileged" if os.geteuid() == 0 else "userns"


def sandbox_status(python: str | None = None, refresh: bool = False) -> dict:
    """``{"available": bool, "mode": "privileged"|"userns"|None, "bwrap": path|None,
    "detail": str}``: whether bwrap exists and passes a self-test (cached per interpreter)."""
    python = python or sys.executable
    with _status_lock:
        if not refresh and python in _status_cache:
            return dict(_status_cache[python])
        bwrap = _bwrap_path()
        if bwrap is None or not sys.platform.startswith("linux"):
            st = {"available": False, "mode": None, "bwrap": bwrap,
                  "detail": "bubblewrap (bwrap) is not installed" if sys.platform.startswith(
                      "linux") else f"no sandbox on {sys.platform} (bubblewrap is Linux-only)"}
        else:
            probe = ("import os\n"
                     "assert os.getuid() != 0, 'still root'\n"
                     "open('/tmp/probe', 'w').write('x')\n"
                     "print('sandbox-ok', os.getuid())\n")
            try:
                res = _run_bwrap(probe, Limits(timeout_s=20.0), python, bwrap, 400)
            except Exception as e:  # e.g. OSError launching bwrap
                res = {"status": "error", "output_tail": f"{type(e).__name__}: {e}",
                       "returncode": None}
            ok = res["status"] == "passed" and "sandbox-ok" in res["output_tail"]
            st = {"available": ok, "mode": _mode() if ok else None, "bwrap": bwrap,
                  "detail": "ok" if ok else (f"bwrap self-test failed ({res['status']}, "
                                             f"rc={res['returncode']}): "
                                             f"{res['output_tail'].strip()[-300:]}")}
        _status_cache[python] = st
        return dict(st)


def ensure_sandbox(allow_unsandboxed: bool = False, python: str | None = None) -> bool:
    """True when the sandbox works. Otherwise raises :class:`SandboxUnavailable`, or, with
    ``allow_unsandboxed``, warns (once) and returns False."""
    global _warned_unsandboxed
    st = sandbox_status(python)
    if st["available"]:
        return True
    if not allow_unsandboxed:
        raise SandboxUnavailable(f"cannot run model-written code safely: {st['detail']}. "
                                 f"Fix: {FIX_HINT}.")
    if not _warned_unsandboxed:
        _warned_unsandboxed = True
        warnings.warn(f"running model-written code WITHOUT a sandbox ({st['detail']}): only "
                      f"resource limits apply; file system and network are not isolated"
                      + (", and RLIMIT_NPROC does not bind root" if os.geteuid() == 0 else ""),
                      RuntimeWarning, stacklevel=2)
    return False


# ------------------------------------------------------------------------------- execution
def execute(program: str, timeout_s: float = DEFAULT_TIMEOUT_S, *,
            memory_bytes: int = DEFAULT_MEMORY_BYTES,
            file_size_bytes: int = DEFAULT_FILE_SIZE_BYTES,
            max_processes: int = DEFAULT_MAX_PROCESSES,
            tmpfs_bytes: int = DEFAULT_TMPFS_BYTES,
            allow_unsandboxed: bool = False,
            python: str | None = None,
            output_limit: int = DEFAULT_OUTPUT_LIMIT) -> dict:
    """Runs ``program`` (Python source) in a separate sandboxed process; see the module doc."""
    python = python or sys.executable
    limits = Limits(float(timeout_s), int(memory_bytes), int(file_size_bytes),
                    int(max_processes), int(tmpfs_bytes))
    if ensure_sandbox(allow_unsandboxed, python):
        return _run_bwrap(program, limits, python, _bwrap_path(), output_limit)
    return _run_plain(program, limits, python, output_limit)


def _memfd(name: str, data: bytes = b"") -> int:
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create(name)  # close-on-exec; handed to the child explicitly
    else:  # pragma: no cover - non-Linux
        f = tempfile.TemporaryFile()
        fd = os.dup(f.fileno())
        f.close()
    if data:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _read_tail(fd: int, limit: int) -> str:
    size = os.fstat(fd).st_size
    nbytes = max(0, limit) * 4
    data = os.pread(fd, nbytes, max(0, size - nbytes)) if size else b""
    text = data.decode("utf-8", errors="replace")
    return text[-limit:] if limit > 0 else ""


def _inaccessible_prefix(path: str) -> str | None:
    """The topmost directory on ``path`` that 'others' cannot traverse, or None."""
    cur = Path("/")
    for part in Path(path).parts[1:]:
        cur = cur / part
        try:
            st = os.stat(cur)
        except OSError:
            return None
        if stat.S_ISDIR(st.st_mode) and not st.st_mode & stat.S_IXOTH:
            return str(cur)
    return None


@functools.lru_cache(maxsize=None)
def _interpreter_paths(python: str) -> tuple[str, ...]:
    """The directories the interpreter ``python`` needs (its prefixes, stdlib and the
    directory of its real executable), resolved: this process's own, or asked of it."""
    import sysconfig

    if os.path.realpath(python) == os.path.realpath(sys.executable):
        paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                 sysconfig.get_paths()["stdlib"]]
    else:
        probe = ("import json, sys, sysconfig; print(json.dumps([sys.prefix, sys.base_prefix, sys.exec_prefix, "
                 "sys.base_exec_prefix, sysconfig.get_paths()['stdlib']]))")
        out = subprocess.run([python, "-I", "-c", probe], capture_output=True, text=True, timeout=60, env=_ENV)
        paths = json.loads(out.stdout) if out.returncode == 0 else []
    paths += [os.path.dirname(os.path.abspath(python)), os.path.dirname(os.path.realpath(python))]
    return tuple(sorted({os.path.realpath(p) for p in paths}))


def _rebind(masked: str, paths) -> list[str]:
    """bwrap arguments that bind ``paths`` (under ``masked``, which an earlier argument hides
    behind an empty tmpfs) back read-only, creating the directories above them."""
    args: list[str] = []
    made: set[str] = {masked}
    bound: list[str] = []
    for p in sorted(paths):
        if p == masked or any(p == b or p.startswith(b + "/") for b in bound):
            continue
        for d in reversed(Path(p).parents):  # traversable mount points on the tmpfs
            if str(d).startswith(masked + "/") and str(d) not in made:
                made.add(str(d))
                args += ["--perms", "0755", "--dir", str(d)]
        args += ["--ro-bind", p, p]
        bound.append(p)
    return args


def _interpreter_binds(python: str) -> list[str]:
    """Privileged mode: mask directories the dropped uid cannot traverse that hold the
    interpreter, and bind the interpreter's prefixes back read-only."""
    masks: dict[str, set[str]] = {}
    for p in _interpreter_paths(python):
        anc = _inaccessible_prefix(p)
        if anc is not None:
            masks.setdefault(anc, set()).add(p)
    args: list[str] = []
    for anc in sorted(masks):
        args += ["--tmpfs", anc] + _rebind(anc, masks[anc])
    return args


def _tmp_binds(python: str) -> list[str]:
    """After the private tmpfs on /tmp: the interpreter's directories that live under /tmp
    (a virtual environment or a Python built there) bound back read-only."""
    return _rebind("/tmp", [p for p in _interpreter_paths(python) if p.startswith("/tmp/")])


def _result(rc: int, timed_out: bool, output: str, out_full: bool, duration: float, limits,
            sandboxed: bool) -> dict:
    """The ``execute`` record of a finished run (bwrap or the unsandboxed fallback)."""
    if timed_out:
        status, reason = "timeout", f"wall clock over {limits.timeout_s:g} s"
    else:
        status, reason = _status_from_rc(rc, sandboxed, output)
        if status == "failed" and out_full:
            status, reason = "error", "output over the file-size limit"
    return {"status": status, "returncode": rc, "output_tail": output, "duration_s": round(duration, 4),
            "reason": reason, "sandbox": "bwrap" if sandboxed else "none"}

def _status_from_rc(rc: int, sandboxed: bool, output: str) -> tuple[str, str | None]:
    if rc == 0:
        return "passed", None
    if rc == MEMORY_EXIT:
        return "error", "memory limit (uncaught MemoryError)"
    if rc == NPROC_EXIT:
        return "error", "process/thread limit (uncaught EAGAIN)"
    if rc == FSIZE_EXIT:
        return "error", "file-size limit or full tmpfs (uncaught EFBIG/ENOSPC)"
    if rc == 250:
        return "error", "sandbox bootstrap could not set a resource limit"
    if rc < 0:
        return "error", f"killed by {_signame(-rc)}"
    if sandboxed and rc > 128 and (rc - 128) in _SIGNALS:
        return "error", f"killed by {_signame(rc - 128)}"
    if sandboxed and output.lstrip().startswith("bwrap:"):
        return "error", "bubblewrap failed to set up the sandbox"
    return "failed", None


_SIGNALS = {int(s) for s in signal.Signals}


def _signame(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _kill_uid(uid: int) -> int:
    """SIGKILLs every process whose real or effective uid is ``uid`` (privileged mode)."""
    killed = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", encoding="ascii", errors="replace") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        uids = {int(x) for x in line.split()[1:3]}
                        break
                else:
                    continue
            if uid in uids:
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
        except (OSError, ValueError):
            continue
    return killed


def _wait(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Waits; on timeout SIGKILLs the process group. Returns True when it timed out."""
    try:
        proc.wait(timeout=timeout_s)
        return False
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        return True


def _run_bwrap(program: str, limits: Limits, python: str, bwrap: str | None,
               output_limit: int) -> dict:
    assert bwrap is not None
    privileged = _mode() == "privileged"
    uid = UID_BASE + secrets.randbelow(UID_SPAN) if privileged else None
    cfg = {"rlimits": limits.rlimits(), "program": "/tmp/program.py", "uid": uid, "gid": uid}
    prog_fd = _memfd("l2d-program", program.encode("utf-8", errors="surrogatepass"))
    out_fd = _memfd("l2d-output")
    args = [bwrap, "--ro-bind", "/", "/"]
    if privileged:
        args += _interpreter_binds(python)
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-user", "--disable-userns", "--uid", "65534", "--gid", "65534"]
    args += ["--dev", "/dev", "--proc", "/proc",
             "--perms", "1777", "--size", str(limits.tmpfs_bytes), "--tmpfs", "/tmp",
             *_tmp_binds(python),
             "--perms", "0444", "--ro-bind-data", str(prog_fd), "/tmp/program.py",
             "--chdir", "/tmp",
             "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
             "--unshare-cgroup-try", "--die-with-parent", "--new-session",
             "--hostname", "sandbox",
             python, "-I", "-c", _BOOTSTRAP, json.dumps(cfg)]
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out_fd,
                                stderr=subprocess.STDOUT, pass_fds=(prog_fd,), env=_ENV,
                                start_new_session=True, close_fds=True)
        os.close(prog_fd)
        prog_fd = -1
        timed_out = _wait(proc, limits.timeout_s)
        duration = time.monotonic() - t0
        if uid is not None:
            _kill_uid(uid)
        output = _read_tail(out_fd, output_limit)
        out_full = os.fstat(out_fd).st_size >= limits.file_size_bytes
    finally:
        if prog_fd >= 0:
            os.close(prog_fd)
        os.close(out_fd)
    return _result(proc.returncode, timed_out, output, out_full, duration, limits, sandboxed=True)


def _run_plain(program: str, limits: Limits, python: str, output_limit: int) -> dict:
    """No sandbox: a child process in its own session, cwd = a fresh temp dir, rlimits."""
    workdir = tempfile.mkdtemp(prefix="l2d_code_")
    out_fd = _memfd("l2d-output")
    path = os.path.join(workdir, "program.py")
    with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write(program)
    cfg = {"rlimits": limits.rlimits(), "program": path, "uid": None, "gid": None}
    env = dict(_ENV, HOME=workdir, TMPDIR=workdir)
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen([python, "-I", "-c", _BOOTSTRAP, json.dumps(cfg)],
                                stdin=subprocess.DEVNULL, stdout=out_fd,
                                stderr=subprocess.STDOUT, env=env, cwd=workdir,
                                start_new_session=True, close_fds=True)
        timed_out = _wait(proc, limits.timeout_s)
        duration = time.monotonic() - t0
        try:  # children left in the group (not those that called setsid themselves)
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        output = _read_tail(out_fd, output_limit)
        out_full = os.fstat(out_fd).st_size >= limits.file_size_bytes
    finally:
        os.close(out_fd)
        shutil.rmtree(workdir, ignore_errors=True)
    return _result(proc.returncode, timed_out, output, out_full, duration, limits, sandboxed=False)
