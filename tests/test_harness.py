"""The experiment harness: one run writes every promised file; compare runs a grid, reports, and resumes."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from harness_fixtures import cls_files, math_file, tiny_bert_dir, tiny_llama_dir

from sdslora.experiments.compare import CompareConfig, run_compare
from sdslora.experiments.data import Collator, encode_generation, evaluate
from sdslora.experiments.models import load_model
from sdslora.experiments.report import running_mean, steps_to_target
from sdslora.experiments.train import RunConfig, RunDirError, run_train
from sdslora.io import load_adapter
from sdslora.tasks import file_task


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("harness")
    model = tiny_bert_dir(d / "bert")
    train, dev = cls_files(d / "data")
    return d, model, train, dev


def _cfg(setup, **kw) -> RunConfig:
    d, model, train, dev = setup
    base = dict(model=str(model), task=None, train_file=str(train), eval_file=str(dev), format="cls", method="sds",
                steps=4, batch_size=4, seed=0, options={"warmup_steps": 2})
    base.update(kw)
    return RunConfig(**base)


@pytest.fixture(scope="module")
def sds_run(setup):
    d = setup[0]
    cfg = _cfg(setup, diagnostics_every=2)
    res = run_train(cfg, d / "run-sds", progress=False)
    return cfg, d / "run-sds", res


def test_train_writes_every_promised_file(setup, sds_run):
    cfg, out, res = sds_run
    for name in ("run.json", "versions.json", "metrics.jsonl", "eval.json", "results.json", "done.json",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "peft/adapter_config.json",
                 "peft/adapter_model.safetensors"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert json.loads((out / "done.json").read_text())["config"] == cfg.to_dict()
    assert json.loads((out / "run.json").read_text())["config"]["method"] == "sds"
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["learning_rate"] > 0 and r["step_time"] > 0 for r in steps)
    assert any("sdslora/reparameterise/layers" in r for r in recs)  # the Controller ran at step 2
    assert res["steps"] == 4 and res["modules_to_save"] == ["classifier"]
    assert res["final_train_loss"] == pytest.approx(sum(r["loss"] for r in steps) / 4)
    peft_cfg = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert peft_cfg["r"] == 2 * cfg.r  # SDS-LoRA exports at rank 2r
    if (out / "diagnostics.jsonl").exists():  # sdslora.diagnostics present: probes at steps 2 and 4
        diag = [json.loads(x) for x in (out / "diagnostics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in diag] == [2, 4] and "cos_g_geff" in diag[0]["summary"]


def test_saved_adapter_reproduces_the_run_evaluation(setup, sds_run):
    cfg, out, res = sds_run
    task = cfg.get_task()
    model, tok, _ = load_model(cfg.model, "classification")
    adapted = load_adapter(model, out / "adapter")
    ev = evaluate(adapted, tok, task, task.load("eval"), max_length=cfg.max_length)
    assert ev == json.loads((out / "eval.json").read_text())


def test_finished_run_is_skipped_and_other_folders_are_protected(setup, sds_run):
    cfg, out, res = sds_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = run_train(cfg, out, progress=False)
    assert again["eval"] == res["eval"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    with pytest.raises(RunDirError, match="different run .*'lr'"):
        run_train(_cfg(setup, diagnostics_every=2, lr=0.123), out, progress=False)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    other = setup[0] / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="holds no sdslora run"):
        run_train(cfg, other, progress=False)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_full_finetuning_notes_that_there_is_no_adapter(setup):
    out = setup[0] / "run-full"
    res = run_train(_cfg(setup, method="full", options={}, steps=2), out, progress=False)
    assert (out / "NO_ADAPTER.md").is_file() and not (out / "adapter").exists()
    assert res["trainable_parameters"] == res["total_parameters"] and res["adapted_layers"] == 0


def test_generation_task_trains_and_scores(tmp_path):
    model = tiny_llama_dir(tmp_path / "llama")
    data = math_file(tmp_path / "math.json")
    cfg = RunConfig(model=str(model), task=None, train_file=str(data), eval_file=str(data), format="alpaca-number",
                    method="lora", steps=2, batch_size=2, max_new_tokens=3, max_length=64)
    res = run_train(cfg, tmp_path / "run", progress=False)
    assert 0.0 <= res["eval"]["accuracy"] <= 1.0 and res["eval"]["n"] == 6
    assert len(res["eval"]["examples"]) == 3
    # prompt tokens carry no loss: labels are -100 exactly over the prompt
    _, tok, _ = load_model(str(model), "generation")
    enc = encode_generation(tok, [{"instruction": "question 1", "input": "", "output": "the answer is 3"}], 64)[0]
    n_prompt = sum(1 for x in enc["labels"] if x == -100)
    assert enc["labels"][n_prompt:] == enc["input_ids"][n_prompt:] and enc["input_ids"][-1] == tok.eos_token_id
    batch = Collator(tok.pad_token_id)([enc, {**enc, "input_ids": enc["input_ids"][:5],
                                              "attention_mask": [1] * 5, "labels": enc["labels"][:5]}])
    assert batch["labels"][1, 5:].eq(-100).all() and batch["attention_mask"][1, 5:].eq(0).all()


def test_loglik_scoring_picks_the_most_likely_option(tmp_path):
    model_dir = tiny_llama_dir(tmp_path / "llama")
    model, tok, _ = load_model(str(model_dir), "generation")
    rows = [{"instruction": "please choose Answer format: answer1/answer2", "input": "", "answer": "answer1"}]
    task = file_task("alpaca-choice", None, None)
    ev = evaluate(model, tok, task, rows, eval_mode="loglik")
    # reference: sum of log-probabilities of each response computed here
    from sdslora.tasks import alpaca_prompt

    scores = []
    for lab in ("answer1", "answer2"):
        p = tok(alpaca_prompt(rows[0]))["input_ids"]
        r = tok(f"the correct answer is {lab}", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([p + r])).logits[0].double(), -1)
        scores.append(sum(float(lp[len(p) - 1 + i, t]) for i, t in enumerate(r)))
    expected = "answer1" if scores[0] >= scores[1] else "answer2"
    assert ev["accuracy"] == float(expected == "answer1")
    with pytest.raises(ValueError, match="loglik"):
        evaluate(model, tok, file_task("alpaca-number", None, None), rows, eval_mode="loglik")


def test_compare_micro_grid_reports_and_resumes(setup):
    d = setup[0]
    cc = CompareConfig(base=_cfg(setup, steps=3, diagnostics_every=0), methods=["lora", "sds"], seeds=[0, 1],
                       command="pytest micro grid")
    out = d / "cmp"
    summary = run_compare(cc, out, progress=False)
    text = (out / "report.md").read_text()
    assert "| method | accuracy | f1 | trainable params |" in text
    for m in ("| lora |", "| sds |"):
        assert m in text
    for png in ("loss_curves.png", "metrics.png"):
        assert (out / png).stat().st_size > 1000
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((out / "results.json").read_text())
    assert len(res["runs"]) == 4 and set(res["groups"]) == {"lora", "sds"}
    accs = [r["eval"]["accuracy"] for r in res["runs"] if r["method"] == "sds"]
    assert res["groups"]["sds"]["metrics"]["accuracy"]["mean"] == pytest.approx(sum(accs) / 2)
    assert res["groups"]["lora"]["step_time_ratio_to_lora"] == pytest.approx(1.0)
    assert summary["table"][0]["method"] == "lora"
    done = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("done.json")}
    assert len(done) == 4
    run_compare(cc, out, progress=False)  # resumed: nothing re-run
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("done.json")} == done
    stranger = d / "stranger"
    stranger.mkdir()
    (stranger / "x").write_text("keep")
    with pytest.raises(RunDirError, match="no sdslora comparison"):
        run_compare(cc, stranger, progress=False)
    assert (stranger / "x").read_text() == "keep" and len(list(stranger.iterdir())) == 1


def test_steps_to_target_uses_the_running_mean():
    losses = [1.0, 0.2, 1.0, 0.2, 0.2, 0.2]
    rm = running_mean(losses, 10)
    assert rm[1] == pytest.approx(0.6)
    first = next(i for i, v in enumerate(rm) if v <= 0.5)
    assert steps_to_target(list(range(1, 7)), losses, 0.5) == first + 1
    assert steps_to_target([1, 2], [1.0, 1.0], 0.5) is None


@pytest.mark.parametrize("method", ["lora_ga", "lora_sb"])
def test_train_runs_data_initialised_methods(setup, method):
    """Methods that need init_data get a few training batches from the harness (no extra flags)."""
    d = setup[0]
    cfg = _cfg(setup, method=method, r=2, options={})
    res = run_train(cfg, d / f"run-{method}", progress=False)
    assert res["steps"] == 4 and math.isfinite(res["final_train_loss"])
    assert (d / f"run-{method}" / "peft" / "adapter_model.safetensors").is_file()


def test_lr_scale_scales_only_the_adapter_in_harness_runs(setup):
    """With lr_scale the harness builds AdamW from trainable_param_groups(): the classifier keeps its lr (no
    mixed-group warning from the Controller) and training runs."""
    d = setup[0]
    cfg = _cfg(setup, options={"warmup_steps": 2, "lr_scale": 0.5})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = run_train(cfg, d / "run-sds-lr-scale", progress=False)
    assert not [w for w in caught if "lr_scale / rewarm" in str(w.message)]
    assert res["steps"] == 4 and math.isfinite(res["final_train_loss"])


def test_compare_runs_variants_of_one_method_side_by_side(setup):
    """``methods=["sds", "sds:faithful"]``: the same method with the paper's refresh as its own row and run folder;
    the variant's options are added to the shared ones (warmup_steps) and validated."""
    d = setup[0]
    cc = CompareConfig(base=_cfg(setup, steps=3, diagnostics_every=0), methods=["sds", "sds:faithful"], seeds=[0])
    out = d / "cmp-variants"
    run_compare(cc, out, progress=False)
    res = json.loads((out / "results.json").read_text())
    assert set(res["groups"]) == {"sds", "sds:faithful"}
    assert "| sds:faithful |" in (out / "report.md").read_text()
    cfgs = {p.parent.name: json.loads(p.read_text())["config"] for p in (out / "runs").rglob("done.json")}
    assert set(cfgs) == {"sds-r8-s0", "sds-faithful-r8-s0"}
    assert cfgs["sds-faithful-r8-s0"]["method"] == "sds"
    assert cfgs["sds-faithful-r8-s0"]["options"] == {"warmup_steps": 2, "faithful": True}
    assert cfgs["sds-r8-s0"]["options"] == {"warmup_steps": 2}
    for bad, match in (("sds:bogus", "unknown option"), ("sds:", "names no option"),
                       ("sds:faithful+lr_scale=0.5", "faithful=True")):
        with pytest.raises(ValueError, match=match):
            CompareConfig(base=_cfg(setup), methods=["lora", bad])
