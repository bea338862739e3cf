"""The final numeric answer in generated text, and numeric comparison with the gold answer.

`extract_answer` looks, in order, at the number after the last `####`; after the last
`The answer is` / `answer:` on the same line; else the last number in the text. Numbers
are canonicalised with `decimal.Decimal` (never float): `1,000` -> `1000`, `$5` -> `5`,
`5.0` -> `5`, `+4` -> `4`, `12.50` -> `12.5`.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

__all__ = ["normalize_number", "extract_answer", "answers_match"]

# A number inside text. A sign counts only where it cannot be a binary operator
# ("12-3" is twelve minus three, not twelve and minus three). Thousands commas count only
# in correct groups of three, so "1,2,3" is three numbers and "1,000" is one.
_NUMBER = re.compile(
    r"(?:(?<![\w)\]])[-+])?\$?" r"(?:(?<!\d)\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?" r"|(?:(?<![\w)\]])[-+])?\$?\.\d+"
)
_ANSWER_CUE = re.compile(r"answer\s*(?:is\b|:)", re.IGNORECASE)


def normalize_number(s: str) -> str | None:
    """The canonical string of the one number `s` holds, or None if it holds no single number.

    Tolerates surrounding spaces and `*` (markdown bold), a `$`, a trailing `.` or `%`,
    thousands commas and a leading `+`. Integer values print as integers, others as the
    shortest exact decimal.
    """
    t = s.strip().strip("*").strip()
    t = t.rstrip(".%").strip()
    m = _NUMBER.fullmatch(t)
    if m is None:
        return None
    t = t.replace("$", "").replace(",", "")
    try:
        d = Decimal(t)
    except InvalidOperation:
        return None
    if d == d.to_integral_value():
        return str(int(d))
    # format(..., "f") is exact (no context rounding, no exponent); then drop trailing zeros.
    return format(d, "f").rstrip("0").rstrip(".")


def _first_number(text: str) -> str | None:
    m = _NUMBER.search(text)
    return normalize_number(m.group()) if m else None


def extract_answer(text: str) -> str | None:
    """The model's final answer in `text` as a canonical number string, or None."""
    _, sep, tail = text.rpartition("####")
    if sep and (n := _first_number(tail)) is not None:
        return n
    cues = list(_ANSWER_CUE.finditer(text))
    if cues:
        # Only the rest of the cue's own line: "The answer is unclear.\n3 + 4" is no answer.
        rest = text[cues[-1].end() :].split("\n", 1)[0]
        if (n := _first_number(rest)) is not None:
            return n
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def answers_match(pred: str | None, gold: str) -> bool:
    """Whether `pred` and `gold` are the same number; a None or non-numeric `pred` never
    matches. A non-numeric `gold` is a data bug and raises ValueError."""
    g = normalize_number(gold)
    if g is None:
        raise ValueError(f"gold answer {gold!r} is not a number; check the data set's '####' lines")
    return pred is not None and normalize_number(pred) == g
