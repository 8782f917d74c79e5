"""Long runs resume: ``sdslora train`` killed after a checkpoint continues from it with the same command and ends
with exactly the numbers of an uninterrupted run; failed runs free their folder; a diverged loss stops the run."""

from __future__ import annotations

import json

import pytest
import torch
from harness_fixtures import cls_files, tiny_bert_dir
from safetensors.torch import load_file

from sdslora.cli import main
from sdslora.integrations.hf import SDSLoRACallback


class _Killed(BaseException):
    """Stands for SIGKILL: no ``except Exception`` clean-up runs."""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    return tiny_bert_dir(d / "bert"), *cls_files(d / "data")


def _argv(files, out, *extra: str) -> list[str]:
    model, train, dev = files
    return ["train", "--model", str(model), "--train-file", str(train), "--eval-file", str(dev), "--format", "cls",
            "--method", "sds", "--steps", "9", "--batch-size", "4", "--option", "warmup_steps=2", "--lr", "1e-2",
            "--checkpoint-every", "3", "--diagnostics-every", "2", *extra, "-o", str(out), "--no-progress"]


def _kill_at(monkeypatch, step: int) -> None:
    original = SDSLoRACallback.on_step_end

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == step:
            raise _Killed
        return original(self, args, state, control, **kw)

    monkeypatch.setattr(SDSLoRACallback, "on_step_end", on_step_end)


@pytest.mark.parametrize("kill_at", [5, 7])
def test_killed_train_resumes_to_the_uninterrupted_result(files, tmp_path, monkeypatch, kill_at):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(_argv(files, straight)) == 0
    assert not (straight / "checkpoints").exists()  # removed when the run finished

    with monkeypatch.context() as m:
        _kill_at(m, kill_at)
        with pytest.raises(_Killed):
            main(_argv(files, resumed))
    ckpt = (kill_at - 1) // 3 * 3
    assert (resumed / "checkpoints" / f"checkpoint-{ckpt}" / "sdslora_adapter" / "adapter_config.json").is_file()
    assert not (resumed / "done.json").exists()
    assert main(_argv(files, resumed)) == 0  # the same command continues

    a, b = (json.loads((d / "results.json").read_text()) for d in (straight, resumed))
    assert a["steps"] == b["steps"] == 9
    assert a["eval"] == b["eval"]
    assert a["loss_curve"] == b["loss_curve"] and len(a["loss_curve"]) == 9  # every step once, same values
    assert a["diagnostics"] == b["diagnostics"]
    assert a["events"] == b["events"] and [e["event"] for e in a["events"]] == ["reparameterise"]
    ta, tb = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (straight, resumed))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    events = json.loads((resumed / "adapter" / "adapter_config.json").read_text())["controller"]["events"]
    assert [e["event"] for e in events][:1] == ["reparameterise"]  # events from before the kill kept
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s] == sorted(s for s in steps if s)  # no step logged twice after the resume


def test_failed_run_frees_its_folder_for_a_corrected_command(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    original = SDSLoRACallback.on_step_end

    def broken(self, args, state, control, **kw):
        raise ValueError("injected failure at step 1")

    monkeypatch.setattr(SDSLoRACallback, "on_step_end", broken)
    assert main(_argv(files, out)) == 2
    assert "injected failure" in capsys.readouterr().err
    failed = json.loads((out / "failed.json").read_text())
    assert "injected failure" in failed["error"] and failed["checkpoint"] is None
    monkeypatch.setattr(SDSLoRACallback, "on_step_end", original)
    assert main(_argv(files, out, "--seed", "3")) == 0  # a different config takes the folder
    assert not (out / "failed.json").exists() and (out / "done.json").is_file()


def test_diverged_loss_stops_the_run_naming_the_step(files, tmp_path, monkeypatch, capsys):
    import sdslora.experiments.models as models

    load = models.load_model

    def poisoned(*a, **kw):
        model, tok, folder = load(*a, **kw)
        with torch.no_grad():
            model.classifier.weight.fill_(float("nan"))  # the head trains; its NaN reaches the loss at once
        return model, tok, folder

    monkeypatch.setattr(models, "load_model", poisoned)
    out = tmp_path / "run"
    assert main(_argv(files, out)) == 2
    err = capsys.readouterr().err
    assert "training loss became nan at optimizer step 1" in err and "lower --lr" in err
    assert not (out / "adapter").exists() and (out / "failed.json").is_file()
