"""GSM8K answers: the final number of a worked answer, and exact match between two answers.

A GSM8K answer ends in a line ``#### N`` (``#### 70000``, ``#### 2,125``). A model's answer is scored by
its ``#### N`` line where it wrote one, else by the last number in its text. Numbers are compared after
normalising: thousands commas, a leading ``$`` and a trailing ``.`` go, and ``18.0`` equals ``18``.
Torch-free.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_NUMBER = r"-?\$?\s?(?:\d[\d,]*(?:\.\d+)?|\.\d+)"
#: ``#### N``: the number right after the marker (the rest of the line is not part of it).
_ANSWER = re.compile(r"####\s*(" + _NUMBER + ")")
_ANY_NUMBER = re.compile(_NUMBER)
#: A completed answer line: ``#### N`` followed by something that cannot continue the number.
_COMPLETED = re.compile(r"####[ \t]*\$?[ \t]*-?[\d,.]*\d[\d,.]*[^\d,.]")


def normalise_number(text: str) -> str | None:
    """A number as written (``$1,250.00``, ``-3``, ``18.``) in one canonical form (``1250``, ``-3``, ``18``),
    or None when ``text`` is not a number."""
    cleaned = text.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def final_number(text: str) -> str | None:
    """The answer of a worked solution, normalised: the number after its last ``####``, else its last number."""
    marked = _ANSWER.findall(text)
    candidates = marked or _ANY_NUMBER.findall(text)
    for raw in reversed(candidates):
        number = normalise_number(raw)
        if number is not None:
            return number
    return None


def exact_match(prediction: str, reference: str) -> bool:
    """True iff both texts have a final number and the two are equal."""
    predicted, expected = final_number(prediction), final_number(reference)
    return predicted is not None and predicted == expected


def answer_line_completed(text: str) -> bool:
    """True once ``text`` holds a ``#### N`` line whose number is complete (something other than a digit,
    comma or point follows it): where generation of a GSM8K answer may stop."""
    return _COMPLETED.search(text) is not None
