"""PIQA (``ybisk/piqa``): 5-shot with the first 5 TRAIN examples; scored on the
VALIDATION split (the test labels are hidden). Prompt ``Goal:\\n...\\nOptions:\\nA. sol1\\n
B. sol2\\n\\nAnswer:``; the answer is the first of ``A``/``B`` in the completion followed by a
non-alphanumeric character or the end.

``ybisk/piqa`` is a script dataset, which ``datasets`` >= 4 no longer runs; the default
source therefore reads the hub's auto-converted parquet branch
(``revision="refs/convert/parquet"``). Any copy with goal/sol1/sol2/label works."""

from __future__ import annotations

from l2d_jax.evaluation.tasks import register
from l2d_jax.evaluation.tasks.base import Example
from l2d_jax.evaluation.tasks.qa_common import MultipleChoiceTask, render_choices_question

LABELS = ["A", "B"]


def _render(row: dict) -> str:
    return render_choices_question(row["goal"], [row["sol1"], row["sol2"]], LABELS,
                                   head="Goal", options_head="Options")


@register
class PIQA(MultipleChoiceTask):
    name = "piqa"
    default_source = "ybisk/piqa"
    hub_config = None
    hub_kwargs = {"revision": "refs/convert/parquet"}
    test_split = "validation"
    shots_split = "train"
    guidance_category = "general_qa"

    def make_example(self, index: int, row: dict, shots: list[dict]) -> Example | None:
        label = int(row["label"])
        if label not in (0, 1):  # unlabelled (test) rows
            return None
        turns = [(_render(s), LABELS[int(s["label"])]) for s in shots[: self.num_shots]]
        gold = LABELS[label]
        return Example(id=self.example_id(index, row), prompt_messages=self.conversation(turns, _render(row)),
                       reference=gold, category=None,
                       meta={"labels": list(LABELS), "target": gold, "guidance_category": self.guidance_category})
