"""GSM8K (``openai/gsm8k``, config ``main``): 5-shot, the first 5 TRAIN examples as shots
(question -> full worked answer ending in ``#### n``); the answer is the number after
``####`` (numbers compared by value: ``1,000`` == ``1000``, ``5.0`` == ``5``)."""

from __future__ import annotations

from l2d_jax.evaluation import extract
from l2d_jax.evaluation.tasks import register
from l2d_jax.evaluation.tasks.base import Example
from l2d_jax.evaluation.tasks.qa_common import FewShotTask


@register
class GSM8K(FewShotTask):
    name = "gsm8k"
    default_source = "openai/gsm8k"
    hub_config = "main"
    test_split = "test"
    shots_split = "train"
    max_new_tokens = 256
    guidance_category = "math"

    def make_example(self, index: int, row: dict, shots: list[dict]) -> Example | None:
        reference = extract.gsm8k_answer(row["answer"])
        if reference is None:
            return None
        picked = shots[: self.num_shots]
        msgs = self.conversation([(s["question"], s["answer"]) for s in picked], row["question"])
        return Example(id=self.example_id(index, row), prompt_messages=msgs, reference=reference,
                       category=None, meta={"target": row["answer"],
                                            "guidance_category": self.guidance_category})

    def score(self, example: Example, completion: str) -> dict:
        extracted = extract.gsm8k_answer(completion)
        return {"correct": extract.numbers_equal(extracted, example.reference),
                "formatted": extracted is not None, "extracted": extracted}
