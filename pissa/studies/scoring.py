"""Exact-match scoring of final numeric answers (stdlib only).

The demo data (scripts/make_demo_data.py) ends every answer with "The answer is N.";
a model output is scored by the number it gives there, or failing that its last number.
"""

from __future__ import annotations

import re

# An integer or decimal, optionally signed, with optional thousands separators: -1,234.5
_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_ANSWER_IS = re.compile(r"answer\s+is\s*:?[\s\"'*$]*(" + _NUMBER + ")", re.IGNORECASE)
_ANY = re.compile(r"(?<![\w.])" + _NUMBER)


def _normalize(number: str) -> str:
    """Canonical text of a number: no '+' or commas, no leading zeros, "38.0" -> "38"."""
    sign = "-" if number.startswith("-") else ""
    number = number.lstrip("+-").replace(",", "")
    whole, _, frac = number.partition(".")
    whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")
    if whole == "0" and not frac:
        sign = ""
    return sign + whole + ("." + frac if frac else "")


def final_number(text: str | None) -> str | None:
    """The final answer number in text, normalized ("38", "-2.5"), or None when it has none.

    The last "answer is N" wins; without one, the last number in the text.
    """
    if not text:
        return None
    found = _ANSWER_IS.findall(text) or _ANY.findall(text)
    return _normalize(found[-1]) if found else None


def exact_match(prediction: str, reference: str) -> bool:
    """Whether prediction and reference have the same final number (no number never matches)."""
    want = final_number(reference)
    return want is not None and final_number(prediction) == want
