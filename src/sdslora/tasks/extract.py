"""Answer extraction from generated text, following the LLM-Adapters evaluation scripts (Hu et al. 2023,
arXiv 2304.01933, ``commonsense_evaluate.py`` / ``evaluate.py``), rewritten here.

* The response is the text after the last ``### Response:`` of the Alpaca prompt (the whole text if absent).
* Commonsense: the first occurrence of one of the task's label words (``true|false``, ``solution1|solution2``,
  ``answer1..answer5``, ``option1|option2``, ``ending1..ending4``); ``""`` when none occurs.
* Math (GSM8K, SVAMP, MAWPS, ...): commas removed, the last number (``-?\\d+\\.?\\d*``) as a float; ``inf`` when none.
* AQuA (options A–E): [design] an explicit "answer is (X)" / "answer is X" first; otherwise the first standalone
  capital A–E, which is LLM-Adapters' rule made word-bounded (theirs matches the first capital A–E anywhere, which
  also hits the "A:" that starts many rationales and any capitalised word starting with A–E).
"""

from __future__ import annotations

import re

RESPONSE_MARK = "### Response:"
_NUMBER = re.compile(r"-?\d+\.?\d*")


def response_part(text: str) -> str:
    """The generated response: the text after the last ``### Response:`` marker (all of ``text`` if absent)."""
    return text.rsplit(RESPONSE_MARK, 1)[-1].strip()


def extract_choice(text: str, labels: list[str]) -> str:
    """The first of ``labels`` (e.g. ``["answer1", "answer2"]``) that occurs in the response; ``""`` if none.

    Longer labels are tried first at each position, so ``answer10`` is never read as ``answer1``.
    """
    if not labels:
        raise ValueError("extract_choice needs the task's label words")
    alts = "|".join(re.escape(x) for x in sorted(labels, key=len, reverse=True))
    m = re.search(alts, response_part(text))
    return m.group(0) if m else ""


def extract_number(text: str) -> float:
    """The last number in the response (thousands commas removed); ``inf`` when there is none."""
    found = _NUMBER.findall(response_part(text).replace(",", ""))
    if not found:
        return float("inf")
    try:
        return float(found[-1])
    except ValueError:  # e.g. a lone "-" cannot match, but keep the guard explicit
        return float("inf")


def extract_option_letter(text: str, letters: str = "ABCDE") -> str:
    """The chosen option letter (AQuA): "answer is (X)" first, else the first standalone letter; ``""`` if none."""
    resp = response_part(text)
    cls = f"[{letters}]"
    m = re.search(rf"answer is:?\s*\(?({cls})\b", resp, flags=re.IGNORECASE)
    if m:
        return m.group(1).upper()
    m = re.search(rf"\(({cls})\)", resp)
    if m:
        return m.group(1)
    m = re.search(rf"(?<![A-Za-z])({cls})(?![A-Za-z:])", resp)
    return m.group(1) if m else ""


def parse_gold_number(answer: str) -> float:
    """The gold answer of a math example as a float (raises ValueError naming the value if it is not a number)."""
    try:
        return float(str(answer).replace(",", "").strip())
    except ValueError as e:
        raise ValueError(f"gold answer {answer!r} is not a number") from e
