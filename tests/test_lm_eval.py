"""Our option scoring (``sdslora eval --eval-mode loglik``) against lm-eval's ``multiple_choice`` accuracy on the
same items: lm-eval runs the base model with our PEFT export (``peft=`` in ``model_args``), we run the adapted model;
both must pick the same answer for every item."""

from __future__ import annotations

import json

import pytest
import torch
from harness_fixtures import tiny_tokenizer
from models import tiny_llama

import sdslora
from sdslora.experiments.data import loglik_choices
from sdslora.tasks.prompts import alpaca_prompt, choice_labels

lm_eval = pytest.importorskip("lm_eval")

WORDS = ["the movie was good", "it was a bad film", "he said it is fine", "she said the film was awful"]


def _rows(n: int = 12) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        k = 2 + i % 3
        labels = [f"answer{j + 1}" for j in range(k)]
        q = WORDS[i % len(WORDS)]
        rows.append({"instruction": f"{q} Answer format: {'/'.join(labels)}", "input": "",
                     "answer": labels[int(torch.randint(0, k, (1,), generator=g))]})
    return rows


def test_our_loglik_choices_match_lm_eval_on_the_peft_export(tmp_path):
    from lm_eval.tasks import TaskManager

    folder = tmp_path / "base"
    tok = tiny_tokenizer(folder, causal=True)
    base = tiny_llama()
    base.resize_token_embeddings(len(tok))
    base.save_pretrained(str(folder))
    model = sdslora.attach(tiny_llama(), sdslora.AdapterConfig(method="sds", r=4, options={"warmup_steps": 1}))
    model.model.resize_token_embeddings(len(tok))
    with torch.no_grad():  # a trained-looking adapter: both factors non-zero, decoupled phase
        for layer in model.adapter_layers().values():
            layer.lora_B.normal_(std=0.5)
    opt = torch.optim.AdamW(model.trainable_parameters())
    sdslora.Controller(model, opt, total_steps=5).step()  # re-parameterise: ΔW = s(Q_B A + B Q_Aᵀ), rank 2r
    model.export_peft(tmp_path / "peft")
    model.eval()

    rows = _rows()
    ours = loglik_choices(model, tok, rows)

    items = [{"prompt": alpaca_prompt(r), "choices": [f"the correct answer is {lab}" for lab in
                                                      choice_labels(r["instruction"])],
              "label": choice_labels(r["instruction"]).index(r["answer"])} for r in rows]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    (tmp_path / "choice.yaml").write_text(f"""task: sdslora_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / "items.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
""")
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},peft={tmp_path / 'peft'}",
                                  tasks=["sdslora_choice"], task_manager=TaskManager(include_path=str(tmp_path)),
                                  device="cpu", batch_size=4, log_samples=True)
    samples = sorted(out["samples"]["sdslora_choice"], key=lambda s: s["doc_id"])
    theirs = []
    for s in samples:
        ll = [float(r[0]) for r in s["filtered_resps"]]
        theirs.append(choice_labels(rows[s["doc_id"]]["instruction"])[max(range(len(ll)), key=ll.__getitem__)])
    assert theirs == ours
    acc = sum(p == r["answer"] for p, r in zip(ours, rows, strict=True)) / len(rows)
    assert out["results"]["sdslora_choice"]["acc,none"] == pytest.approx(acc)
