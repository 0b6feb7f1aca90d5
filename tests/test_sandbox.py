"""The code sandbox (l2d_jax.evaluation.sandbox) and pass@k.

Every program here runs in its own bwrap sandbox; the containment tests skip (with the reason)
where bubblewrap is missing or fails its self-test. Timeouts are kept short to stay fast on a
shared 2-core machine."""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path

import pytest

from l2d_jax.evaluation import execute, pass_at_k, sandbox, sandbox_status
from l2d_jax.evaluation.passk import aggregate_pass_at_k

REPO = Path(__file__).resolve().parents[1]
SLACK_S = 2.0  # each run ends within its timeout + this

needs_sandbox = pytest.mark.skipif(not sandbox_status()["available"],
                                   reason=f"no sandbox: {sandbox_status()['detail']}")


def _run(program: str, timeout_s: float = 3.0, **kw) -> dict:
    t0 = time.monotonic()
    res = execute(program, timeout_s=timeout_s, **kw)
    assert time.monotonic() - t0 < timeout_s + SLACK_S, res
    for key in ("status", "returncode", "output_tail", "duration_s"):
        assert key in res
    return res


def _procs_with(marker: str) -> list[int]:
    """PIDs whose command line contains ``marker``."""
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        out.append(int(entry.name))
            except OSError:
                pass
    return out


def _sandbox_uid_procs() -> list[int]:
    """PIDs running under a uid of the privileged-mode range."""
    out = []
    lo, hi = sandbox.UID_BASE, sandbox.UID_BASE + sandbox.UID_SPAN
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/status") as f:
                    for line in f:
                        if line.startswith("Uid:"):
                            if any(lo <= int(u) < hi for u in line.split()[1:]):
                                out.append(int(entry.name))
                            break
            except (OSError, ValueError):
                pass
    return out


def _descendants(pid: int) -> list[int]:
    children = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid:
                children.append(int(entry.name))
    return children + [d for c in children for d in _descendants(c)]


def _assert_nothing_left(marker: str | None = None, wait_s: float = 2.0) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        left = (_procs_with(marker) if marker else []) + _sandbox_uid_procs() + [
            p for p in _descendants(os.getpid())]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not left, f"processes left behind: {left}"


# --------------------------------------------------------------------------- outcomes
@needs_sandbox
def test_passed_failed_syntax():
    ok = _run("def f(x):\n    return x * 2\nassert f(21) == 42\nprint('fine')\n")
    assert ok["status"] == "passed" and ok["returncode"] == 0 and "fine" in ok["output_tail"]
    assert ok["sandbox"] == "bwrap"
    bad = _run("assert 1 + 1 == 3, 'arithmetic'\n")
    assert bad["status"] == "failed" and bad["returncode"] == 1
    assert "AssertionError" in bad["output_tail"]
    syn = _run("def f(:\n    pass\n")
    assert syn["status"] == "failed" and "SyntaxError" in syn["output_tail"]
    exc = _run("raise ValueError('boom')\n")
    assert exc["status"] == "failed" and "boom" in exc["output_tail"]


@needs_sandbox
def test_infinite_loop_times_out():
    res = _run("while True:\n    pass\n", timeout_s=1.0)
    assert res["status"] == "timeout"
    assert 1.0 <= res["duration_s"] < 1.0 + SLACK_S
    _assert_nothing_left()


@needs_sandbox
def test_fork_bomb_contained_uncaught():
    """A few hundred sleeping children: the process limit stops it (uncaught EAGAIN -> error);
    the ones that started are gone afterwards."""
    marker = f"{uuid.uuid4().int % 10**6}.{os.getpid()}"
    prog = ("import os, time\n"
            "for i in range(300):\n"
            "    if os.fork() == 0:\n"
            f"        os.execv('/bin/sleep', ['sleep', '{marker}'])\n"
            "time.sleep(60)\n")
    res = _run(prog, timeout_s=3.0)
    assert res["status"] in ("error", "timeout"), res
    _assert_nothing_left(marker)


@needs_sandbox
def test_fork_bomb_contained_caught_times_out():
    """The program swallows the fork errors and keeps its children: timeout, nothing left."""
    marker = f"{uuid.uuid4().int % 10**6}.{os.getpid() + 1}"
    prog = ("import os, time\n"
            "n = 0\n"
            "for i in range(300):\n"
            "    try:\n"
            "        pid = os.fork()\n"
            "    except OSError:\n"
            "        continue\n"
            "    if pid == 0:\n"
            f"        os.execv('/bin/sleep', ['sleep', '{marker}'])\n"
            "    n += 1\n"
            "print('children', n, flush=True)\n"
            "assert n < 300\n"
            "time.sleep(60)\n")
    res = _run(prog, timeout_s=1.5)
    assert res["status"] == "timeout", res
    _assert_nothing_left(marker)


@needs_sandbox
def test_detached_daemon_killed_when_program_exits():
    marker = f"{uuid.uuid4().int % 10**6}.{os.getpid() + 2}"
    prog = ("import os\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    if os.fork() == 0:\n"
            f"        os.execv('/bin/sleep', ['sleep', '{marker}'])\n"
            "    os._exit(0)\n"
            "print('parent done')\n")
    res = _run(prog)
    assert res["status"] == "passed"
    _assert_nothing_left(marker)


@needs_sandbox
def test_memory_limit_is_error():
    res = _run("x = bytearray(64 * 2**30)\nprint('allocated')\n")
    assert res["status"] == "error", res
    assert "memory" in res["reason"]
    assert "allocated" not in res["output_tail"]
    # a program that handles the MemoryError itself decides its own outcome
    res = _run("try:\n    x = bytearray(64 * 2**30)\nexcept MemoryError:\n    print('handled')\n")
    assert res["status"] == "passed" and "handled" in res["output_tail"]


@needs_sandbox
def test_output_and_file_size_limits():
    res = _run("import sys\nwhile True:\n    sys.stdout.write('y' * 65536)\n")
    assert res["status"] == "error" and len(res["output_tail"]) <= sandbox.DEFAULT_OUTPUT_LIMIT
    res = _run("open('big.bin', 'wb').write(b'0' * (64 << 20))\n")
    assert res["status"] == "error", res


@needs_sandbox
def test_writes_outside_are_blocked(tmp_path):
    name = f"l2d_sandbox_probe_{uuid.uuid4().hex[:8]}"
    targets = [Path("/root/l2d_sandbox_probe"), REPO / name, Path("/work") / name,
               tmp_path / name]
    for target in targets:
        assert not target.exists()
        res = _run(f"open({str(target)!r}, 'w').write('x')\n")
        assert res["status"] != "passed", (target, res)
        assert not target.exists(), target
    # the private /tmp and the working directory are writable, but nothing reaches the host
    res = _run(f"import os\nopen('/tmp/{name}', 'w').write('x')\nopen('{name}.cwd', 'w')\n"
               f"print(os.getcwd())\n")
    assert res["status"] == "passed", res
    assert not Path(f"/tmp/{name}").exists()
    assert not (Path(res["output_tail"].strip()) / f"{name}.cwd").exists()


@needs_sandbox
def test_network_is_unreachable():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    try:
        res = _run("import socket\n"
                   f"s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                   "s.sendall(b'hello')\n")
        assert res["status"] != "passed", res
        with pytest.raises(socket.timeout):
            server.accept()  # nothing came through
    finally:
        server.close()
    res = _run("import socket\n"
               "s = socket.create_connection(('1.1.1.1', 80), timeout=1)\n"
               "s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n", timeout_s=3.0)
    assert res["status"] != "passed", res


@needs_sandbox
def test_no_environment_leak_and_unprivileged(monkeypatch):
    monkeypatch.setenv("L2D_SECRET_TOKEN", "hunter2")
    res = _run("import os\nprint(os.environ.get('L2D_SECRET_TOKEN'), os.getuid())\n")
    assert res["status"] == "passed"
    value, uid = res["output_tail"].split()
    assert value == "None" and int(uid) != 0


@needs_sandbox
def test_evaluator_survives_and_runs_again():
    pid = os.getpid()
    for prog in ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
                 "import os, signal\nos.killpg(0, signal.SIGKILL)\n",
                 "import os, signal\nos.kill(-1, signal.SIGKILL)\n"):
        res = _run(prog)
        assert res["status"] in ("error", "failed", "passed", "timeout")
    assert os.getpid() == pid
    assert _run("print('still here')\n")["status"] == "passed"


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv")
                    or not os.access("/usr/bin/python3", os.X_OK)
                    or not sandbox_status()["available"],
                    reason="needs root, setpriv and /usr/bin/python3 to try the userns mode")
def test_userns_mode_as_unprivileged_user():
    """As a non-root user the sandbox takes the user-namespace path; limits still bind."""
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "from l2d_jax.evaluation.sandbox import execute, sandbox_status\n"
            "st = sandbox_status()\n"
            "if not st['available']: print('UNAVAILABLE', st['detail']); sys.exit(0)\n"
            "assert st['mode'] == 'userns', st\n"
            "r = execute('import os\\nfor i in range(300):\\n    os.fork() or os._exit(0)\\n'\n"
            "            'import time\\ntime.sleep(30)\\n', timeout_s=2)\n"
            "print(r['status'])\n"
            "r2 = execute('print(42)')\n"
            "print(r2['status'])\n")
    uid = sandbox.UID_BASE + sandbox.UID_SPAN + os.getpid() % 1000
    if not all(os.stat(p).st_mode & 0o005 for p in (REPO, REPO / "l2d_jax")):
        pytest.skip("repository not readable by other users")
    out = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                          "/usr/bin/python3", "-I", "-c", code, str(REPO)],
                         capture_output=True, text=True, timeout=30, cwd="/")
    if "UNAVAILABLE" in out.stdout:
        pytest.skip(out.stdout)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["error", "passed"], out.stdout


# ------------------------------------------------------------------------- availability
def test_missing_bwrap_refuses_unless_opted_out(monkeypatch):
    monkeypatch.setattr(sandbox, "_bwrap_path", lambda: None)
    monkeypatch.setattr(sandbox, "_status_cache", {})
    monkeypatch.setattr(sandbox, "_warned_unsandboxed", False)
    st = sandbox_status()
    assert not st["available"]
    with pytest.raises(sandbox.SandboxUnavailable, match="apt-get install bubblewrap"):
        execute("print(1)")
    with pytest.warns(RuntimeWarning, match="WITHOUT a sandbox"):
        res = execute("print(6 * 7)", allow_unsandboxed=True)
    assert res["status"] == "passed" and "42" in res["output_tail"] and res["sandbox"] == "none"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert execute("assert False", allow_unsandboxed=True)["status"] == "failed"
        assert execute("x = bytearray(64 * 2**30)",
                       allow_unsandboxed=True)["status"] == "error"
        res = execute("import time\ntime.sleep(30)", timeout_s=0.5, allow_unsandboxed=True)
        assert res["status"] == "timeout" and res["duration_s"] < 0.5 + SLACK_S


# ---------------------------------------------------------------------------------- pass@k
@pytest.mark.parametrize("n,c", [(10, 0), (10, 1), (10, 5), (10, 10), (20, 3), (7, 6)])
@pytest.mark.parametrize("k", [1, 5, 10])
def test_pass_at_k_closed_form(n, c, k):
    if k > n:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)
        return
    expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_hand_values():
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 1, 1) == pytest.approx(0.1)
    assert pass_at_k(10, 1, 5) == pytest.approx(0.5)  # 1 - C(9,5)/C(10,5) = 1 - 126/252
    assert pass_at_k(10, 1, 10) == 1.0
    assert pass_at_k(10, 5, 1) == pytest.approx(0.5)
    assert pass_at_k(10, 5, 5) == pytest.approx(1 - 1 / 252)  # C(5,5)/C(10,5)
    assert pass_at_k(10, 5, 10) == 1.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(1000, 1, 1) == pytest.approx(1e-3)  # large n stays finite and exact
    agg = aggregate_pass_at_k([(10, 0), (10, 1), (10, 5), (10, 10)])
    assert agg["pass@1"] == pytest.approx((0 + 0.1 + 0.5 + 1) / 4)
    assert agg["pass@5"] == pytest.approx((0 + 0.5 + (1 - 1 / 252) + 1) / 4)
    assert agg["pass@10"] == pytest.approx(3 / 4)
    assert "pass@10" not in aggregate_pass_at_k([(5, 1)])


def _venv(where: Path) -> str:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    return str(where / "bin" / "python")


@needs_sandbox
@pytest.mark.parametrize("place", ["venv_under_tmp", "venv_under_private_home", "system_python"])
def test_the_sandbox_works_wherever_the_interpreter_lives(tmp_path, place):
    """The private tmpfs on /tmp (and, as root, the masks over directories the dropped uid
    cannot traverse, like a 0700 $HOME) must not hide the interpreter: a virtual environment
    under /tmp (CI systems, throwaway set-ups), one under a 0700 home directory, and the
    system Python each pass the self-test and run a program."""
    if place == "venv_under_tmp":
        python = _venv(tmp_path / "venv")
    elif place == "venv_under_private_home":
        home = tmp_path / "home"
        home.mkdir(mode=0o700)
        python = _venv(home / "me" / "venv")
    else:
        python = "/usr/bin/python3"
        if not Path(python).exists():
            pytest.skip("no /usr/bin/python3")
    assert str(tmp_path).startswith("/tmp/") or place == "system_python"
    status = sandbox_status(python, refresh=True)
    assert status["available"], status["detail"]
    res = execute("import sys\nprint('ran', sys.prefix)\n", timeout_s=10.0, python=python)
    assert res["status"] == "passed" and "ran" in res["output_tail"], res
    assert res["sandbox"] == "bwrap"
