"""The Alpaca prompt used by LLM-Adapters (Hu et al. 2023, arXiv 2304.01933) for commonsense and math tasks."""

from __future__ import annotations

import re
from typing import Any

_HEAD = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
_HEAD_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


def alpaca_prompt(example: dict[str, Any]) -> str:
    """The prompt up to and including ``### Response:\\n`` (the target text follows it)."""
    inp = (example.get("input") or "").strip()
    if inp:
        return f"{_HEAD_INPUT}\n\n### Instruction:\n{example['instruction']}\n\n### Input:\n{inp}\n\n### Response:\n"
    return f"{_HEAD}\n\n### Instruction:\n{example['instruction']}\n\n### Response:\n"


def choice_labels(instruction: str) -> list[str]:
    """The label words listed in a commonsense instruction's ``Answer format: a/b/c`` (raises if absent)."""
    m = re.search(r"Answer format:\s*([A-Za-z0-9_]+(?:/[A-Za-z0-9_]+)+)", instruction)
    if not m:
        raise ValueError(f"instruction has no 'Answer format: a/b' line: {instruction[-80:]!r}")
    return m.group(1).split("/")
