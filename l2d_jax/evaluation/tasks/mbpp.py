"""MBPP (``google-research-datasets/mbpp``, config ``full``, split ``test``: 500 problems).

The user turn is the problem text and its first test inside a triple-quoted block
(``\"\"\"\\n<text>\\n<test_list[0]>\\n\"\"\"\\n``); the assistant answers with code. Shots: the
first ``num_shots`` (5) problems of the ``prompt`` split (task ids 1-10), a test problem whose
prompt equals a shot's is skipped. Program = extracted code + ``test_setup_code`` + the
``test_list`` asserts, run in the sandbox (3 s); 10 samples, pass@1/5/10.

Sources: the hub id (default) or a local .jsonl[.gz]/.json/.parquet file in the MBPP schema
(``task_id``, ``text`` (or ``prompt``, the sanitized config), ``code``, ``test_list``,
``test_setup_code``). Shots come from ``shots_source`` (default: the hub's ``prompt`` split;
a local file is read whole); ``num_shots=0`` needs none.
"""

from __future__ import annotations

from l2d_jax.errors import L2DError
from l2d_jax.evaluation.tasks import register
from l2d_jax.evaluation.tasks.base import Example, is_local_source, load_records
from l2d_jax.evaluation.tasks.code import CodeTask

HUB_ID = "google-research-datasets/mbpp"


def mbpp_prompt(row: dict) -> str:
    text = row.get("text") or row.get("prompt") or ""
    tests = list(row.get("test_list") or [])
    first = tests[0] if tests else ""
    return f'"""\n{text}\n{first}\n"""\n'


@register
class MBPP(CodeTask):
    name = "mbpp"
    default_source = HUB_ID

    def __init__(self, source: str | None = None, limit: int | None = None, *,
                 config: str = "full", split: str = "test", shots_source: str | None = None,
                 shots_split: str = "prompt", **kw):
        super().__init__(source=source, limit=limit, **kw)
        self.config = config
        self.split = split
        self.shots_source = shots_source or HUB_ID
        self.shots_split = shots_split

    def _load(self, source: str, split: str) -> list[dict]:
        if is_local_source(source):
            return load_records(source, split=split)
        return load_records(source, self.config, split=split)

    def shot_rows(self) -> list[dict]:
        if self.num_shots <= 0:
            return []
        try:
            rows = self._load(self.shots_source, self.shots_split)
        except L2DError as e:
            raise L2DError(f"MBPP shots: {e} (pass shots_source=<a local file of the "
                           f"'prompt' split> or num_shots=0)") from e
        return rows[: self.num_shots]

    def build_examples(self) -> list[Example]:
        rows = self._load(self.source, self.split)
        shots = self.shot_rows()
        shot_turns: list[dict] = []
        for s in shots:
            shot_turns += [{"role": "user", "content": mbpp_prompt(s)},
                           {"role": "assistant", "content": s["code"]}]
        shot_prompts = {mbpp_prompt(s) for s in shots}
        out = []
        for row in rows:
            prompt = mbpp_prompt(row)
            if prompt in shot_prompts:
                continue
            out.append(Example(
                id=str(row["task_id"]),
                prompt_messages=shot_turns + [{"role": "user", "content": prompt}],
                reference={"test_list": list(row.get("test_list") or []),
                           "test_setup_code": row.get("test_setup_code") or "",
                           "code": row.get("code")}))
        return out

    def build_program(self, example: Example, code: str) -> str:
        ref = example.reference
        parts = [code, ref.get("test_setup_code") or "", "\n".join(ref["test_list"])]
        return "\n".join(parts) + "\n"
