"""ARC (``allenai/ai2_arc``, configs ``ARC-Easy`` / ``ARC-Challenge``, test split): 5-shot
with the first 5 VALIDATION examples; options carry the dataset's own labels (``A``-``E``
or ``1``-``5``); prompt ``Question:\\n...\\nChoices:\\nA. ...\\n\\nAnswer:``; the answer is the
first allowed label in the completion followed by a non-alphanumeric character or the end."""

from __future__ import annotations

from l2d_jax.evaluation.tasks import register
from l2d_jax.evaluation.tasks.base import Example
from l2d_jax.evaluation.tasks.qa_common import MultipleChoiceTask, render_choices_question


class _ARC(MultipleChoiceTask):
    default_source = "allenai/ai2_arc"
    test_split = "test"
    shots_split = "validation"
    guidance_category = "general_qa"

    @staticmethod
    def _render(row: dict) -> tuple[str, list[str]]:
        labels = [str(x) for x in row["choices"]["label"]]
        return render_choices_question(row["question"], row["choices"]["text"], labels), labels

    def make_example(self, index: int, row: dict, shots: list[dict]) -> Example | None:
        turns = [(self._render(s)[0], str(s["answerKey"])) for s in shots[: self.num_shots]]
        question, labels = self._render(row)
        gold = str(row["answerKey"])
        if gold not in labels:
            return None
        return Example(id=self.example_id(index, row), prompt_messages=self.conversation(turns, question),
                       reference=gold, category=None,
                       meta={"labels": labels, "target": gold, "guidance_category": self.guidance_category})


@register
class ARCEasy(_ARC):
    name = "arc_easy"
    hub_config = "ARC-Easy"


@register
class ARCChallenge(_ARC):
    name = "arc_challenge"
    hub_config = "ARC-Challenge"
