"""The OpenAI-compatible FastAPI app of ``l2d-jax serve``.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON, or server-sent events
with ``stream``), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text).

A request becomes one ``EngineRequest``; the engine's events (on its own thread) reach the
event loop through ``loop.call_soon_threadsafe``. Each choice is detokenized incrementally:
the whole token list is decoded and the new suffix released, holding back an incomplete
UTF-8 character ("\\ufffd" at the end) and any tail that could still be the start of a
``stop`` string. A matched stop string ends its choice (the match and what follows are
dropped, finish_reason "stop"); once every choice has ended the engine request is
cancelled, as it is when the client goes away. Errors are OpenAI's error JSON: invalid
fields 400 (``param`` names the field), unknown model 404, full queue 429, engine failure
500 (that request only), shutting down 503.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException

from l2d_jax.errors import UsageError
from l2d_jax.serving.protocol import DEFAULT_MAX_TOKENS, ChatCompletionRequest, CompletionRequest
from l2d_jax.serving.requests import EngineClosed, EngineRequest, Failed, Finished, QueueFull, Token

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ApiError(Exception):
    """An error answered as OpenAI's ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def json(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.json(), status_code=self.status)


# --------------------------------------------------------------------------- metrics


class _EngineCollector:
    """Queue length, slots and the engine's totals, read from ``engine.stats()`` per scrape."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        yield GaugeMetricFamily("l2d_queue_length", "Requests waiting for a decode slot.", value=s["queue_length"])
        yield GaugeMetricFamily("l2d_active_slots", "Decode slots in use.", value=s["active_slots"])
        yield GaugeMetricFamily("l2d_slots", "Decode slots.", value=s["slots"])
        yield CounterMetricFamily("l2d_generated_tokens", "Tokens generated.", value=s["tokens_total"])
        yield CounterMetricFamily("l2d_nfe", "Flow (velocity) evaluations.", value=s["nfe_total"])
        yield CounterMetricFamily("l2d_engine_requests", "Requests the engine accepted.", value=s["requests_total"])


@dataclasses.dataclass
class _Metrics:
    """The app's Prometheus metrics, in a registry of its own."""

    registry: CollectorRegistry
    requests: Counter
    ttft: Histogram
    tpot: Histogram

    @classmethod
    def create(cls, engine) -> _Metrics:
        reg = CollectorRegistry()
        reg.register(_EngineCollector(engine))
        return cls(
            reg,
            Counter("l2d_http_requests", "HTTP requests by route and status.", ("route", "status"), registry=reg),
            Histogram("l2d_time_to_first_token_seconds", "Request arrival to its first token.",
                      buckets=_LATENCY_BUCKETS, registry=reg),
            Histogram("l2d_time_per_output_token_seconds",
                      "Per choice: (last token - first token) / (tokens - 1).", buckets=_LATENCY_BUCKETS,
                      registry=reg))


class _CountRequests:
    """ASGI middleware: counts every HTTP request by route and response status."""

    def __init__(self, app, counter: Counter):
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.counter.labels(route, str(status)).inc()


# --------------------------------------------------------------------------- one request


@dataclasses.dataclass
class _Choice:
    """One choice's decoding state. ``ends[i]``: the text length once token i is in (the
    held-back tail excluded); token i's text is ``text[ends[i-1]:ends[i]]``."""

    ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    ends: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    sent_chars: int = 0
    sent_tokens: int = 0
    finish_reason: str | None = None  # set when the client has seen its end
    engine_done: bool = False
    nfe: int = 0
    first_at: float = 0.0
    last_at: float = 0.0

    def start(self, i: int) -> int:
        return self.ends[i - 1] if i else 0


@dataclasses.dataclass(frozen=True)
class _Delta:
    """New text of choice ``index`` and its tokens ``[token_start, token_stop)``."""

    index: int
    text: str
    token_start: int
    token_stop: int
    finish_reason: str | None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of ``text`` that could still begin a stop string."""
    longest = max((len(s) - 1 for s in stops), default=0)
    for k in range(min(longest, len(text)), 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in stops):
            return k
    return 0


class _Generation:
    """One engine request seen from the event loop: events in, text deltas per choice out."""

    def __init__(self, server: _Server, request: EngineRequest, stops: tuple[str, ...]):
        self.server, self.request, self.stops = server, request, stops
        self.choices = [_Choice() for _ in range(request.n)]
        self.arrived = time.perf_counter()
        self.first_token = True
        self.finished = False
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        engine = server.engine
        try:
            self.id = engine.submit(request, lambda ev: loop.call_soon_threadsafe(self.queue.put_nowait, ev))
        except QueueFull as e:
            raise ApiError(429, f"the server is busy ({e or 'queue full'}); retry later",
                           type_="rate_limit_exceeded", code="queue_full") from None
        except EngineClosed:
            raise ApiError(503, "the server is shutting down", type_="service_unavailable") from None

    async def deltas(self) -> AsyncIterator[_Delta]:
        """Yields text deltas until every choice has ended (the engine's ``Finished`` for each);
        ApiError 500 when the engine fails the request. Leaving early cancels the request."""
        try:
            while not all(c.engine_done for c in self.choices):
                event = await self.queue.get()
                if isinstance(event, Failed):
                    self.finished = True
                    raise ApiError(500, f"generation failed: {event.message}", type_="server_error")
                delta = self._token(event) if isinstance(event, Token) else self._finished(event)
                if delta is None:
                    continue
                if all(c.finish_reason for c in self.choices) and not all(c.engine_done for c in self.choices):
                    self.server.engine.cancel(self.id)  # choices cut by a stop string may still run
                if delta.text or delta.finish_reason:
                    yield delta
            self.finished = True
        finally:
            self.close()

    def close(self) -> None:
        """Cancels the engine request unless every choice has ended."""
        if not self.finished:
            self.server.engine.cancel(self.id)

    def _token(self, ev: Token) -> _Delta | None:
        c = self.choices[ev.index]
        now = time.perf_counter()
        if self.first_token:
            self.first_token = False
            self.server.metrics.ttft.observe(now - self.arrived)
        c.first_at, c.last_at = c.first_at or now, now
        if c.finish_reason is not None:  # after a stop string: tokens until the cancel lands
            return None
        c.ids.append(ev.token_id)
        c.logprobs.append(ev.logprob)
        text = self.server.decode(c.ids).rstrip("\ufffd")
        c.ends.append(len(text))
        cut = min((i for s in self.stops if (i := text.find(s)) >= 0), default=-1)
        if cut >= 0:
            c.text = text[:cut]
            return self._release(ev.index, len(c.text), "stop")
        c.text = text
        return self._release(ev.index, len(text) - _held_back(text, self.stops), None)

    def _finished(self, ev: Finished) -> _Delta | None:
        c = self.choices[ev.index]
        c.engine_done, c.nfe = True, ev.nfe
        if ev.tokens > 1:
            self.server.metrics.tpot.observe((c.last_at - c.first_at) / (ev.tokens - 1))
        if c.finish_reason is not None:
            return None
        c.text = self.server.decode(c.ids)  # nothing more comes: the held-back tail is final
        c.ends[-1:] = [len(c.text)] if c.ends else []
        return self._release(ev.index, len(c.text), ev.reason)

    def _release(self, index: int, upto: int, finish_reason: str | None) -> _Delta:
        """Sends ``text[sent_chars:upto]`` with the tokens whose text is complete within it
        (at the end of the choice: every token that starts before ``upto``)."""
        c = self.choices[index]
        stop_token = c.sent_tokens
        while stop_token < len(c.ids) and (
                c.ends[stop_token] <= upto if finish_reason is None else c.start(stop_token) < upto):
            stop_token += 1
        delta = _Delta(index, c.text[c.sent_chars:upto], c.sent_tokens, stop_token, finish_reason)
        c.sent_chars, c.sent_tokens = max(c.sent_chars, upto), stop_token
        c.finish_reason = finish_reason
        return delta

    def usage(self) -> dict:
        completion = sum(c.sent_tokens for c in self.choices)
        prompt = len(self.request.prompt_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "nfe": sum(c.nfe for c in self.choices)}


# --------------------------------------------------------------------------- response shapes


def _logprobs(gen: _Generation, d: _Delta, chat: bool) -> dict:
    c = gen.choices[d.index]
    span = range(d.token_start, d.token_stop)
    pieces = [c.text[c.start(i):min(c.ends[i], len(c.text))] for i in span]
    if chat:
        return {"content": [{"token": p, "logprob": c.logprobs[i], "bytes": list(p.encode()), "top_logprobs": []}
                            for i, p in zip(span, pieces, strict=True)]}
    return {"tokens": pieces, "token_logprobs": [c.logprobs[i] for i in span],
            "text_offset": [c.start(i) for i in span], "top_logprobs": None}


def _choice(gen: _Generation, d: _Delta, chat: bool, want_logprobs: bool, stream: bool) -> dict:
    out: dict = {"index": d.index}
    if not chat:
        out["text"] = d.text
    elif stream:
        out["delta"] = {"content": d.text} if d.text else {}
    else:
        out["message"] = {"role": "assistant", "content": d.text}
    out["logprobs"] = _logprobs(gen, d, chat) if want_logprobs else None
    out["finish_reason"] = d.finish_reason
    return out


@dataclasses.dataclass
class _Server:
    """What the routes share: the engine, the tokenizer, the served name, the metrics."""

    engine: object
    tokenizer: object
    model_name: str
    metrics: _Metrics

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def engine_request(self, body: CompletionRequest | ChatCompletionRequest, prompt_ids: list[int],
                       prompt_field: str) -> EngineRequest:
        """Checks the model name, max_tokens and the prompt against the context, builds the
        request (the engine checks the rest when it is submitted)."""
        if body.model != self.model_name:
            raise ApiError(404, f"model: the model `{body.model}` does not exist; this server serves "
                                f"`{self.model_name}`", "model", code="model_not_found")
        context, asked = self.engine.config.max_seq_len, body.asked_max_tokens()
        if asked is not None and asked > context:
            raise ApiError(400, f"max_tokens: {asked} is more than the context holds ({context} tokens)",
                           "max_tokens")
        if len(prompt_ids) >= context:
            raise ApiError(400, f"{prompt_field}: {len(prompt_ids)} tokens leave no room for a new token in "
                                f"the context of {context}", prompt_field)
        return EngineRequest(
            prompt_ids=tuple(prompt_ids),
            max_tokens=min(DEFAULT_MAX_TOKENS, context - len(prompt_ids)) if asked is None else asked,
            ode_steps=self.engine.default_ode_steps if body.ode_steps is None else body.ode_steps,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k, n=body.n, seed=body.seed,
            class_label=body.class_label, guidance=body.guidance)

    def generation(self, request: EngineRequest, stops: tuple[str, ...], prompt_field: str) -> _Generation:
        try:
            return _Generation(self, request, stops)
        except UsageError as e:  # the engine names the field first: "ode_steps: must be ..."
            name = str(e).split(":")[0].split(" ")[0]
            if not name.isidentifier():
                raise ApiError(400, str(e)) from None
            param = prompt_field if name == "prompt" else name
            raise ApiError(400, param + str(e)[len(name):], param) from None

    async def respond(self, http: Request, body: CompletionRequest | ChatCompletionRequest,
                      prompt_ids: list[int], chat: bool) -> Response:
        prompt_field = "messages" if chat else "prompt"
        request = self.engine_request(body, prompt_ids, prompt_field)
        gen = self.generation(request, body.stop_strings(), prompt_field)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "created": int(time.time()), "model": self.model_name}
        want_logprobs = bool(body.logprobs) if chat else body.logprobs is not None
        if body.stream:
            return _EventStream(gen, self._events(gen, head, chat, want_logprobs, body.include_usage()))
        watcher = asyncio.create_task(_cancel_on_disconnect(http, gen))
        try:
            ends = [d async for d in gen.deltas() if d.finish_reason is not None]
        finally:
            watcher.cancel()
        choices = []
        for d in sorted(ends, key=lambda d: d.index):
            c = gen.choices[d.index]
            whole = _Delta(d.index, c.text[:c.sent_chars], 0, c.sent_tokens, d.finish_reason)
            choices.append(_choice(gen, whole, chat, want_logprobs, stream=False))
        return JSONResponse({**head, "object": "chat.completion" if chat else "text_completion",
                             "choices": choices, "usage": gen.usage()})

    async def _events(self, gen: _Generation, head: dict, chat: bool, want_logprobs: bool,
                      include_usage: bool) -> AsyncIterator[str]:
        """The SSE stream: OpenAI chunks, an error chunk if the engine fails, ``[DONE]``."""
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(choices: list[dict], **extra) -> str:
            return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

        try:
            if chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(len(gen.choices))])
            async for d in gen.deltas():
                yield chunk([_choice(gen, d, chat, want_logprobs, stream=True)])
            if include_usage:
                yield chunk([], usage=gen.usage())
        except ApiError as e:
            yield f"data: {json.dumps(e.json())}\n\n"
        yield "data: [DONE]\n\n"


class _EventStream(StreamingResponse):
    """Server-sent events that cancel ``gen`` however the response ends, also when the
    client leaves before the first chunk (the events' generator then never starts)."""

    def __init__(self, gen: _Generation, events: AsyncIterator[str]):
        super().__init__(events, media_type="text/event-stream")
        self.gen = gen

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.gen.close()


async def _cancel_on_disconnect(http: Request, gen: _Generation) -> None:
    """Waits for the client to go away (the request body was read), then cancels ``gen``."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
    gen.server.engine.cancel(gen.id)


# --------------------------------------------------------------------------- prompts


def _completion_prompt(tokenizer, body: CompletionRequest) -> list[int]:
    if isinstance(body.prompt, str):
        return list(tokenizer(body.prompt, add_special_tokens=True)["input_ids"])
    bad = [t for t in body.prompt if not 0 <= t < len(tokenizer)]
    if bad:
        raise ApiError(400, f"prompt: token id {bad[0]} is outside the vocabulary (0..{len(tokenizer) - 1})",
                       "prompt")
    return list(body.prompt)


def _chat_prompt(tokenizer, body: ChatCompletionRequest) -> list[int]:
    """The chat template over ``messages`` with the assistant turn opened."""
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "messages: this model's tokenizer has no chat template; use /v1/completions",
                       "messages")
    msgs = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    except Exception as e:  # noqa: BLE001 - the template's own checks (jinja raise_exception)
        raise ApiError(400, f"messages: the chat template refused them: {e}", "messages") from None
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


# --------------------------------------------------------------------------- errors


def _validation_error(errors: list[dict]) -> ApiError:
    """The first invalid field as a 400: ``param`` its name, the message naming it (of a
    union's alternatives, a violated limit if any, else the expected types)."""
    first = errors[0]
    if first["type"] == "json_invalid":
        where = f" at character {first['loc'][-1]}" if isinstance(first["loc"][-1], int) else ""
        return ApiError(400, f"malformed JSON body{where}: {first.get('ctx', {}).get('error', first['msg'])}")
    loc = [p for p in first["loc"] if p != "body"]
    if not loc:
        return ApiError(400, f"request body: {first['msg']}")
    param = str(loc[0])
    same = [e for e in errors if [p for p in e["loc"] if p != "body"][:1] == loc[:1]]
    limits = [e for e in same if not e["type"].endswith(("_type", "_parsing"))]
    if limits:
        msg = limits[0]["msg"].removeprefix("Value error, ")
    else:
        kinds = dict.fromkeys(e["msg"].removeprefix("Input should be ") for e in same)
        msg = "Input should be " + " or ".join(kinds) if len(kinds) > 1 else first["msg"]
    path = ".".join(str(p) for p in _field_path((limits or same)[0]["loc"]))
    return ApiError(400, f"{path}: {msg}", param)


def _field_path(loc) -> list:
    """``loc`` without "body" and pydantic's union-member tags ("str", "list[int]")."""
    return [p for p in loc if p != "body" and (isinstance(p, int) or (p.isidentifier() and p not in
                                                                     ("str", "int", "float", "bool")))]


def create_app(engine, tokenizer, model_name: str) -> FastAPI:
    """The app serving ``engine`` (started: ``Engine.start``) under ``model_name``."""
    server = _Server(engine, tokenizer, model_name, _Metrics.create(engine))
    app = FastAPI(title="l2d-jax serve")
    app.state.server = server
    app.add_middleware(_CountRequests, counter=server.metrics.requests)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return _validation_error(list(e.errors())).response()

    @app.exception_handler(HTTPException)
    async def _http(_: Request, e: HTTPException) -> JSONResponse:
        return ApiError(e.status_code, str(e.detail), type_="invalid_request_error").response()

    @app.exception_handler(Exception)
    async def _bug(_: Request, e: Exception) -> JSONResponse:
        return ApiError(500, f"internal error: {type(e).__name__}: {e}", type_="server_error").response()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request) -> Response:
        return await server.respond(http, body, _completion_prompt(tokenizer, body), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: Request) -> Response:
        return await server.respond(http, body, _chat_prompt(tokenizer, body), chat=True)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "l2d-jax"}]}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
