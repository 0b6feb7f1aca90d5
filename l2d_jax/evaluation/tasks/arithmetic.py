"""Multi-step arithmetic word problems generated in code (the ``l2d-jax demo`` task).

``generate_problems(n, seed)`` draws ``n`` distinct problems from a seeded generator: a start
amount (``a`` items, or ``a`` boxes of ``b`` items), then 0-2 further operations (buy / find
more, give away / lose some, ...), 1-2 operations in all, small numbers, never negative.
Each problem is a dict::

    {"id", "question", "answer": worked solution ending in "#### n", "value": n,
     "start": [a] or [a, b], "ops": [["+", n], ["-", n], ...]}

so its answer can be recomputed from the structure (:func:`solve`). Every character is in
the tiny test tokenizer's alphabet (``l2d_jax.config.TINY_CHARS``).

``ArithmeticTask`` ("arithmetic") scores the number after ``####``, else the last number in
the completion. Sources: a local ``.jsonl`` of problems (``source=``; few-shot examples from
``shots_source=``, another file), or, with no source, ``limit``/``n`` problems generated
from ``seed`` (shots from ``shots_seed``, never one of the test questions).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from l2d_jax.evaluation import extract
from l2d_jax.evaluation.tasks import register
from l2d_jax.evaluation.tasks.base import Example, Task, load_records

NAMES = (("Tom", "he"), ("Anna", "she"), ("Ben", "he"), ("Lily", "she"), ("Sam", "he"), ("Mia", "she"),
         ("Max", "he"), ("Emma", "she"), ("Leo", "he"), ("Zoe", "she"), ("Jack", "he"), ("Nora", "she"))
ITEMS = ("apples", "pencils", "cookies", "marbles", "stickers", "books", "cards", "eggs", "shells", "coins")
CONTAINERS = ("boxes", "bags", "jars", "baskets")
ADD = ("{P} buys {n} more.", "{P} finds {n} more.", "A friend gives {o} {n} more.", "{P} gets {n} more.")
SUB = ("{P} gives away {n}.", "{P} loses {n}.", "{P} sells {n}.", "{P} gives {n} to a friend.")
MUL = ("Then the number of {items} is multiplied by {n}.",)
QUESTION = ("How many {items} does {name} have now?", "How many {items} does {name} have in the end?")
DEFAULT_N = 300
DEFAULT_SEED = 20260001
DEFAULT_SHOTS_SEED = 20260002


def solve(start, ops) -> int:
    """The answer of a structured problem, recomputed from ``start`` and ``ops``."""
    value = 1
    for x in start:
        value *= int(x)
    for op, n in ops:
        value = value + n if op == "+" else value - n if op == "-" else value * n
    return value


def _problem(rng: random.Random) -> dict:
    """One problem: 1-2 operations in all (a product start counts as one)."""
    name, pron = rng.choice(NAMES)
    P = pron.capitalize()
    items = rng.choice(ITEMS)
    lines, sentences = [], []
    if rng.random() < 0.3:  # "a boxes with b items in each", then 0-1 more operations
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        start, value = [a, b], a * b
        sentences.append(f"{name} has {a} {rng.choice(CONTAINERS)} with {b} {items} in each.")
        lines.append(f"{a} * {b} = {value}")
        n_ops = rng.choice((0, 1))
    else:
        a = rng.randint(3, 40)
        start, value = [a], a
        sentences.append(f"{name} has {a} {items}.")
        n_ops = rng.choice((1, 2))
    ops = []
    for i in range(n_ops):
        kinds = ["+", "-"] + (["*"] if len(start) == 1 and i == 0 and value <= 12 else [])
        op = rng.choice(kinds)
        if op == "-" and value < 3:
            op = "+"
        if op == "*":
            n = rng.randint(2, 4)
        elif op == "-":
            n = rng.randint(1, value - 1)
        else:
            n = rng.randint(2, 30)
        new = value + n if op == "+" else value - n if op == "-" else value * n
        template = rng.choice(ADD if op == "+" else SUB if op == "-" else MUL)
        sentences.append(template.format(P=P, o="him" if pron == "he" else "her", n=n, items=items))
        lines.append(f"{value} {op} {n} = {new}")
        ops.append([op, n])
        value = new
    sentences.append(rng.choice(QUESTION).format(items=items, name=name))
    return {"question": " ".join(sentences), "answer": "\n".join(lines + [f"#### {value}"]),
            "value": value, "start": start, "ops": ops}


def generate_problems(n: int, seed: int, exclude=()) -> list[dict]:
    """``n`` distinct problems from ``seed`` (deterministic); questions in ``exclude`` skipped."""
    rng = random.Random(int(seed))
    seen = set(exclude)
    out = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct problems (got {len(out)})")
        p = _problem(rng)
        if p["question"] in seen:
            continue
        seen.add(p["question"])
        p["id"] = f"arith-{seed}-{len(out)}"
        out.append({"id": p["id"], **{k: v for k, v in p.items() if k != "id"}})
    return out


def demo_splits(n_train: int, n_test: int, train_seed: int, test_seed: int) -> tuple[list[dict], list[dict]]:
    """(train, test): the test problems from ``test_seed``; the train problems from
    ``train_seed``, none with a test question (disjoint by construction)."""
    test = generate_problems(n_test, test_seed)
    train = generate_problems(n_train, train_seed, exclude={p["question"] for p in test})
    return train, test


def conversation(problems: list[dict]) -> dict:
    """A training row ``{"messages": [question, worked answer, question, answer, ...],
    "category"}``: one turn per problem, so that the examples of its later turns (context =
    the turns before) look like the task's few-shot prompts."""
    messages = []
    for p in problems:
        messages += [{"role": "user", "content": p["question"]}, {"role": "assistant", "content": p["answer"]}]
    return {"messages": messages, "category": "math"}


def write_jsonl(path, rows) -> bool:
    """Writes ``rows`` as JSONL unless the file already holds exactly that text; True if written."""
    path = Path(path)
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return True


@register
class ArithmeticTask(Task):
    name = "arithmetic"
    max_new_tokens = 32
    num_shots = 2
    guidance_category = "math"

    def __init__(self, source: str | None = None, limit: int | None = None, *, shots_source: str | None = None,
                 num_shots: int | None = None, n: int = DEFAULT_N, seed: int = DEFAULT_SEED,
                 shots_seed: int = DEFAULT_SHOTS_SEED, **kw):
        super().__init__(source=source, limit=limit, **kw)
        self.shots_source = shots_source
        if num_shots is not None:
            self.num_shots = int(num_shots)
        self.n, self.seed, self.shots_seed = int(n), int(seed), int(shots_seed)

    def _rows(self) -> tuple[list[dict], list[dict]]:
        if self.source is not None:
            test = load_records(self.source)
            shots = load_records(self.shots_source) if self.shots_source and self.num_shots else []
        else:
            test = generate_problems(self.n, self.seed)
            shots = generate_problems(self.num_shots, self.shots_seed,
                                      exclude={p["question"] for p in test}) if self.num_shots else []
        test_q = {p["question"] for p in test}
        shots = [s for s in shots if s["question"] not in test_q][: self.num_shots]
        return test, shots

    def build_examples(self) -> list[Example]:
        test, shots = self._rows()
        out = []
        for i, row in enumerate(test):
            msgs = []
            for s in shots:
                msgs += [{"role": "user", "content": s["question"]}, {"role": "assistant", "content": s["answer"]}]
            msgs.append({"role": "user", "content": row["question"]})
            out.append(Example(id=str(row.get("id", f"{self.name}/{i}")), prompt_messages=msgs,
                               reference=str(row["value"]), category=None,
                               meta={"target": row["answer"], "guidance_category": self.guidance_category}))
        return out

    def score(self, example: Example, completion: str) -> dict:
        marked = extract.gsm8k_answer(completion)
        extracted = marked if marked is not None else extract.last_number(completion)
        return {"correct": extract.numbers_equal(extracted, example.reference),
                "formatted": marked is not None, "extracted": extracted}
