"""MMLU-Pro (``TIGER-Lab/MMLU-Pro``, test split): 5-shot with the first 5 VALIDATION
examples of the question's category; up to 10 options (A-J). As in the original, the
prompt is ``Question:\\n...\\nChoices:\\nA. ...\\n`` with NO ``Answer:`` cue (unlike MMLU),
shot answers are the bare letter, and the model's answer is the first option letter in its
completion followed by a non-alphanumeric character or the end."""

from __future__ import annotations

from l2d_jax.errors import L2DError
from l2d_jax.evaluation.extract import choice_letters
from l2d_jax.evaluation.tasks import register
from l2d_jax.evaluation.tasks.base import Example
from l2d_jax.evaluation.tasks.mmlu import group_by
from l2d_jax.evaluation.tasks.qa_common import MultipleChoiceTask, render_choices_question


def shared_category(category: str) -> str:
    """The original's guidance category: "math" for math, "general_qa" for the rest."""
    return "math" if category == "math" else "general_qa"


@register
class MMLUPro(MultipleChoiceTask):
    name = "mmlu_pro"
    default_source = "TIGER-Lab/MMLU-Pro"
    hub_config = None
    test_split = "test"
    shots_split = "validation"

    def build_examples(self) -> list[Example]:
        self._by_category = None
        return super().build_examples()

    def make_example(self, index: int, row: dict, shots: list[dict]) -> Example | None:
        if self._by_category is None:
            self._by_category = group_by(shots, "category")
        category = row["category"]
        picked = self._by_category.get(category, [])[: self.num_shots]
        if len(picked) < self.num_shots:
            raise L2DError(f"mmlu_pro: only {len(picked)} validation examples of category "
                           f"{category!r} for {self.num_shots} shots")
        turns = []
        for s in picked:
            labels = choice_letters(len(s["options"]))
            turns.append((render_choices_question(s["question"], s["options"], labels, answer_cue=False),
                          labels[int(s["answer_index"])]))
        labels = choice_letters(len(row["options"]))
        msgs = self.conversation(turns, render_choices_question(row["question"], row["options"], labels,
                                                                answer_cue=False))
        gold = labels[int(row["answer_index"])]
        return Example(id=self.example_id(index, row), prompt_messages=msgs, reference=gold,
                       category=category, meta={"labels": labels, "target": gold,
                                                "guidance_category": shared_category(category)})
