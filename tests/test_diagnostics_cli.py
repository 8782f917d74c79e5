"""`sdslora diagnose` on tiny model folders (save_pretrained + a WordLevel tokenizer built here, no hub): on a run
folder of `sdslora train` (rebuilt as train built it), spelled out with --model/--adapter/--task, on a raw probe file,
history plots; and the Hugging Face Trainer callback."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from harness_fixtures import cls_files, tiny_tokenizer
from models import batch_for, tiny_bert_cls, tiny_llama

import sdslora
from sdslora.cli import build_parser, main
from sdslora.cli_diagnose import read_histories
from sdslora.diagnostics import read_history
from sdslora.diagnostics.plots import history_figures, history_labels

README = Path(__file__).resolve().parents[1] / "README.md"

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
    err = capsys.readouterr().err
    assert err.startswith("sdslora diagnose: error:") and "no 'text' or 'sentence' column" in err
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
    assert main(["diagnose", "--history", str(tmp_path / "absent")]) == 2
    assert "neither a run folder nor" in capsys.readouterr().err


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
    # a run stopped early (another callback ended it before max_steps) is probed once more at its last step
    from types import SimpleNamespace

    stopped = SimpleNamespace(global_step=5, max_steps=8, is_world_process_zero=True)
    diag_cb.on_train_end(args, stopped, None, model=adapted)
    diag_cb.on_train_end(args, stopped, None, model=adapted)
    assert [r["step"] for r in read_history(path)] == [2, 4, 5]
    off = DiagnosticsCallback(None, every=0)
    off.on_step_end(args, trainer.state, None, model=adapted)
    assert off.recorder is None


# ---- `sdslora diagnose` on what `sdslora train` wrote -------------------------------------------------------------
def _encoder_dir(path: Path) -> Path:
    """A tiny BERT *encoder* folder (architectures ['BertModel'], as minilm-l6): train puts a classification head
    on it, so diagnose must too."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    tok = tiny_tokenizer(path)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                     num_attention_heads=2, max_position_embeddings=64, pad_token_id=0)
    BertModel(cfg).save_pretrained(str(path))
    return path


STEPS, EVERY = 3, 2  # the last step is not a multiple of the interval: the history must still reach it


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("diagruns")
    base = _encoder_dir(d / "encoder")
    train, dev = cls_files(d / "data")
    out = {}
    for method in ("lora", "sds"):
        out[method] = d / "runs" / method
        argv = ["train", "--model", str(base), "--train-file", str(train), "--eval-file", str(dev), "--format", "cls",
                "--method", method, "--steps", str(STEPS), "--batch-size", "4", "--diagnostics-every", str(EVERY),
                "--checkpoint-every", "0", "-o", str(out[method]), "--no-progress"]
        if method == "sds":
            argv += ["--option", "warmup_steps=1"]
        assert main(argv) == 0
    return d, base, train, out


def test_diagnose_run_folder_and_the_spelled_out_form_agree(runs, tmp_path, capsys) -> None:
    d, base, train, out = runs
    capsys.readouterr()
    assert main(["diagnose", "--run", str(out["sds"]), "--json", str(tmp_path / "a.json")]) == 0
    text = capsys.readouterr().out
    assert "method: sds" in text and "cos(G,G̃)" in text and "verdict:" in text
    assert re.search(r"^bert\.encoder\.layer\.0\.attention\.self\.query\s+\d", text, re.M)  # a table row
    assert "probe: 4 example(s)" in text  # the run's batch size, from run.json
    assert main(["diagnose", "--model", str(base), "--adapter", str(out["sds"] / "adapter"), "--train-file",
                 str(train), "--format", "cls", "--batch-size", "4", "--json", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["summary"] == b["summary"] and a["layers"] == b["layers"]
    # the probe is the batch train's diagnostics used, on the final adapter: the last record of the run
    last = read_history(out["sds"] / "diagnostics.jsonl")[-1]
    assert last["step"] == STEPS
    for key in ("loss", "cos_g_geff", "cos_geff_gstar", "kappa_A"):
        assert a["summary"][key] == pytest.approx(last["summary"][key], rel=1e-4)


def test_readme_diagnose_example_runs_on_readme_train_output(runs, tmp_path, monkeypatch, capsys) -> None:
    """README's `train` line (a tiny encoder for minilm-l6, 3 steps) and then README's `diagnose` line as written:
    the registered task (MRPC, shipped in the package) and the embedded-style encoder folder."""
    lines = [ln.split("#")[0].strip() for ln in README.read_text().splitlines()]
    train_line = next(ln for ln in lines if ln.startswith("sdslora train ") and "--task mrpc" in ln)
    diag_line = next(ln for ln in lines if ln.startswith("sdslora diagnose --run"))
    train_argv, diag_argv = shlex.split(train_line)[1:], shlex.split(diag_line)[1:]
    out = train_argv[train_argv.index("-o") + 1]
    assert diag_argv[diag_argv.index("--run") + 1] == out
    build_parser().parse_args(diag_argv)
    train_argv[train_argv.index("--model") + 1] = str(runs[1])
    train_argv[train_argv.index("--steps") + 1] = "3"
    train_argv += ["--option", "warmup_steps=1", "--batch-size", "4", "--max-length", "32", "--eval-limit", "4",
                   "--checkpoint-every", "0", "--no-progress"]
    monkeypatch.chdir(tmp_path)
    assert main(train_argv) == 0
    capsys.readouterr()
    assert main(diag_argv) == 0
    text = capsys.readouterr().out
    assert "probe: 4 example(s) of task mrpc training data, max_length 32" in text and "verdict:" in text


def test_diagnose_errors_are_clear(runs, tmp_path, capsys) -> None:
    d, base, train, out = runs
    full = tmp_path / "full"
    full.mkdir()
    (full / "run.json").write_text(json.dumps({"config": {"model": str(base), "method": "full", "task": "mrpc"}}))
    (full / "NO_ADAPTER.md").write_text("no adapter\n")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "run.json").write_text(json.dumps({"config": {"model": str(base), "method": "lora"}}))
    cases = [
        (["--run", str(tmp_path / "absent")], "does not exist"),
        (["--run", str(d / "data")], "holds no run.json"),
        (["--run", str(full)], "diagnose needs an adapter"),
        (["--run", str(unfinished)], "has not finished"),
        (["--run", str(out["sds"]), "--task", "mrpc", "--format", "cls"], "not both"),
        (["--model", str(base), "--adapter", str(out["sds"] / "adapter")], "give --task NAME"),
        (["--model", str(base), "--train-file", str(train)], "--train-file needs --format"),
        (["--run", str(out["sds"]), "--batch-size", "0"], "--batch-size must be an int >= 1"),
        (["--model", str(tmp_path / "nomodel"), "--task", "mrpc"], "neither an embedded name"),
        (["--history", str(full)], "holds no diagnostics.jsonl"),
    ]
    capsys.readouterr()
    for argv, msg in cases:
        assert main(["diagnose", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("sdslora diagnose: error:") and msg in err, (argv, err)


def test_history_legends_name_the_runs_and_cover_the_whole_run(runs, tmp_path, capsys) -> None:
    d, base, train, out = runs
    for run in out.values():
        recs = read_history(run / "diagnostics.jsonl")
        assert [r["step"] for r in recs] == [EVERY, STEPS]
        # cosine decay reaches lr 0 at the last step: the optimizer-direction alignment is still measured there
        assert all(isinstance(r["summary"].get("cos_g_geff_opt"), float) for r in recs)
    capsys.readouterr()
    assert main(["diagnose", "--history", str(out["lora"]), str(out["sds"]), "--out", str(tmp_path / "png")]) == 0
    assert {"alignment.png", "effective_rank.png", "stable_rank.png"} <= {p.name for p in (tmp_path / "png").iterdir()}
    assert "note:" not in capsys.readouterr().err
    histories = read_histories([str(out["lora"]), str(out["sds"] / "diagnostics.jsonl")])
    assert list(histories) == ["lora", "sds"]
    figures = history_figures(histories)
    try:
        for stem in ("alignment", "effective_rank", "stable_rank"):
            fig = figures[stem]
            assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["lora", "sds"]
            for ax in fig.axes:
                assert {line.get_label() for line in ax.get_lines()} == {"lora", "sds"}, (stem, ax.get_title())
                assert all(line.get_xdata()[-1] == STEPS for line in ax.get_lines()), (stem, ax.get_title())
    finally:
        import matplotlib.pyplot as plt

        for fig in figures.values():
            plt.close(fig)


def test_history_labels_tell_runs_apart(tmp_path) -> None:
    for sub in ("a/sds", "b/sds", "c/lora", "runs/seed1"):
        (tmp_path / sub).mkdir(parents=True)
    (tmp_path / "runs" / "seed1" / "diagnostics.jsonl").write_text("")
    (tmp_path / "x.jsonl").write_text("")
    paths = [tmp_path / "a" / "sds", tmp_path / "b" / "sds", tmp_path / "c" / "lora", tmp_path / "c" / "lora",
             tmp_path / "runs" / "seed1" / "diagnostics.jsonl", tmp_path / "x.jsonl"]
    assert history_labels(paths) == ["a/sds", "b/sds", "lora", "lora (2)", "seed1", "x"]
