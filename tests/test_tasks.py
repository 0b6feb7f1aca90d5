"""Benchmark tasks (GSM8K, MATH, MMLU, MMLU-Pro, ARC, PIQA): shot selection, prompt layout,
answer extraction and scoring on hand-written completions, from small local fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from l2d_jax.errors import L2DError
from l2d_jax.evaluation import extract
from l2d_jax.evaluation.tasks import TASKS, get_task, task_names

FIX = Path(__file__).resolve().parent / "fixtures"


def rows(name):
    return [json.loads(line) for line in (FIX / name).read_text().splitlines() if line.strip()]


def task(name, test, shots, **kw):
    return get_task(name, source=str(FIX / test), shots_source=str(FIX / shots), **kw)


def check_layout(ex, n_shots=5):
    msgs = ex.prompt_messages
    assert len(msgs) == 2 * n_shots + 1
    assert [m["role"] for m in msgs] == ["user", "assistant"] * n_shots + ["user"]
    return msgs


def score(t, ex, completion):
    s = t.score(ex, completion)
    assert set(s) >= {"correct", "formatted", "extracted"}
    return s["correct"], s["formatted"], s["extracted"]


# ----------------------------------------------------------------------------- registry


def test_every_task_is_registered_with_its_default_hub_source():
    names = task_names()
    for n in ("gsm8k", "math", "mmlu", "mmlu_pro", "arc_easy", "arc_challenge", "piqa"):
        assert n in names
    assert TASKS["gsm8k"].default_source == "openai/gsm8k"
    assert TASKS["math"].default_source == "DigitalLearningGmbH/MATH-lighteval"
    assert TASKS["mmlu"].default_source == "cais/mmlu"
    assert TASKS["mmlu_pro"].default_source == "TIGER-Lab/MMLU-Pro"
    assert TASKS["arc_easy"].hub_config == "ARC-Easy" and TASKS["arc_challenge"].hub_config == "ARC-Challenge"
    for n in ("gsm8k", "math", "mmlu", "mmlu_pro", "arc_easy", "piqa"):
        assert TASKS[n].max_new_tokens == 256 and TASKS[n].num_samples == 1 and not TASKS[n].is_code


def test_hub_sources_use_the_protocols_splits(monkeypatch):
    """Without network: record what the tasks ask ``load_records`` for."""
    from l2d_jax.evaluation.tasks import math_task, qa_common

    calls = []

    def fake(source, config=None, split=None, **kw):
        calls.append((source, config, split, kw))
        return {"train": rows("gsm8k_train.jsonl"), "test": rows("gsm8k_test.jsonl")}[split]

    monkeypatch.setattr(qa_common, "load_records", fake)
    exs = get_task("gsm8k").examples()
    assert len(exs) == 4
    assert calls == [("openai/gsm8k", "main", "train", {}), ("openai/gsm8k", "main", "test", {})]

    calls.clear()
    monkeypatch.setattr(qa_common, "load_records", lambda s, c=None, split=None, **kw: calls.append(
        (s, c, split, kw)) or [])
    get_task("piqa").examples()
    assert calls[0] == ("ybisk/piqa", None, "train", {"revision": "refs/convert/parquet"})
    assert calls[1][2] == "validation"
    calls.clear()
    get_task("mmlu_pro").examples()
    assert [c[2] for c in calls] == ["validation", "test"]
    calls.clear()
    get_task("mmlu").examples()
    assert [(c[1], c[2]) for c in calls] == [("all", "dev"), ("all", "test")]
    calls.clear()
    get_task("arc_challenge").examples()
    assert [(c[1], c[2]) for c in calls] == [("ARC-Challenge", "validation"), ("ARC-Challenge", "test")]

    # EleutherAI/hendrycks_math: one config per subject, concatenated
    calls.clear()
    monkeypatch.setattr(math_task, "load_records", lambda s, c=None, split=None, **kw: calls.append(
        (s, c, split)) or [])
    get_task("math", source="EleutherAI/hendrycks_math").examples()
    assert [c[1] for c in calls if c[2] == "train"] == list(math_task.MATH_SUBJECTS)


def test_a_local_test_file_needs_a_shots_source():
    t = get_task("gsm8k", source=str(FIX / "gsm8k_test.jsonl"))
    with pytest.raises(L2DError, match="shots_source"):
        t.examples()


# ----------------------------------------------------------------------------- GSM8K


def test_gsm8k_shots_prompt_and_references():
    t = task("gsm8k", "gsm8k_test.jsonl", "gsm8k_train.jsonl")
    exs = t.examples()
    train = rows("gsm8k_train.jsonl")
    assert [e.reference for e in exs] == ["5", "1000", "-4", "4.5"]
    for ex, row in zip(exs, rows("gsm8k_test.jsonl")):
        msgs = check_layout(ex)
        for i in range(5):  # the FIRST five train examples, question -> full answer
            assert msgs[2 * i]["content"] == train[i]["question"]
            assert msgs[2 * i + 1]["content"] == train[i]["answer"]
        assert msgs[-1]["content"] == row["question"]
        assert ex.meta["guidance_category"] == "math"
    assert get_task("gsm8k", source=str(FIX / "gsm8k_test.jsonl"), shots_source=str(FIX / "gsm8k_train.jsonl"),
                    limit=2).examples() == exs[:2]


def test_gsm8k_scoring():
    t = task("gsm8k", "gsm8k_test.jsonl", "gsm8k_train.jsonl")
    five, thousand, minus4, half9 = t.examples()
    assert score(t, five, "2+3=5\n#### 5") == (True, True, "5")
    assert score(t, five, "#### 5.0") == (True, True, "5")
    assert score(t, thousand, "500*2=1000\n#### $1,000") == (True, True, "1000")
    assert score(t, thousand, "#### 1000.00") == (True, True, "1000")
    assert score(t, minus4, "#### -4") == (True, True, "-4")
    assert score(t, half9, "#### 4.50") == (True, True, "4.5")
    assert score(t, five, "#### 6") == (False, True, "6")  # wrong
    assert score(t, five, "#### 6\n#### 5")[0] is False  # the FIRST #### counts
    assert score(t, five, "The answer is 5.") == (False, False, None)  # malformed: no ####
    assert score(t, five, "#### five") == (False, False, None)


# ----------------------------------------------------------------------------- MATH


def test_math_evenly_spaced_shots_and_boxed_references():
    t = task("math", "math_test.jsonl", "math_train.jsonl")
    exs = t.examples()
    train = rows("math_train.jsonl")  # 12 rows: 12 // 5 = 2 -> rows 0, 2, 4, 6, 8
    assert len(exs) == 3 and t.num_dropped == 1  # the test row without \boxed is dropped
    for ex in exs:
        msgs = check_layout(ex)
        assert [msgs[2 * i]["content"] for i in range(5)] == [train[j]["problem"] for j in (0, 2, 4, 6, 8)]
        assert [msgs[2 * i + 1]["content"] for i in range(5)] == [train[j]["solution"] for j in (0, 2, 4, 6, 8)]
    assert [e.reference for e in exs] == ["\\frac{1}{2}", "3", "1000"]
    assert exs[0].category == "Prealgebra"


def test_math_scoring():
    t = task("math", "math_test.jsonl", "math_train.jsonl")
    half, three, thousand = t.examples()
    assert score(t, half, "So the answer is $\\boxed{\\frac{1}{2}}$.") == (True, True, "\\frac{1}{2}")
    assert score(t, half, "\\boxed{\\dfrac12}")[:2] == (True, True)
    assert score(t, half, "\\boxed{0.5}")[:2] == (True, True)
    assert score(t, half, "\\boxed{1/2}")[:2] == (True, True)
    assert score(t, half, "first \\boxed{3} then \\boxed{\\frac{1}{2}}")[0] is True  # the LAST box
    assert score(t, half, "\\boxed{\\frac{1}{3}}") == (False, True, "\\frac{1}{3}")  # wrong
    assert score(t, three, "x = 3, so \\boxed{x=3}")[0] is True
    assert score(t, three, "no box, the result is 3")[:2] == (True, True)  # last number
    assert score(t, three, "it is -3") == (False, True, "-3")
    assert score(t, thousand, "\\boxed{1000}")[0] is True
    assert score(t, thousand, "total 1,000 apples")[0] is True
    assert score(t, three, "I do not know.") == (False, False, None)  # malformed
    # a box that never closes is no box: the last number decides (as the original)
    assert extract.last_boxed("\\boxed{\\frac{1}{2}") is None
    assert score(t, three, "\\boxed{3")[:2] == (True, True)
    assert score(t, half, "\\boxed{\\frac{1}{2}")[:2] == (False, True)


# ----------------------------------------------------------------------------- MMLU / MMLU-Pro


def test_mmlu_subject_shots_and_prompt():
    t = task("mmlu", "mmlu_test.jsonl", "mmlu_dev.jsonl")
    exs = t.examples()
    dev = rows("mmlu_dev.jsonl")
    assert [e.reference for e in exs] == ["B", "C", "A", "D"]
    for ex, row in zip(exs, rows("mmlu_test.jsonl")):
        msgs = check_layout(ex)
        same = [d for d in dev if d["subject"] == row["subject"]][:5]  # first 5 dev of the subject
        assert [msgs[2 * i]["content"].split("\n")[1] for i in range(5)] == [d["question"] for d in same]
        assert [msgs[2 * i + 1]["content"] for i in range(5)] == ["ABCD"[d["answer"]] for d in same]
        assert ex.category == row["subject"]
    assert exs[0].prompt_messages[-1]["content"] == \
        "Question:\nBone count?\nChoices:\nA. 1\nB. 206\nC. 3\nD. 4\n\nAnswer:"
    assert exs[0].meta["guidance_category"] == "general_qa"
    assert exs[1].meta["guidance_category"] == "math"  # high_school_mathematics


def test_mmlu_scoring():
    t = task("mmlu", "mmlu_test.jsonl", "mmlu_dev.jsonl")
    ex = t.examples()[0]  # gold B
    assert score(t, ex, "B") == (True, True, "B")
    assert score(t, ex, "B. 206") == (True, True, "B")
    assert score(t, ex, "The answer is (B).") == (True, True, "B")
    assert score(t, ex, "A") == (False, True, "A")  # wrong
    assert score(t, ex, "B or A")[0] is True  # the FIRST letter counts
    assert score(t, ex, "Both are wrong") == (False, False, None)  # malformed: no standalone letter
    assert score(t, ex, "E") == (False, False, None)  # not an option
    assert score(t, ex, "") == (False, False, None)


def test_mmlu_pro_category_shots_ten_options_and_no_answer_cue():
    t = task("mmlu_pro", "mmlu_pro_test.jsonl", "mmlu_pro_validation.jsonl")
    math_ex, law_ex = t.examples()
    val = rows("mmlu_pro_validation.jsonl")
    for ex, cat in ((math_ex, "math"), (law_ex, "law")):
        msgs = check_layout(ex)
        same = [v for v in val if v["category"] == cat][:5]
        assert [msgs[2 * i]["content"].split("\n")[1] for i in range(5)] == [v["question"] for v in same]
        assert [msgs[2 * i + 1]["content"] for i in range(5)] == ["ABCDEFGHIJ"[v["answer_index"]] for v in same]
    q = math_ex.prompt_messages[-1]["content"]
    assert q.startswith("Question:\n5+5?\nChoices:\nA. 1\n") and q.endswith("J. 10\n")
    assert "Answer:" not in q
    assert math_ex.meta["labels"] == list("ABCDEFGHIJ") and law_ex.meta["labels"] == list("ABCD")
    assert (math_ex.meta["guidance_category"], law_ex.meta["guidance_category"]) == ("math", "general_qa")
    assert score(t, math_ex, "J") == (True, True, "J")
    assert score(t, math_ex, "(A)") == (False, True, "A")
    assert score(t, law_ex, "C.") == (True, True, "C")
    assert score(t, law_ex, "J") == (False, False, None)  # only A-D exist here
    assert score(t, law_ex, "none of these") == (False, False, None)


# ----------------------------------------------------------------------------- ARC / PIQA


def test_arc_validation_shots_and_own_labels():
    for name in ("arc_easy", "arc_challenge"):
        t = task(name, "arc_test.jsonl", "arc_validation.jsonl")
        letters, digits = t.examples()
        val = rows("arc_validation.jsonl")
        msgs = check_layout(letters)
        assert [msgs[2 * i + 1]["content"] for i in range(5)] == [v["answerKey"] for v in val[:5]]
        assert letters.prompt_messages[-1]["content"] == \
            "Question:\nSky color?\nChoices:\nA. red\nB. blue\nC. green\n\nAnswer:"
        assert digits.meta["labels"] == ["1", "2", "3", "4"]
        assert score(t, letters, "B") == (True, True, "B")
        assert score(t, letters, "D") == (False, False, None)  # only A-C exist
        assert score(t, letters, "A") == (False, True, "A")
        assert score(t, digits, "2. cold") == (True, True, "2")
        assert score(t, digits, "B") == (False, False, None)
        assert letters.id == f"{name}/t1"


def test_piqa_train_shots_and_scoring():
    t = task("piqa", "piqa_valid.jsonl", "piqa_train.jsonl")
    exs = t.examples()
    assert len(exs) == 2 and t.num_dropped == 1  # the unlabelled row
    train = rows("piqa_train.jsonl")
    msgs = check_layout(exs[0])
    assert msgs[0]["content"] == f"Goal:\n{train[0]['goal']}\nOptions:\nA. {train[0]['sol1']}\nB. {train[0]['sol2']}\n\nAnswer:"
    assert [msgs[2 * i + 1]["content"] for i in range(5)] == ["AB"[r["label"]] for r in train[:5]]
    assert [e.reference for e in exs] == ["A", "B"]
    assert score(t, exs[0], "A") == (True, True, "A")
    assert score(t, exs[0], "B: use a towel") == (False, True, "B")
    assert score(t, exs[1], "C") == (False, False, None)


# ----------------------------------------------------------------------------- extraction helpers


@pytest.mark.parametrize("text,expected", [
    ("1,000", "1000"), ("$5", "5"), ("5.0", "5"), ("-3.50", "-3.5"), ("12.", "12"), ("0.25", "0.25"),
    ("1,234,567.80", "1234567.8"), ("50%", "50"), ("abc", None), ("", None), (None, None),
])
def test_normalize_number(text, expected):
    assert extract.normalize_number(text) == expected


def test_boxed_and_numbers():
    assert extract.last_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract.last_boxed("a \\boxed{x^{2}} b \\boxed{\\sqrt{\\frac{a}{b}}} c") == "\\sqrt{\\frac{a}{b}}"
    assert extract.last_boxed("\\fbox{7}") == "7"
    assert extract.last_boxed("\\boxed 5$") == "5"
    assert extract.last_boxed("no box") is None
    assert extract.last_number("between -2 and 1,500.5 then 3") == "3"
    assert extract.last_number("-1,000") == "-1000"
    assert extract.last_number("none") is None
    assert extract.math_equal("\\frac{1}{3}", "0.33") and not extract.math_equal("\\frac{1}{3}", "0.4")
    assert extract.math_equal("-\\frac{1}{2}", "-0.5")
    assert extract.normalize_math("\\left( 1, 2 \\right)") == "(1,2)"
    assert extract.normalize_math("10^\\circ") == "10"
    assert extract.normalize_math("\\text{(B)}") == "(B)"


def test_first_choice_follows_the_original_rule():
    assert extract.first_choice("The answer is (B).", 4) == "B"
    assert extract.first_choice("C", 4) == "C"
    assert extract.first_choice("Both", 2) is None
    assert extract.first_choice("ABC", 4) == "C"  # no left boundary, as the original
    assert extract.first_choice("I think B", 10) == "I"  # "I" is option I among A-J (the original's quirk)
    assert extract.first_choice("3", ["1", "2", "3"]) == "3"
