"""The evaluation Task interface (spec section 9, "Evaluation").

A task turns a benchmark into chat-formatted prompts (few-shot turns included), scores one
completion at a time and aggregates the scores. The runner (not the task) applies the
tokenizer's chat template, generates ``num_samples`` completions of at most
``max_new_tokens`` tokens per example, calls :meth:`Task.score` on each and
:meth:`Task.aggregate` on the lot.

Prompt convention: ``Example.prompt_messages`` is a list of ``{"role", "content"}`` dicts
(``system`` / ``user`` / ``assistant``). When the LAST message is an ``assistant`` message,
it is a partial answer that the model continues: render with ``add_generation_prompt=False,
continue_final_message=True`` (see :func:`render_prompt`), and the completion is the text
generated after it (without the prefix). Otherwise render with ``add_generation_prompt=True``.

Sources: ``source=None`` uses the task's ``default_source`` (a hub id, loaded lazily with
``datasets.load_dataset``); a path ending in ``.jsonl``, ``.jsonl.gz``, ``.json`` or
``.parquet`` is read locally (see :func:`load_records`).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from pathlib import Path
from typing import Any, Sequence

from l2d_jax.errors import L2DError

LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")


@dataclasses.dataclass
class Example:
    """One test item. ``reference`` is whatever :meth:`Task.score` needs (gold answer, tests)."""

    id: str
    prompt_messages: list[dict]
    reference: Any
    category: str | None = None
    meta: dict = dataclasses.field(default_factory=dict)


class Task:
    """Base class. Subclasses set the class attributes and implement
    :meth:`build_examples` and :meth:`score` (and may override :meth:`aggregate`)."""

    name: str = "task"
    max_new_tokens: int = 256
    num_samples: int = 1
    is_code: bool = False
    num_shots: int = 5
    default_source: str | None = None

    def __init__(self, source: str | None = None, limit: int | None = None, **kw):
        self.source = source if source is not None else self.default_source
        self.limit = limit
        self.options = dict(kw)
        self._examples: list[Example] | None = None

    # ---------------------------------------------------------------- data
    def build_examples(self) -> list[Example]:
        """All test examples (before ``limit``), in dataset order."""
        raise NotImplementedError

    def examples(self) -> list[Example]:
        """The test examples, the first ``limit`` of them when a limit is set (cached)."""
        if self._examples is None:
            self._examples = list(self.build_examples())
        if self.limit is not None:
            return self._examples[: max(0, int(self.limit))]
        return list(self._examples)

    def category_names(self) -> list[str]:
        """Sorted distinct categories of the examples (class labels for guidance index it)."""
        return sorted({e.category for e in self.examples() if e.category is not None})

    def check_ready(self) -> None:
        """Raises :class:`L2DError` when the task cannot score (e.g. no sandbox for code).
        The runner calls it BEFORE generating, so that a run fails fast. No-op by default."""

    # ------------------------------------------------------------- scoring
    def score(self, example: Example, completion: str) -> dict:
        """``{"correct": bool, "formatted": bool, "extracted": ...}`` (+ task-specific keys)."""
        raise NotImplementedError

    def score_many(self, items: Sequence[tuple[Example, str]]) -> list[dict]:
        """Scores (example, completion) pairs; code tasks override it to run in parallel."""
        return [self.score(ex, c) for ex, c in items]

    def aggregate(self, per_example: list[list[dict]]) -> dict:
        """``per_example[i][j]`` = score of sample j of example i.

        ``accuracy`` / ``format_accuracy``: mean over examples of the fraction of correct /
        formatted samples (with one sample: the plain fraction of examples)."""
        n = len(per_example)
        if n == 0:
            return {"n": 0, "accuracy": 0.0, "format_accuracy": 0.0}

        def frac(scores: list[dict], key: str) -> float:
            return sum(bool(s.get(key)) for s in scores) / len(scores) if scores else 0.0

        return {
            "n": n,
            "accuracy": sum(frac(s, "correct") for s in per_example) / n,
            "format_accuracy": sum(frac(s, "formatted") for s in per_example) / n,
        }


# ------------------------------------------------------------------ helpers
def is_local_source(source: str) -> bool:
    return str(source).lower().endswith(LOCAL_SUFFIXES) or os.path.exists(str(source))


def load_records(source: str, config: str | None = None, split: str | None = None,
                 **load_kw) -> list[dict]:
    """Rows of a local ``.jsonl[.gz]`` / ``.json[.gz]`` / ``.parquet`` file, or of the hub
    dataset ``source`` (``datasets.load_dataset(source, config, split=split)``).

    A ``.json`` file holds a list of rows or ``{split: [rows]}`` / ``{"data": [rows]}``."""
    src = str(source)
    if is_local_source(src):
        path = Path(src).expanduser()
        if not path.is_file():
            raise L2DError(f"dataset file not found: {path}")
        low = path.name.lower()
        opener = gzip.open if low.endswith(".gz") else open
        if low.endswith((".jsonl", ".jsonl.gz")):
            with opener(path, "rt", encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        if low.endswith((".json", ".json.gz")):
            with opener(path, "rt", encoding="utf-8") as f:
                data = json.load(f)
            if isinstance(data, dict):
                for key in (split, "data", "rows", "test"):
                    if key and isinstance(data.get(key), list):
                        return list(data[key])
                raise L2DError(f"{path}: a .json dataset must be a list of rows or hold "
                               f"one under {split or 'data'!r}")
            return list(data)
        if low.endswith(".parquet"):
            try:
                import pyarrow.parquet as pq
            except ImportError:  # pragma: no cover
                import datasets

                return [dict(r) for r in datasets.load_dataset("parquet", data_files=str(path),
                                                               split="train")]
            return pq.read_table(path).to_pylist()
        raise L2DError(f"unsupported dataset file {path} (use {', '.join(LOCAL_SUFFIXES)})")
    try:
        import datasets
    except ImportError as e:  # pragma: no cover
        raise L2DError("loading a hub dataset needs `pip install datasets`") from e
    try:
        ds = datasets.load_dataset(src, config, split=split, **load_kw)
    except Exception as e:  # network, unknown id, ...
        raise L2DError(f"could not load dataset {src!r} (config {config!r}, split {split!r}): "
                       f"{type(e).__name__}: {e}. Pass a local .jsonl/.json/.parquet file "
                       f"as the source instead.") from e
    return [dict(r) for r in ds]


def render_prompt(tokenizer, messages: list[dict], **kw):
    """Applies the tokenizer's chat template following the convention above (a trailing
    assistant message is continued). ``kw`` goes to ``apply_chat_template`` (e.g.
    ``tokenize=False``, ``chat_template=...``)."""
    if messages and messages[-1].get("role") == "assistant":
        return tokenizer.apply_chat_template(messages, add_generation_prompt=False,
                                             continue_final_message=True, **kw)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kw)
