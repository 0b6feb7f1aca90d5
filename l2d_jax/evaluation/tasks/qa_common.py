"""Shared pieces of the few-shot QA tasks (GSM8K, MATH, MMLU, MMLU-Pro, ARC, PIQA).

Data sources. Every task reads two row sets: the TEST rows and the rows its few-shot
examples come from (GSM8K / MATH / PIQA: train, MMLU: dev, MMLU-Pro / ARC: validation).

- ``source=None``: the task's hub dataset (``datasets.load_dataset``, imported lazily);
- ``source="<hub id>"``: another hub copy with the same fields;
- ``source="path/test.jsonl"`` (or .json / .parquet): local test rows; then the shots come
  from ``shots_source="path/train.jsonl"`` (required, a local file or a hub id).

Shot rows are never taken from the test rows themselves.
"""

from __future__ import annotations

from l2d_jax.errors import L2DError
from l2d_jax.evaluation.tasks.base import Example, Task, is_local_source, load_records

# The original's guidance categories (tasks/constants.py SharedTasks), in class-index order.
SHARED_CATEGORIES = ("math", "coding", "general_qa", "other")


class FewShotTask(Task):
    """A task whose prompt is ``num_shots`` (user, assistant) turns, then the question."""

    hub_config: str | None = None  # datasets config name of the default source
    test_split: str = "test"
    shots_split: str = "train"
    hub_kwargs: dict = {}  # extra load_dataset kwargs for the default source
    guidance_category: str = "general_qa"  # the original's shared category of this task

    def __init__(self, source: str | None = None, limit: int | None = None, *,
                 shots_source: str | None = None, num_shots: int | None = None,
                 hub_config: str | None = None, **kw):
        super().__init__(source=source, limit=limit, **kw)
        self.shots_source = shots_source
        if num_shots is not None:
            self.num_shots = int(num_shots)
        if hub_config is not None:
            self.hub_config = hub_config
        self.num_dropped = 0  # test rows without a usable reference

    # ---------------------------------------------------------------- data
    def _load(self, source: str, split: str) -> list[dict]:
        if is_local_source(source):
            return load_records(source)
        kw = dict(self.hub_kwargs) if source == self.default_source else {}
        return load_records(source, self.hub_config, split=split, **kw)

    def test_rows(self) -> list[dict]:
        return self._load(self.source, self.test_split)

    def shot_rows(self) -> list[dict]:
        src = self.shots_source
        if src is None:
            if is_local_source(self.source):
                raise L2DError(f"task {self.name}: a local test file ({self.source}) needs "
                               f"shots_source= (a file or hub id with the {self.shots_split!r} rows "
                               f"the {self.num_shots} few-shot examples come from)")
            src = self.source
        return self._load(src, self.shots_split)

    def build_examples(self) -> list[Example]:
        shots = self.shot_rows()
        out = []
        self.num_dropped = 0
        for i, row in enumerate(self.test_rows()):
            ex = self.make_example(i, row, shots)
            if ex is None:
                self.num_dropped += 1
            else:
                out.append(ex)
        return out

    def make_example(self, index: int, row: dict, shots: list[dict]) -> Example | None:
        raise NotImplementedError

    # ------------------------------------------------------------- helpers
    @staticmethod
    def conversation(shots: list[tuple[str, str]], question: str) -> list[dict]:
        msgs: list[dict] = []
        for q, a in shots:
            msgs.append({"role": "user", "content": q})
            msgs.append({"role": "assistant", "content": a})
        msgs.append({"role": "user", "content": question})
        return msgs

    def example_id(self, index: int, row: dict) -> str:
        for key in ("id", "question_id"):
            if row.get(key) not in (None, ""):
                return f"{self.name}/{row[key]}"
        return f"{self.name}/{index}"


def render_choices_question(question: str, choices: list[str], labels: list[str], *,
                            head: str = "Question", options_head: str = "Choices",
                            answer_cue: bool = True) -> str:
    """``Question:\\n{q}\\nChoices:\\nA. x\\nB. y\\n`` then ``\\nAnswer:`` (the original's
    multiple-choice layout; MMLU-Pro has no ``Answer:`` cue and ends after the last choice)."""
    text = f"{head}:\n{question}\n{options_head}:\n"
    text += "".join(f"{lab}. {c}\n" for lab, c in zip(labels, choices))
    return text + "\nAnswer:" if answer_cue else text


class MultipleChoiceTask(FewShotTask):
    """Scoring shared by the multiple-choice tasks: the first allowed option label in the
    completion (``extract.first_choice``) against the gold label; ``meta["labels"]`` holds
    the example's allowed labels."""

    max_new_tokens = 256

    def score(self, example: Example, completion: str) -> dict:
        from l2d_jax.evaluation.extract import first_choice

        extracted = first_choice(completion, example.meta["labels"])
        return {"correct": extracted is not None and extracted == example.reference,
                "formatted": extracted is not None, "extracted": extracted}
