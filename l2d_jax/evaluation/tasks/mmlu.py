"""MMLU (``cais/mmlu``, config ``all``, test split): 5-shot with the first 5 DEV examples
of the question's subject; prompt ``Question:\\n...\\nChoices:\\nA. ...\\n\\nAnswer:``, shot
answers are the bare letter; the model's answer is the first option letter (A-D) in its
completion that is followed by a non-alphanumeric character or the end."""

from __future__ import annotations

from collections import defaultdict

from l2d_jax.errors import L2DError
from l2d_jax.evaluation.extract import choice_letters
from l2d_jax.evaluation.tasks import register
from l2d_jax.evaluation.tasks.base import Example
from l2d_jax.evaluation.tasks.qa_common import MultipleChoiceTask, render_choices_question

# Subjects the original maps to the shared guidance categories "math" / "coding"
# (tasks/constants.py MMLUCategories2Shared); every other subject is "general_qa".
MATH_SUBJECTS = frozenset({"abstract_algebra", "college_mathematics", "elementary_mathematics",
                           "high_school_mathematics", "high_school_statistics"})
CODING_SUBJECTS = frozenset({"high_school_computer_science"})


def shared_category(subject: str) -> str:
    if subject in MATH_SUBJECTS:
        return "math"
    if subject in CODING_SUBJECTS:
        return "coding"
    return "general_qa"


def group_by(rows: list[dict], key: str) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r[key]].append(r)
    return groups


def _letter(answer) -> int:
    """MMLU answers are indices 0..n-1 (some copies spell them as letters)."""
    if isinstance(answer, str) and not answer.isdigit():
        return ord(answer.strip().upper()) - ord("A")
    return int(answer)


@register
class MMLU(MultipleChoiceTask):
    name = "mmlu"
    default_source = "cais/mmlu"
    hub_config = "all"
    test_split = "test"
    shots_split = "dev"

    def build_examples(self) -> list[Example]:
        self._by_subject = None
        return super().build_examples()

    def make_example(self, index: int, row: dict, shots: list[dict]) -> Example | None:
        if self._by_subject is None:
            self._by_subject = group_by(shots, "subject")
        subject = row["subject"]
        picked = self._by_subject.get(subject, [])[: self.num_shots]
        if len(picked) < self.num_shots:
            raise L2DError(f"mmlu: only {len(picked)} dev examples of subject {subject!r} "
                           f"for {self.num_shots} shots")
        turns = []
        for s in picked:
            labels = choice_letters(len(s["choices"]))
            turns.append((render_choices_question(s["question"], s["choices"], labels),
                          labels[_letter(s["answer"])]))
        labels = choice_letters(len(row["choices"]))
        msgs = self.conversation(turns, render_choices_question(row["question"], row["choices"], labels))
        gold = labels[_letter(row["answer"])]
        return Example(id=self.example_id(index, row), prompt_messages=msgs, reference=gold,
                       category=subject, meta={"labels": labels, "target": gold,
                                               "guidance_category": shared_category(subject)})
