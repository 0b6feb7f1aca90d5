"""MATH (competition mathematics, Hendrycks et al.): 5-shot with 5 EVENLY SPACED train
examples as shots (rows ``i * (N // 5)``, i = 0..4, of the N train rows: the original's
choice), problem -> full solution. The answer is the last ``\\boxed{}`` (nested braces),
normalised, else the last number; the reference is the last ``\\boxed{}`` of the gold
solution (test rows without one are dropped, as the original skipped them).

Sources. The original read ``lighteval/MATH``, which is no longer on the hub. The default
here is ``DigitalLearningGmbH/MATH-lighteval`` (config ``default``), a copy of it with the
same rows in the same order (7500 train / 5000 test; fields problem, level, solution,
type), so the shots are the original's. Any dataset with the fields ``problem`` and
``solution`` works (``source=`` hub id or local file); for ``EleutherAI/hendrycks_math``,
which has one config per subject, the seven subjects are concatenated in alphabetical
order (then the evenly spaced shots may differ from the original's).
"""

from __future__ import annotations

from l2d_jax.evaluation import extract
from l2d_jax.evaluation.tasks import register
from l2d_jax.evaluation.tasks.base import Example, is_local_source, load_records
from l2d_jax.evaluation.tasks.qa_common import FewShotTask

MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                 "number_theory", "prealgebra", "precalculus")
PER_SUBJECT_SOURCES = ("EleutherAI/hendrycks_math",)


def evenly_spaced(rows: list, k: int) -> list:
    """Rows ``i * (len(rows) // k)`` for i < k (the original's MATH shot choice)."""
    if k <= 0:
        return []
    step = len(rows) // k
    if step == 0:
        return list(rows[:k])
    return [rows[i * step] for i in range(k)]


@register
class MATH(FewShotTask):
    name = "math"
    default_source = "DigitalLearningGmbH/MATH-lighteval"
    hub_config = None
    test_split = "test"
    shots_split = "train"
    max_new_tokens = 256
    guidance_category = "math"

    def _load(self, source: str, split: str) -> list[dict]:
        if not is_local_source(source) and source in PER_SUBJECT_SOURCES and self.hub_config is None:
            rows = []
            for subject in MATH_SUBJECTS:
                rows.extend(load_records(source, subject, split=split))
            return rows
        return super()._load(source, split)

    def make_example(self, index: int, row: dict, shots: list[dict]) -> Example | None:
        boxed = extract.last_boxed(row["solution"])
        if boxed is None:
            return None
        reference = extract.normalize_math(boxed)
        if self._shots is None:
            self._shots = evenly_spaced(shots, self.num_shots)
        msgs = self.conversation([(s["problem"], s["solution"]) for s in self._shots], row["problem"])
        return Example(id=self.example_id(index, row), prompt_messages=msgs, reference=reference,
                       category=row.get("type"),
                       meta={"target": row["solution"], "level": row.get("level"),
                             "guidance_category": self.guidance_category})

    def build_examples(self) -> list[Example]:
        self._shots = None
        return super().build_examples()

    def score(self, example: Example, completion: str) -> dict:
        extracted = extract.math_answer(completion)
        return {"correct": extract.math_equal(extracted, example.reference),
                "formatted": extracted is not None, "extracted": extracted}
