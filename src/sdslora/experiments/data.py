"""Tokenised datasets, collators and evaluation loops for the two task kinds.

Classification: ``tokenizer(text, text_pair)`` with truncation, dynamic padding. Generation (LLM-Adapters): the
Alpaca prompt followed by the target ``output`` and EOS; the loss covers only the response tokens (the prompt's
labels are -100) [design: LLM-Adapters trains on inputs by default; masking them is the common choice since].
Evaluation: argmax of the logits; for generation tasks greedy decoding + answer extraction, or (``"loglik"``)
the option whose response "the correct answer is <label>" has the highest log-likelihood.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..data import class_label
from ..tasks import Task, alpaca_prompt, choice_labels


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict[str, Any]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def encode_classification(tok: Any, rows: list[dict[str, Any]], max_length: int, num_labels: int | None = None,
                          owner: str = "the model's head") -> list[dict[str, Any]]:
    """Tokenised rows; with ``num_labels``, a label outside ``0..num_labels-1`` raises a ValueError naming the row
    (1-based), the label and the range (before any tensor sees it)."""
    out = []
    for i, r in enumerate(rows, start=1):
        label = class_label(r.get("label"), num_labels, f"row {i} of {len(rows)}", owner)
        enc = tok(r["text"], r.get("text_pair"), truncation=True, max_length=max_length)
        item = {k: list(v) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        item["labels"] = label
        out.append(item)
    return out


def encode_generation(tok: Any, rows: list[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    out = []
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    for r in rows:
        prompt = tok(alpaca_prompt(r), add_special_tokens=True)["input_ids"]
        target = tok(str(r.get("output") or r.get("answer", "")).strip(), add_special_tokens=False)["input_ids"] + eos
        ids = (prompt + target)[:max_length]
        labels = ([-100] * len(prompt) + target)[:max_length]
        if all(x == -100 for x in labels):
            continue  # the prompt alone fills max_length: nothing to learn from this row
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return out


class Collator:
    """Right-pads ``input_ids`` / ``attention_mask`` / ``token_type_ids`` (and ``labels`` lists with -100)."""

    def __init__(self, pad_id: int):
        self.pad_id = int(pad_id)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = max(len(x["input_ids"]) for x in items)
        batch: dict[str, torch.Tensor] = {}
        pads = {"input_ids": self.pad_id, "attention_mask": 0, "token_type_ids": 0, "labels": -100}
        for key, pad in pads.items():
            if key not in items[0]:
                continue
            if key == "labels" and not isinstance(items[0]["labels"], list):
                batch[key] = torch.tensor([x["labels"] for x in items], dtype=torch.long)
                continue
            batch[key] = torch.tensor([x[key] + [pad] * (n - len(x[key])) for x in items], dtype=torch.long)
        return batch


def encode(task: Task, tok: Any, rows: list[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    if task.kind == "classification":
        return encode_classification(tok, rows, max_length, max(task.num_labels, 2),
                                     f"task {task.name}")
    return encode_generation(tok, rows, max_length)


@torch.no_grad()
def predict_classification(model: nn.Module, tok: Any, rows: list[dict[str, Any]], max_length: int,
                           batch_size: int = 64) -> list[int]:
    coll = Collator(tok.pad_token_id or 0)
    enc = encode_classification(tok, rows, max_length)
    dev = next(model.parameters()).device
    preds: list[int] = []
    for i in range(0, len(enc), batch_size):
        b = coll(enc[i:i + batch_size])
        b.pop("labels")
        logits = model(**{k: v.to(dev) for k, v in b.items()}).logits
        preds.extend(int(x) for x in logits.argmax(-1).tolist())
    return preds


def _left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.tensor([[pad] * (n - len(s)) + s for s in seqs], dtype=torch.long)
    mask = torch.tensor([[0] * (n - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
    return ids, mask


@torch.no_grad()
def generate_answers(model: nn.Module, tok: Any, rows: list[dict[str, Any]], max_new_tokens: int,
                     batch_size: int = 8, max_prompt: int = 512) -> list[str]:
    """Greedy completions of the Alpaca prompts (left padding), decoded without special tokens."""
    dev = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    texts: list[str] = []
    for i in range(0, len(rows), batch_size):
        prompts = [tok(alpaca_prompt(r))["input_ids"][-max_prompt:] for r in rows[i:i + batch_size]]
        ids, mask = _left_pad(prompts, pad)
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=tok.eos_token_id)
        for row in out[:, ids.shape[1]:]:
            texts.append(tok.decode(row, skip_special_tokens=True))
    return texts


@torch.no_grad()
def loglik_choices(model: nn.Module, tok: Any, rows: list[dict[str, Any]], batch_size: int = 8) -> list[str]:
    """For each row, the label word whose response "the correct answer is <label>" is most likely (summed
    log-probabilities of the response tokens given the prompt)."""
    dev = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    picks: list[str] = []
    for r in rows:
        labels = choice_labels(r["instruction"])
        prompt = tok(alpaca_prompt(r))["input_ids"]
        seqs, spans = [], []
        for lab in labels:
            resp = tok(f"the correct answer is {lab}", add_special_tokens=False)["input_ids"]
            seqs.append(prompt + resp)
            spans.append((len(prompt), len(prompt) + len(resp)))
        n = max(len(s) for s in seqs)
        ids = torch.tensor([s + [pad] * (n - len(s)) for s in seqs], dtype=torch.long, device=dev)
        mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs], dtype=torch.long, device=dev)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        scores = []
        for j, (a, b) in enumerate(spans):
            tgt = ids[j, a:b]
            scores.append(float(logp[j, a - 1:b - 1].gather(-1, tgt[:, None]).sum()))
        picks.append(labels[max(range(len(labels)), key=scores.__getitem__)])
    return picks


@torch.no_grad()
def validation_scores(model: nn.Module, tok: Any, task: Task, rows: list[dict[str, Any]], *, max_length: int = 128,
                      batch_size: int = 32) -> dict[str, Any]:
    """Held-out ``loss`` on ``rows`` (mean cross-entropy per example for classification, per predicted response
    token for generation, aggregated exactly over batches of different sizes) and, for classification, the task's
    metrics from the same forward pass."""
    was_training = model.training
    model.eval()
    enc = encode(task, tok, rows, max_length)
    coll = Collator(tok.pad_token_id if tok.pad_token_id is not None else 0)
    dev = next(model.parameters()).device
    total, count, preds = 0.0, 0, []
    try:
        for i in range(0, len(enc), batch_size):
            b = {k: v.to(dev) for k, v in coll(enc[i:i + batch_size]).items()}
            out = model(**b)
            labels = b["labels"]
            n = int(labels.shape[0]) if labels.dim() == 1 else int((labels[:, 1:] != -100).sum())
            total += float(out.loss) * n
            count += n
            if task.kind == "classification":
                preds.extend(int(x) for x in out.logits.argmax(-1).tolist())
    finally:
        model.train(was_training)
    if not count:
        raise ValueError("no held-out example fits max_length; raise --max-length")
    result: dict[str, Any] = {"loss": total / count}
    if task.kind == "classification":
        if len(preds) != len(rows):
            raise ValueError(f"{len(rows) - len(preds)} validation row(s) do not fit max_length {max_length}")
        result.update(task.score(preds, rows))
    return result


def evaluate(model: nn.Module, tok: Any, task: Task, rows: list[dict[str, Any]], *, max_length: int = 128,
             eval_mode: str = "generate", max_new_tokens: int = 256, batch_size: int = 32) -> dict[str, Any]:
    """Metrics of ``model`` on ``rows`` (plus ``n`` and, for generation, a few example outputs)."""
    was_training = model.training
    model.eval()
    try:
        if task.kind == "classification":
            preds = predict_classification(model, tok, rows, max_length, batch_size)
            result: dict[str, Any] = task.score(preds, rows)
        elif eval_mode == "loglik":
            if task.answer != "choice":
                raise ValueError(f"eval_mode 'loglik' scores label-word options (commonsense tasks); task "
                                 f"{task.name!r} has {task.answer} answers: use eval_mode 'generate'")
            preds = loglik_choices(model, tok, rows)
            result = task.score(preds, rows)
        elif eval_mode == "generate":
            texts = generate_answers(model, tok, rows, max_new_tokens, batch_size=min(batch_size, 8))
            preds = [task.predict_from_text(t, r) for t, r in zip(texts, rows)]
            result = task.score(preds, rows)
            result["examples"] = [{"output": t, "pred": p, "gold": task.gold(r)}
                                  for t, p, r in list(zip(texts, preds, rows))[:3]]
        else:
            raise ValueError(f"eval_mode must be 'generate' or 'loglik', got {eval_mode!r}")
    finally:
        model.train(was_training)
    result["n"] = len(rows)
    return result
