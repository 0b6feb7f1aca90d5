"""Paths that may live on local disk or in a bucket (``gs://``), through ``etils.epath``.

Every output of l2d-jax (training workdirs, converted checkpoints, exports, evaluation
results, ``generate --jsonl``) and every checkpoint it reads may be a local path or a
``gs://bucket/path`` (Google Cloud Storage). Arrays go through orbax's tensorstore ``gcs``
driver, all other files through ``epath``'s fsspec backend (gcsfs, a dependency): importing
this module sets ``EPATH_USE_TF=false`` unless it is set, because epath would otherwise pick
tf.io.gfile whenever TensorFlow is installed (it is, for the datasets), a GCS client that no
test can reach (no endpoint override), while gcsfs is what tests/test_storage.py runs against a
GCS emulator. ``EPATH_USE_TF=true`` restores tf.io.gfile. Other schemes are refused with a clear
error: orbax 0.12.8 writes arrays to local files or GCS only, and the fsspec clients for
``s3://`` / ``az://`` (s3fs, adlfs) are not dependencies.

Credentials for ``gs://`` are Google's Application Default Credentials
(``gcloud auth application-default login``, or ``GOOGLE_APPLICATION_CREDENTIALS`` naming a
service-account key); on a Cloud TPU VM, the VM's service account.

Atomicity: local writes go to a temporary name and are moved into place with ``os.replace``;
an object in a bucket appears whole or not at all when its upload ends, and directories there
are committed by a marker written last (orbax's ``commit_success.txt``, our manifest).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from etils import epath

from l2d_jax.errors import L2DError

# epath reads this at every gs:// call: gcsfs, the tested client, rather than tf.io.gfile
os.environ.setdefault("EPATH_USE_TF", "false")

log = logging.getLogger("l2d_jax.storage")

PathLike = str | os.PathLike
# URI schemes accepted for plain files, and for orbax checkpoints (tensorstore's gcs driver)
FILE_SCHEMES = ("gs",)
ARRAY_SCHEMES = ("gs",)
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
CREDENTIALS_HINT = ("credentials come from Application Default Credentials: run "
                    "`gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS "
                    "to a service-account key; on a TPU VM the VM's service account needs access "
                    "to the bucket")


def scheme(path: PathLike) -> str | None:
    """The URI scheme of ``path`` (``"gs"``), or None for a local path."""
    m = _URI.match(os.fspath(path))
    return m.group(1).lower() if m else None


def is_remote(path: PathLike) -> bool:
    """Whether ``path`` is a URI (``gs://...``) rather than a local path."""
    return scheme(path) is not None


def as_path(path: PathLike, *, arrays: bool = False) -> epath.Path:
    """``path`` as an ``epath.Path``: local paths absolute with ``~`` expanded, URIs as given.

    ``arrays``: the path will hold orbax checkpoints, so only local paths and ``gs://`` are
    accepted. Raises ``L2DError`` naming the scheme for anything else (``memory://``, ...).
    """
    s = scheme(path)
    if s is None:
        return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    allowed = ARRAY_SCHEMES if arrays else FILE_SCHEMES
    if s not in allowed:
        what = "checkpoints and training workdirs" if arrays else "outputs"
        raise L2DError(f"{os.fspath(path)}: {s}:// is not supported for {what}; use a local path or "
                       + " / ".join(f"{a}://bucket/path" for a in allowed))
    return epath.Path(os.fspath(path))


def describe_error(path: PathLike, error: BaseException) -> L2DError:
    """A one-line ``L2DError`` for a failed access to ``path`` (with the credentials hint for URIs)."""
    msg = " ".join(str(error).split())[:300]
    hint = f"; {CREDENTIALS_HINT}" if is_remote(path) else ""
    return L2DError(f"cannot access {os.fspath(path)} ({type(error).__name__}: {msg}){hint}")


def exists(path: PathLike, *, arrays: bool = False) -> bool:
    """Whether ``path`` exists; a bucket that cannot be reached raises ``describe_error``'s
    one-line ``L2DError`` (with the credentials hint) instead of the client's exception."""
    p = as_path(path, arrays=arrays)
    try:
        return p.exists()
    except Exception as e:  # noqa: BLE001 - any client error (auth, network, no bucket)
        raise describe_error(path, e) from e


def check_access(path: PathLike, *, arrays: bool = False, write: bool = False) -> epath.Path:
    """``as_path(path)``, after checking that it can be reached: a remote path is looked up
    once and, with ``write``, a probe object is written into it and deleted again.

    Call before slow work so that a missing bucket or missing credentials / permissions fail
    in seconds with a clear message instead of after a training step.
    """
    exists(path, arrays=arrays)
    p = as_path(path, arrays=arrays)
    try:
        if write and is_remote(p):
            probe = p / f".l2d_jax_write_check-{uuid.uuid4().hex}"
            probe.write_text("")
            probe.unlink()
    except Exception as e:  # noqa: BLE001 - any client error (auth, network, no bucket)
        raise describe_error(path, e) from e
    return p


def atomic_write(path: PathLike, data: str | bytes) -> None:
    """Writes ``data`` to ``path`` so that readers see the old content or the new, never a part.

    Local: a temporary file in the same directory moved into place with ``os.replace``.
    Remote: one object upload (an object becomes visible only once complete).
    """
    p = as_path(path)
    mode = "w" if isinstance(data, str) else "wb"
    if is_remote(p):
        with p.open(mode) as f:
            f.write(data)
        return
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f"{p.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            f.write(data)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def copy_tree(src: PathLike, dst: PathLike) -> None:
    """Copies the files under directory ``src`` into ``dst`` (created), either side local or remote."""
    src_p, dst_p = as_path(src), as_path(dst)
    dst_p.mkdir(parents=True, exist_ok=True)
    for child in src_p.iterdir():
        if child.is_dir():
            copy_tree(child, dst_p / child.name)
        else:
            child.copy(dst_p / child.name, overwrite=True)


def rmtree(path: PathLike) -> None:
    """Removes a directory tree (local or remote); nothing when it does not exist."""
    p = as_path(path)
    if p.exists():
        p.rmtree()


@contextlib.contextmanager
def local_dir(path: PathLike) -> Iterator[Path]:
    """A local directory holding the files of directory ``path``: itself when local, else a
    temporary download removed at the end of the block (for readers that need local files,
    e.g. ``AutoTokenizer.from_pretrained``)."""
    if not is_remote(path):
        yield Path(as_path(path))
        return
    with tempfile.TemporaryDirectory(prefix="l2d_jax_dl_") as tmp:
        copy_tree(path, tmp)
        yield Path(tmp)


@contextlib.contextmanager
def staged_dir(path: PathLike) -> Iterator[Path]:
    """A local directory whose files end up under ``path``: itself when local, else a
    temporary directory uploaded when the block succeeds (for writers that need local files,
    e.g. ``tokenizer.save_pretrained``)."""
    if not is_remote(path):
        p = Path(as_path(path))
        p.mkdir(parents=True, exist_ok=True)
        yield p
        return
    with tempfile.TemporaryDirectory(prefix="l2d_jax_up_") as tmp:
        yield Path(tmp)
        copy_tree(tmp, path)


class Mirror:
    """A local directory mirrored to a remote one: writers that only know local files
    (TensorBoard event files, profiler traces) write into ``local``; ``sync()`` uploads what
    changed. For a local ``path``, ``local`` is ``path`` itself and ``sync`` does nothing."""

    def __init__(self, path: PathLike):
        self.remote = as_path(path) if is_remote(path) else None
        self._tmp = tempfile.mkdtemp(prefix="l2d_jax_mirror_") if self.remote is not None else None
        self.local = Path(self._tmp) if self._tmp is not None else Path(as_path(path))
        self._sent: dict[str, tuple[int, int]] = {}

    def pull(self) -> None:
        """Downloads the remote directory's files into ``local`` (they count as synced)."""
        if self.remote is None or not self.remote.is_dir():
            return
        copy_tree(self.remote, self.local)
        self._sent = {f.relative_to(self.local).as_posix(): (f.stat().st_size, f.stat().st_mtime_ns)
                      for f in self.local.rglob("*") if f.is_file()}

    def sync(self) -> None:
        """Uploads every file of ``local`` whose size or mtime changed since the last sync."""
        if self.remote is None or not self.local.is_dir():
            return
        for f in self.local.rglob("*"):
            if not f.is_file():
                continue
            st = f.stat()
            rel = f.relative_to(self.local).as_posix()
            if self._sent.get(rel) != (st.st_size, st.st_mtime_ns):
                epath.Path(f).copy(self.remote / rel, overwrite=True)
                self._sent[rel] = (st.st_size, st.st_mtime_ns)

    def close(self) -> None:
        """A last ``sync``, then the local copy of a remote mirror is removed."""
        self.sync()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def native(path: PathLike, *, arrays: bool = False) -> Path | epath.Path:
    """``path`` for handing back to callers: a ``pathlib.Path`` when local (as before URIs were
    supported), an ``epath.Path`` for a URI (``pathlib`` would fold ``gs://`` into ``gs:/``;
    ``arrays`` as for ``as_path``)."""
    return as_path(path, arrays=arrays) if is_remote(path) else Path(os.fspath(path)).expanduser()


@contextlib.contextmanager
def synced_dir(path: PathLike) -> Iterator[Path]:
    """A local working copy of directory ``path``: itself when local; for a URI, a temporary
    directory holding the remote files, whose new and changed files are uploaded when the
    block ends, also on an error (so that a resumable job keeps its progress)."""
    if not is_remote(path):
        yield Path(as_path(path))
        return
    mirror = Mirror(path)
    mirror.pull()
    try:
        yield mirror.local
    except BaseException:
        try:
            mirror.close()
        except Exception as e:  # noqa: BLE001 - keep the original error
            log.warning("could not upload the partial results to %s: %s", os.fspath(path), e)
        raise
    mirror.close()


def local_working_copy(arg: str):
    """Decorator: when the function's directory argument ``arg`` is a URI, the function runs on
    ``synced_dir(arg)`` (a local copy uploaded at the end); a returned dict's ``arg`` entry
    names the URI again. For functions written against local files (resumable outputs)."""

    def deco(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            path = bound.arguments.get(arg)
            if path is None or not is_remote(path):
                return fn(*args, **kwargs)
            as_path(path)  # an unsupported scheme fails here
            with synced_dir(path) as local:
                bound.arguments[arg] = local
                out = fn(*bound.args, **bound.kwargs)
            if isinstance(out, dict) and arg in out:
                out = {**out, arg: os.fspath(path)}
            return out

        return wrapper

    return deco
