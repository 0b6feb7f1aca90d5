"""Answer extraction and comparison for the benchmark tasks (pure Python, no JAX).

The rules follow the original L2D evaluation (``tasks/*.py`` of SakanaAI/L2D), with a few
documented robustness fixes:

- GSM8K: the number after the first ``####`` (commas dropped). We also accept a ``$`` sign
  and compare numbers by value, so ``1,000`` == ``1000`` and ``5.0`` == ``5``.
- MATH: the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, nested braces
  balanced), normalised like the MATH reference scorer; without a box, the last number.
  Two answers are equal when their normalised strings are, or when both are numbers
  (``\\frac{a}{b}``, ``a/b``, decimals, ``1,000``) with the same value. The original's
  last-number regex ignored signs and thousands separators; ours does not.
- Multiple choice (MMLU, MMLU-Pro, ARC, PIQA): the FIRST occurrence of an allowed option
  label that is followed by a non-alphanumeric character or the end of the text. As in
  the original there is no left word boundary, and labels are case sensitive.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

# ---------------------------------------------------------------------------- numbers

_NUMBER_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+")


def normalize_number(text: str | None) -> str | None:
    """Canonical decimal string of a number written as e.g. ``1,000``, ``$5``, ``5.0``,
    ``-3.50``, ``12.`` -> ``1000``, ``5``, ``5``, ``-3.5``, ``12``; None when ``text`` is
    not a plain number."""
    if text is None:
        return None
    s = str(text).strip()
    s = s.replace("\\$", "").replace("$", "").replace(",", "").replace(" ", "")
    s = s.rstrip(".")
    if s.endswith("%"):
        s = s[:-1]
    if not s or not re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)", s):
        return None
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def numbers_equal(a: str | None, b: str | None) -> bool:
    na, nb = normalize_number(a), normalize_number(b)
    return na is not None and na == nb


def last_number(text: str) -> str | None:
    """The last number in ``text`` (sign, thousands separators and decimals kept), normalised."""
    matches = _NUMBER_RE.findall(text)
    return normalize_number(matches[-1]) if matches else None


# ---------------------------------------------------------------------------- GSM8K

_GSM8K_RE = re.compile(r"####\s*\$?\s*(-?[0-9.,]*[0-9])")


def gsm8k_answer(text: str) -> str | None:
    """The number after the first ``####`` (normalised), or None."""
    m = _GSM8K_RE.search(text)
    if not m:
        return None
    return normalize_number(m.group(1))


# ---------------------------------------------------------------------------- MATH

def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` / ``\\fbox{...}`` with nested braces
    balanced (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``); ``\\boxed 5`` -> ``5``.
    None when there is no box or its braces never close."""
    idx = text.rfind("\\boxed")
    name = "\\boxed"
    if idx < 0:
        idx = text.rfind("\\fbox")
        name = "\\fbox"
        if idx < 0:
            return None
    rest = text[idx + len(name):]
    if rest.startswith(" "):  # "\boxed 5" form: up to the next "$" or whitespace
        m = re.match(r"\s+([^\s$]+)", rest)
        return m.group(1) if m else None
    start = rest.find("{")
    if start < 0 or rest[:start].strip():
        return None
    depth = 0
    for i in range(start, len(rest)):
        c = rest[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return rest[start + 1:i]
    return None


def _fix_fracs(s: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{2}`` -> ``\\frac{1}{2}``."""
    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if not part or part[0] == "{":
            out += part
            continue
        if len(part) < 2:
            return s
        a, b, tail = part[0], part[1], part[2:]
        out += "{" + a + "}" + (b + tail if b == "{" else "{" + b + "}" + tail)
    return out


def _fix_sqrt(s: str) -> str:
    """``\\sqrt3`` -> ``\\sqrt{3}``."""
    parts = s.split("\\sqrt")
    out = parts[0]
    for part in parts[1:]:
        if part and part[0] != "{":
            out += "\\sqrt{" + part[0] + "}" + part[1:]
        else:
            out += "\\sqrt" + part
    return out


def _slash_to_frac(s: str) -> str:
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    return f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}" if m else s


def normalize_math(answer: str | None) -> str | None:
    """Normalises a MATH answer string (the usual MATH-scorer rules: drop ``\\left``,
    ``\\right``, ``\\!``, degrees, ``\\$``, ``%``, units after ``\\text{ ``, spaces, a short
    ``x =`` prefix; ``tfrac``/``dfrac`` -> ``frac``; brace ``\\frac12`` and ``\\sqrt3``;
    ``a/b`` -> ``\\frac{a}{b}``; ``0.5`` -> ``\\frac{1}{2}``; thousands commas)."""
    if answer is None:
        return None
    s = str(answer).replace("\n", "").replace("\\!", "")
    s = s.replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "").replace("$", "")
    if "\\text{ " in s:
        s = s.split("\\text{ ")[0]
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    s = s.strip()
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    lhs = s.split("=")
    if len(lhs) == 2 and len(lhs[0].strip()) <= 2:
        s = lhs[1]
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    s = _slash_to_frac(s)
    if "(" not in s and re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    s = re.sub(r"^\\text\{(.*)\}$", r"\1", s)
    return s


def math_value(s: str | None) -> Fraction | None:
    """Exact value of a normalised MATH answer that is a plain number or ``\\frac{a}{b}``
    (optionally negated), else None."""
    if s is None:
        return None
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s)
    if m:
        den = int(m.group(3))
        if den == 0:
            return None
        v = Fraction(int(m.group(2)), den)
        return -v if m.group(1) else v
    n = normalize_number(s)
    if n is None:
        return None
    return Fraction(Decimal(n))


def math_answer(text: str) -> str | None:
    """The normalised last ``\\boxed{}`` answer, else the last number, else None."""
    boxed = last_boxed(text)
    if boxed is not None:
        return normalize_math(boxed)
    return last_number(text)


def _frac_parts(s: str) -> tuple[int, int] | None:
    m = re.fullmatch(r"\\frac\{(-?\d+)\}\{(-?\d+)\}", s)
    if not m or int(m.group(2)) == 0:
        return None
    return int(m.group(1)), int(m.group(2))


def math_equal(pred: str | None, ref: str | None) -> bool:
    """Equal normalised strings, or the same numeric value (fractions, decimals); a fraction
    also matches a decimal that rounds to it (``0.33`` ~ ``\\frac{1}{3}``: round(dec * den)
    == num, as the original, and within 0.01)."""
    if pred is None or ref is None:
        return False
    if pred == ref:
        return True
    a, b = math_value(pred), math_value(ref)
    if a is None or b is None:
        return False
    if a == b:
        return True
    for frac_s, dec_s in ((pred, ref), (ref, pred)):
        parts, dec = _frac_parts(frac_s), normalize_number(dec_s)
        if parts and dec is not None and "." in dec:
            num, den = parts
            d = Fraction(Decimal(dec))
            if round(d * den) == num and abs(d - Fraction(num, den)) < Fraction(1, 100):
                return True
    return False


# ---------------------------------------------------------------------------- multiple choice

def choice_letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def first_choice(text: str, labels) -> str | None:
    """The first allowed option label in ``text`` followed by a non-alphanumeric character
    or the end (``"B. because"`` -> ``B``; ``"Both"`` -> none). ``labels``: an int n (the
    first n capital letters) or a list of one-character labels (ARC also uses ``1``-``4``)."""
    if isinstance(labels, int):
        labels = choice_letters(labels)
    labels = [str(x) for x in labels]
    if not labels or not text:
        return None
    single = [x for x in labels if len(x) == 1]
    if len(single) == len(labels):
        pattern = "([" + "".join(re.escape(x) for x in labels) + "])(?:[^a-zA-Z0-9]|$)"
    else:
        pattern = "(" + "|".join(re.escape(x) for x in sorted(labels, key=len, reverse=True)) + r")(?:[^a-zA-Z0-9]|$)"
    m = re.search(pattern, text)
    return m.group(1) if m else None
