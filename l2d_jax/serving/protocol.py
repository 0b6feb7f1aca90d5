"""The OpenAI request bodies ``l2d-jax serve`` accepts, as pydantic models.

Only the fields the server acts on are declared; other fields (OpenAI clients send some,
e.g. ``user``, ``presence_penalty``) are ignored. The L2D extensions (``ode_steps``,
``top_k``, ``guidance``, ``class_label``) are top-level fields, i.e. what the ``openai``
client's ``extra_body`` sends. Limits that depend on the engine (``n`` <= slots, the
context length, ``ode_steps`` <= its maximum) are checked by ``api.py`` and the engine.
Responses are plain dicts built in ``api.py`` (OpenAI's JSON shapes).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator

DEFAULT_MAX_TOKENS = 256  # without max_tokens: this many, or what the context has room for
MAX_STOP_STRINGS = 4


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with ``usage`` (no choices)."""

    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1)] = 1
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**32)] | None = None  # jax.random.PRNGKey(seed)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # L2D extensions (the openai client's extra_body)
    ode_steps: Annotated[int, Field(ge=0)] | None = None
    top_k: Annotated[int, Field(ge=0)] = 0
    guidance: float | None = None
    class_label: Annotated[int, Field(ge=0)] | None = None

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v):
        if v is not None and any(s == "" for s in ([v] if isinstance(v, str) else v)):
            raise ValueError("stop strings must not be empty")
        return v

    def stop_strings(self) -> tuple[str, ...]:
        return () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def asked_max_tokens(self) -> int | None:
        """max_tokens as asked (None: not given)."""
        return self.max_tokens

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: one prompt (a string or token ids, or a list of one of them)
    and ``logprobs`` (any count: the chosen token's log-probability is reported). ``echo`` and
    ``best_of`` > 1 are refused rather than ignored: they change what the answer means."""

    prompt: StrictStr | list[int]
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False  # refused: scoring the prompt is not supported
    best_of: int | None = None  # refused above 1

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("not supported (prompt tokens are not scored)")
        return v

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError(f"not supported (got {v}); use n for several completions")
        return v

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v):
        """``["text"]`` / ``[[ids]]`` -> the one prompt; batches are refused."""
        if isinstance(v, list) and v and isinstance(v[0], str | list):
            if len(v) != 1:
                raise ValueError(f"one prompt per request, got {len(v)}")
            return v[0]
        return v


class TextPart(BaseModel):
    """A ``{"type": "text", "text": ...}`` part of a message's content."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    """One chat turn: a role and text content (a string or text parts)."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``: ``messages`` through the tokenizer's chat template;
    ``logprobs: true`` reports each chosen token's log-probability; newer clients send
    ``max_completion_tokens`` instead of ``max_tokens``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: bool = False
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None

    def asked_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
