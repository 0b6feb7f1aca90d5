"""``l2d-jax serve``: an OpenAI-compatible HTTP server with continuous batching.

- ``requests.py``: what the HTTP layer hands the engine (``EngineRequest``) and the events it
  gets back (``Token``, ``Finished``, ``Failed``).
- ``slots.py``: the device side, pure functions: a fixed number of decode slots with a
  stacked KV cache, each slot with its own ODE step count, sampler settings and PRNG key as
  run-time arrays; ``insert`` puts a prefilled prompt into a slot, ``decode`` runs several
  iterations per dispatch, each slot one network pass per iteration (a main step or one
  ODE stage), so a 0-step request never waits for a neighbour's ODE.
- ``engine.py``: the host side: the waiting queue, slot assignment, the dispatch loop on
  its own thread, cancellation, shutdown.
- ``api.py``: the FastAPI app (OpenAI routes, server-sent events, errors, Prometheus).
"""
