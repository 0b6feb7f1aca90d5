"""Shared machinery of the code tasks (HumanEval, MBPP): code extraction, sandboxed scoring,
pass@k aggregation. 10 samples per problem, 512 new tokens, 3 s per program (spec section 9)."""

from __future__ import annotations

import ast
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from l2d_jax.evaluation import passk, sandbox
from l2d_jax.evaluation.tasks.base import Example, Task

_FENCE = re.compile(r"^[ \t]*```[ \t]*([A-Za-z0-9_+.-]*)[ \t]*$")
_PY_TAGS = {"", "python", "py", "python3", "py3"}


def extract_code(completion: str, continuation: bool = False) -> str | None:
    """The code in a completion, or None when there is none.

    - No ``` fence: the whole completion (raw code, as the original scores it).
    - ``continuation`` (the prompt ended inside code, e.g. after a function signature), text
      before the first fence, and that fence closes a block (untagged, and an odd number of
      fences in all): that text (the continued code).
    - Otherwise the first fenced block tagged python/py (or untagged), else the first fenced
      block; an unclosed block runs to the end.
    """
    if completion is None:
        return None
    lines = completion.split("\n")
    fences = [(i, m.group(1).lower()) for i, line in enumerate(lines)
              if (m := _FENCE.match(line))]
    if not fences:
        return completion if completion.strip() else None
    first, first_tag = fences[0]
    head = "\n".join(lines[:first])
    # A closing fence is untagged, and then the fences after it pair up (odd count in all).
    if continuation and head.strip() and not first_tag and len(fences) % 2 == 1:
        return head
    blocks = []  # (tag, body) for each opening fence, pairing fences in order
    k = 0
    while k < len(fences):
        start, tag = fences[k]
        end = fences[k + 1][0] if k + 1 < len(fences) else len(lines)
        blocks.append((tag, "\n".join(lines[start + 1:end])))
        k += 2
    for tag, body in blocks:
        if tag in _PY_TAGS and body.strip():
            return body
    for _, body in blocks:
        if body.strip():
            return body
    return None


def parses(program: str) -> bool:
    """Whether ``program`` is syntactically valid Python (parsed, never run, here)."""
    try:
        ast.parse(program)
        return True
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
        return False


def default_workers() -> int:
    return max(1, min(16, (os.cpu_count() or 2) // 2))


class CodeTask(Task):
    """A task scored by running the extracted code plus the problem's tests in the sandbox.

    Options (``get_task(name, ...)``): ``allow_unsandboxed`` (default False), ``timeout_s``
    (3.0), ``workers`` (parallel programs in :meth:`score_many`), ``num_shots`` (5)."""

    max_new_tokens = 512
    num_samples = 10
    is_code = True
    timeout_s = 3.0
    ks = passk.DEFAULT_KS
    continuation = False  # whether prompts end inside code (a trailing assistant message)

    def __init__(self, source: str | None = None, limit: int | None = None, *,
                 allow_unsandboxed: bool = False, timeout_s: float | None = None,
                 workers: int | None = None, num_shots: int | None = None, **kw):
        super().__init__(source=source, limit=limit, **kw)
        self.allow_unsandboxed = bool(allow_unsandboxed)
        if timeout_s is not None:
            self.timeout_s = float(timeout_s)
        self.workers = int(workers) if workers else default_workers()
        if num_shots is not None:
            self.num_shots = int(num_shots)

    # subclasses -----------------------------------------------------------------------
    def build_program(self, example: Example, code: str) -> str:
        raise NotImplementedError

    def extract(self, example: Example, completion: str) -> str | None:
        return extract_code(completion, continuation=self.continuation)

    # scoring --------------------------------------------------------------------------
    def check_ready(self) -> None:
        sandbox.ensure_sandbox(self.allow_unsandboxed)

    def score(self, example: Example, completion: str) -> dict:
        code = self.extract(example, completion)
        if code is None:
            return {"correct": False, "formatted": False, "extracted": None,
                    "status": "failed", "reason": "no code found", "returncode": None,
                    "output_tail": "", "duration_s": 0.0}
        program = self.build_program(example, code)
        if not parses(program):
            return {"correct": False, "formatted": False, "extracted": code,
                    "status": "failed", "reason": "syntax error (not run)", "returncode": None,
                    "output_tail": "", "duration_s": 0.0}
        res = sandbox.execute(program, timeout_s=self.timeout_s,
                              allow_unsandboxed=self.allow_unsandboxed)
        return {"correct": res["status"] == "passed", "formatted": True, "extracted": code,
                "status": res["status"], "reason": res.get("reason"),
                "returncode": res["returncode"], "output_tail": res["output_tail"][-500:],
                "duration_s": res["duration_s"]}

    def score_many(self, items: Sequence[tuple[Example, str]]) -> list[dict]:
        items = list(items)
        if not items:
            return []
        self.check_ready()
        if self.workers <= 1 or len(items) == 1:
            return [self.score(ex, c) for ex, c in items]
        with ThreadPoolExecutor(max_workers=min(self.workers, len(items))) as pool:
            return list(pool.map(lambda it: self.score(*it), items))

    def aggregate(self, per_example: list[list[dict]]) -> dict:
        out = super().aggregate(per_example)
        counts = [(len(s), sum(bool(x.get("correct")) for x in s)) for s in per_example if s]
        out["pass_at_k"] = passk.aggregate_pass_at_k(counts, self.ks)
        return out
