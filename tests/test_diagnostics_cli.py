"""`sdslora diagnose` on a tiny model folder (save_pretrained + a WordLevel tokenizer built here, no hub), and the
Hugging Face Trainer callback."""

from __future__ import annotations

import json

import pytest
import torch
from models import batch_for, tiny_bert_cls, tiny_llama

import sdslora
from sdslora.cli import main
from sdslora.diagnostics import read_history

WORDS = ["[PAD]", "[UNK]", "[EOS]"] + [f"w{i}" for i in range(40)]


def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )


def _texts(n: int) -> list[str]:
    g = torch.Generator().manual_seed(0)
    return [
        " ".join(
            f"w{int(i)}"
            for i in torch.randint(0, 40, (int(torch.randint(4, 10, (1,), generator=g)),), generator=g)
        )
        for _ in range(n)
    ]


@pytest.fixture
def llama_dir(tmp_path):
    model_dir, adapter_dir = tmp_path / "model", tmp_path / "adapter"
    tiny_llama(0).save_pretrained(model_dir)
    _tokenizer().save_pretrained(model_dir)
    adapted = sdslora.attach(
        tiny_llama(0), sdslora.AdapterConfig(method="lora", r=4, target_modules="all-linear")
    )
    g = torch.Generator().manual_seed(1)
    geo = 0.2 ** torch.arange(4.0)
    with torch.no_grad():  # skewed factors: the verdict should call them badly conditioned
        for layer in adapted.adapter_layers().values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * geo)
            layer.lora_A.mul_(geo[:, None])
    sdslora.save_adapter(adapted, adapter_dir)
    data = tmp_path / "probe.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(6)))
    return model_dir, adapter_dir, data


def test_cli_diagnose_table_and_verdict(llama_dir, tmp_path, capsys) -> None:
    model_dir, adapter_dir, data = llama_dir
    out_json = tmp_path / "d.json"
    rc = main(
        [
            "diagnose",
            "--model",
            str(model_dir),
            "--adapter",
            str(adapter_dir),
            "--data",
            str(data),
            "--batch-size",
            "4",
            "--max-length",
            "16",
            "--json",
            str(out_json),
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0
    assert "method: lora" in text and "model.layers.0.self_attn.q_proj" in text and "cos(G,G̃)" in text
    verdict = next(line for line in text.splitlines() if line.startswith("verdict:"))
    assert "badly conditioned" in verdict and "SDS-LoRA removes this scaling" in verdict
    saved = json.loads(out_json.read_text())
    assert len(saved["layers"]) == 14 and saved["summary"]["kappa_A"] > 10


def test_cli_diagnose_tsv_classifier_and_errors(tmp_path, capsys) -> None:
    model_dir = tmp_path / "bert"
    tiny_bert_cls(0).save_pretrained(model_dir)
    _tokenizer().save_pretrained(model_dir)
    tsv = tmp_path / "dev.tsv"
    tsv.write_text("sentence\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(_texts(5))))
    assert main(["diagnose", "--model", str(model_dir), "--data", str(tsv), "--batch-size", "3"]) == 0
    assert "method: full" in capsys.readouterr().out
    bad = tmp_path / "bad.tsv"
    bad.write_text("foo\tbar\nx\ty\n")
    assert main(["diagnose", "--model", str(model_dir), "--data", str(bad)]) == 2
    assert "no 'text' or 'sentence' column" in capsys.readouterr().err
    assert main(["diagnose"]) == 2


def test_cli_history_plots(tmp_path, capsys) -> None:
    hist = tmp_path / "lora.jsonl"
    recs = [
        {
            "step": s,
            "summary": {"cos_g_geff": 0.3, "erank_grad_A": 2.0, "stable_rank_A": 3.0},
            "layers": [],
            "events": [],
        }
        for s in (10, 20)
    ]
    hist.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main(["diagnose", "--history", str(hist), "--out", str(tmp_path / "png")]) == 0
    assert {p.name for p in (tmp_path / "png").iterdir()} == {
        "alignment.png",
        "effective_rank.png",
        "stable_rank.png",
    }
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    assert main(["diagnose", "--history", str(tmp_path / "broken.jsonl")]) == 2


def test_trainer_callback_logs_and_records(tmp_path) -> None:
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from sdslora.diagnostics import DiagnosticsCallback
    from sdslora.integrations.hf import SDSLoRACallback

    class Data(Dataset):
        def __len__(self) -> int:
            return 16

        def __getitem__(self, i: int) -> dict:
            return {k: v[0] for k, v in batch_for("llama", seed=i, n=1).items()}

    adapted = sdslora.attach(
        tiny_llama(0),
        sdslora.AdapterConfig(
            method="sds",
            r=2,
            target_modules=["q_proj", "v_proj"],
            options={"warmup_steps": 2, "refresh": "every:1"},
        ),
    )
    path = tmp_path / "diag.jsonl"
    diag_cb = DiagnosticsCallback(batch_for("llama", seed=99), every=2, path=str(path))
    logged: list[dict] = []

    class Spy(TrainerCallback):  # sees the logs after every other callback added to them
        def on_log(self, args, state, control, logs=None, **kw):
            logged.append(dict(logs or {}))

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=adapted, args=args, train_dataset=Data(), callbacks=[SDSLoRACallback(), diag_cb, Spy()]
    )
    trainer.train()
    records = read_history(path)
    assert [r["step"] for r in records] == [2, 4]
    assert records[0]["events"][0]["event"] == "reparameterise"  # SDSLoRACallback ran first at step 2
    assert "cos_g_geff_opt" in records[0]["summary"]
    diag_logs = [entry for entry in logged if "diag/cos_g_geff" in entry]
    assert len(diag_logs) == 2 and all("diag/kappa_A" in entry for entry in diag_logs)
    off = DiagnosticsCallback(None, every=0)
    off.on_step_end(args, trainer.state, None, model=adapted)
    assert off.recorder is None
