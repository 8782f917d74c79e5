"""Tiny saved models, tokenizers and data files for the harness tests (no hub, no shared data)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

WORDS = tuple(
    [
        "the",
        "a",
        "is",
        "not",
        "good",
        "bad",
        "movie",
        "film",
        "great",
        "awful",
        "fine",
        "said",
        "he",
        "she",
        "it",
        "was",
        "of",
        "to",
        "and",
        "true",
        "false",
        "answer1",
        "answer2",
        "solution1",
        "solution2",
        "correct",
        "answer",
        "below",
        "instruction",
        "describes",
        "task",
        "write",
        "response",
        "that",
        "appropriately",
        "completes",
        "request",
        "###",
        "Instruction:",
        "Response:",
        "Answer",
        "format:",
        "question",
        "please",
        "choose",
        "0",
        "1",
        "2",
        "3",
        "4",
        "5",
        "6",
        "7",
        "8",
        "9",
        "A",
        "B",
        "C",
        "D",
        "E",
    ]
)


def tiny_tokenizer(path: Path, causal: bool = False) -> PreTrainedTokenizerFast:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS)))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kw = dict(pad_token="[PAD]", unk_token="[UNK]")
    kw.update(
        dict(eos_token="</s>", bos_token="</s>") if causal else dict(cls_token="[CLS]", sep_token="[SEP]")
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, **kw)
    tok.save_pretrained(str(path))
    return tok


def tiny_bert_dir(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tok = tiny_tokenizer(path)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
        num_labels=2,
        pad_token_id=0,
    )
    BertForSequenceClassification(cfg).save_pretrained(str(path))
    return path


def tiny_llama_dir(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tok = tiny_tokenizer(path, causal=True)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    return path


def cls_files(folder: Path, n_train: int = 24, n_eval: int = 8) -> tuple[Path, Path]:
    """TSV files with a learnable rule: label 1 iff the sentence contains 'good'."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    fill = ["the", "movie", "was", "a", "film", "it", "of"]

    def rows(n: int) -> str:
        out = ["sentence\tlabel"]
        for i in range(n):
            words = [fill[int(j)] for j in torch.randint(0, len(fill), (5,), generator=g)]
            label = i % 2
            words.insert(int(torch.randint(0, 5, (1,), generator=g)), "good" if label else "bad")
            out.append(" ".join(words) + f"\t{label}")
        return "\n".join(out) + "\n"

    (folder / "train.tsv").write_text(rows(n_train))
    (folder / "dev.tsv").write_text(rows(n_eval))
    return folder / "train.tsv", folder / "dev.tsv"


def math_file(path: Path, n: int = 6) -> Path:
    rows = [
        {
            "instruction": f"question {i} and {i + 1}",
            "input": "",
            "output": f"the answer is {2 * i + 1}",
            "answer": f"{2 * i + 1}.0",
        }
        for i in range(n)
    ]
    path.write_text(json.dumps(rows))
    return path
