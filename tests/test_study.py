"""The study runner (``compare`` with learning-rate sweeps): validation split, grid selection and widening,
interval arithmetic, evidence records and resuming from them, the evidence report. Tiny models only."""

from __future__ import annotations

import json
import math
import sys
from types import SimpleNamespace

import pytest
from harness_fixtures import cls_files, tiny_bert_dir

import sdslora.experiments.compare as compare_mod
from sdslora.experiments.compare import (
    CompareConfig,
    _choose_lrs,
    run_compare,
    select_lr,
    selection_key,
    split_validation,
    widen_grid,
)
from sdslora.experiments.evidence import build_report
from sdslora.experiments.stats import baseline_rate, diff_interval, gap_closed, t_interval, t_quantile
from sdslora.experiments.train import RunConfig, RunDirError
from sdslora.tasks import get_task


# ---- validation split --------------------------------------------------------------------------------------------
def test_validation_split_is_disjoint_complete_and_deterministic():
    rows = [{"id": i} for i in range(57)]
    rest, val = split_validation(rows, 0.1, 200)
    assert len(val) == 5 and len(rest) == 52
    ids_v, ids_r = {r["id"] for r in val}, {r["id"] for r in rest}
    assert not ids_v & ids_r and ids_v | ids_r == set(range(57))
    assert split_validation(rows, 0.1, 200) == (rest, val)  # fixed seed
    assert len(split_validation(rows, 0.5, 3)[1]) == 3  # the cap
    assert [r["id"] for r in rest] == sorted(ids_r)  # the training rows keep their order
    with pytest.raises(ValueError, match="at least 2"):
        split_validation(rows[:1], 0.1, 10)


# ---- learning-rate selection -------------------------------------------------------------------------------------
def _res(metric=None, loss=None):
    return {"val": {"accuracy": metric, "loss": loss}}


def test_selection_key_ranks_metric_then_loss_and_diverged_runs_last():
    assert selection_key(_res(0.8, 0.5), "accuracy") > selection_key(_res(0.7, 0.1), "accuracy")
    assert selection_key(_res(0.8, 0.3), "accuracy") > selection_key(_res(0.8, 0.5), "accuracy")  # tie -> loss
    assert selection_key(_res(float("nan"), None), "accuracy") < selection_key(_res(0.0, 9.0), "accuracy")
    assert selection_key(_res(None, 0.2), None) > selection_key(_res(None, 0.3), None)  # generation: loss only


def test_select_lr_reports_edges_and_breaks_ties_towards_the_smaller_rate():
    k = {1e-4: (0.5, 0), 1e-3: (0.7, 0), 1e-2: (0.6, 0)}
    assert select_lr(k) == (1e-3, None)
    assert select_lr({1e-4: (0.5, 0), 1e-3: (0.7, 0)}) == (1e-3, "high")
    assert select_lr({1e-4: (0.9, 0), 1e-3: (0.7, 0)}) == (1e-4, "low")
    assert select_lr({1e-4: (0.7, 0), 1e-3: (0.7, 0), 1e-2: (0.1, 0)}) == (1e-4, "low")
    assert widen_grid([1e-4, 3e-4, 1e-3], "high") == pytest.approx(1e-3 * 1e-3 / 3e-4, rel=1e-2)
    assert widen_grid([1e-4, 3e-4, 1e-3], "low") == pytest.approx(1e-4 / 3, rel=1e-2)


def _fake_runner(score):
    calls = []

    def run(m, r, lr, seed):
        calls.append(lr)
        return {"val": {"accuracy": score(lr), "loss": 1.0}}

    task = SimpleNamespace(primary_metric="accuracy", kind="classification")
    return SimpleNamespace(run=run, task=task, val_rows=[1, 2, 3]), calls


@pytest.mark.parametrize("widen, expect_calls, bracketed", [
    (2, [1e-4, 1e-3, 1e-2, 1e-1], True),   # best 1e-2 found past the edge, bracketed by 1e-1
    (1, [1e-4, 1e-3, 1e-2], False),        # budget spent with the best still on the edge: reported as such
    (0, [1e-4, 1e-3], False),
])
def test_grid_is_widened_past_the_edge_holding_the_best_rate(widen, expect_calls, bracketed):
    runner, calls = _fake_runner(lambda lr: -abs(math.log10(lr) + 2))  # peak at 1e-2
    cc = CompareConfig(base=RunConfig(task="mrpc", method="lora"), methods=["lora"], seeds=[0],
                       lr_sweep=[1e-4, 1e-3], widen=widen)
    chosen, sweep = _choose_lrs(cc, runner)
    assert calls == pytest.approx(expect_calls)
    assert chosen[("lora", 8)] == pytest.approx(expect_calls[min(2, len(expect_calls) - 1)])
    assert sweep["lora"]["bracketed"] is bracketed
    assert set(sweep["lora"]["scores"]) == {f"{x:g}" for x in calls}


def test_study_config_is_validated():
    base = RunConfig(task="mrpc", method="lora")
    with pytest.raises(ValueError, match="distinct positive"):
        CompareConfig(base=base, methods=["lora"], lr_sweep=[1e-3, -1.0])
    with pytest.raises(ValueError, match="no learning-rate grid for method"):
        CompareConfig(base=base, methods=["lora", "full"], lr_grids={"lora": [1e-3, 1e-2]})
    with pytest.raises(ValueError, match="not compared"):
        CompareConfig(base=base, methods=["lora"], lr_grids={"sds": [1e-3]}, lr_sweep=[1e-3])
    with pytest.raises(ValueError, match="give lr_sweep"):
        CompareConfig(base=base, methods=["lora"], evidence_dir="x")


# ---- intervals ---------------------------------------------------------------------------------------------------
def test_t_interval_matches_a_hand_computation(monkeypatch):
    m, h = t_interval([1.0, 2.0, 3.0])  # sd 1, n 3: 4.303 / sqrt(3)
    assert m == 2.0 and h == pytest.approx(4.303 / math.sqrt(3), abs=1e-3)
    assert t_interval([0.7]) == (0.7, None) and t_interval([]) == (None, None)
    assert t_interval([0.5, float("nan"), 0.7])[0] == pytest.approx(0.6)  # non-finite values are dropped
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # the table path, exact to its 3 decimals
    assert t_quantile(2) == 4.303 and t_quantile(4.07) == 2.776 and t_quantile(1000) == pytest.approx(1.962, abs=1e-3)
    assert t_interval([1.0, 2.0, 3.0])[1] == pytest.approx(4.303 / math.sqrt(3), abs=1e-9)
    # Welch: var 1 / 3 and 20/3 / 4, se² = 2, df = 4 / ((1/9)/2 + (25/9)/3) = 4.075 -> table df 4 (2.776)
    lo, hi = diff_interval([1.0, 2.0, 3.0], [2.0, 4.0, 6.0, 8.0])
    assert (lo + hi) / 2 == pytest.approx(3.0) and (hi - lo) / 2 == pytest.approx(2.776 * math.sqrt(2), abs=1e-9)
    assert diff_interval([1.0], [2.0, 3.0]) is None


def test_gap_closed_point_interval_and_significance():
    lora, sds, full = [0.50, 0.52, 0.54], [0.60, 0.62, 0.64], [0.70, 0.72, 0.74]
    g = gap_closed(lora, sds, full, n_boot=2000)
    assert g["gap_significant"] and g["point"] == pytest.approx(0.5)
    assert g["lo"] <= 0.5 <= g["hi"] and g["lo"] > 0 and g["hi"] < 1
    assert g["gap"] == pytest.approx(0.2)
    same = gap_closed(lora, sds, [0.49, 0.53, 0.56])  # full within LoRA's noise: no share is reported
    assert not same["gap_significant"] and same["point"] is None and same["gap_interval"][0] < 0
    one = gap_closed(lora, [0.62], full)  # one seed of the method: the point, but no interval to claim
    assert one["point"] == pytest.approx(0.5) and one["lo"] is None and one["hi"] is None


def test_baseline_rate_is_the_majority_or_chance_rate():
    rows = [{"label": 1}, {"label": 1}, {"label": 0}]
    b = baseline_rate(get_task("cola"), rows)
    assert b["value"] == pytest.approx(2 / 3) and b["class"] == 1 and b["primary"] == 0.0  # Matthews of a constant
    assert baseline_rate(get_task("mrpc"), rows)["primary"] == pytest.approx(2 / 3)
    inst = "Which is right?\n\nSolution1: x\nSolution2: y\n\nAnswer format: solution1/solution2"
    c = baseline_rate(get_task("piqa"), [{"instruction": inst, "answer": "solution1"}])
    assert c["kind"] == "chance" and c["value"] == pytest.approx(0.5)


# ---- a tiny study end to end -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def study(tmp_path_factory):
    d = tmp_path_factory.mktemp("study")
    model = tiny_bert_dir(d / "bert")
    train, dev = cls_files(d / "data", n_train=40, n_eval=10)
    base = RunConfig(model=str(model), task=None, train_file=str(train), eval_file=str(dev), format="cls",
                     method="lora", steps=4, batch_size=4, eval_every=2, eval_batch_size=8)
    cc = CompareConfig(base=base, methods=["lora", "full"], seeds=[0, 1], val_fraction=0.25, val_max=10,
                       lr_grids={"lora": [1e-3, 1e-2], "full": [1e-4, 1e-3]}, widen=0,
                       evidence_dir=str(d / "evidence" / "tiny"), command="pytest tiny study")
    seen = []
    real = compare_mod.run_train

    def spy(cfg, out, **kw):
        seen.append(kw)
        return real(cfg, out, **kw)

    compare_mod.run_train = spy
    try:
        summary = run_compare(cc, d / "cmp", progress=False)
    finally:
        compare_mod.run_train = real
    return d, cc, summary, seen, (train, dev)


def test_study_never_trains_or_chooses_on_the_evaluation_split(study):
    d, cc, summary, seen, (train, dev) = study
    from sdslora.tasks.glue import load_cls_file

    train_rows, eval_rows = load_cls_file(train), load_cls_file(dev)
    for kw in seen:
        assert len(kw["val_rows"]) == 10 and len(kw["train_rows"]) == 30
        assert kw["eval_rows"] == eval_rows  # the evaluation split is only evaluated on
        # validation + training rows are exactly the training file, split without overlap
        assert sorted(map(repr, kw["val_rows"] + kw["train_rows"])) == sorted(map(repr, train_rows))
    assert summary["setup"]["n_val"] == 10
    # the sweep's scores are the validation metric of the seed-0 runs, not their evaluation metric
    recs = [json.loads(f.read_text()) for f in (d / "evidence" / "tiny" / "runs").glob("*-s0.json")]
    for rec in recs:
        assert summary["learning_rates"][rec["method"]]["scores"][f"{rec['lr']:g}"] == rec["val"]["accuracy"]


def test_study_records_every_finished_run_with_its_curve(study):
    d, cc, summary, seen, _ = study
    recs = sorted((d / "evidence" / "tiny" / "runs").glob("*.json"))
    # 2 methods x 2 learning rates with seed 0, then seed 1 at each chosen rate: the seed-0 run is the sweep's own
    assert len(recs) == 6 and len(seen) == 6
    for f in recs:
        rec = json.loads(f.read_text())
        assert rec["format"] == "sdslora-evidence-run/1" and rec["config"]["lr"] == rec["lr"]
        assert [p["step"] for p in rec["curve"]] == [0, 2, 4]
        assert rec["curve"][-1]["accuracy"] == rec["val"]["accuracy"] and rec["val"]["n"] == 10
        assert rec["eval"]["n"] == 10 and len(rec["loss_curve"]) == 4
    setting = json.loads((d / "evidence" / "tiny" / "setting.json").read_text())
    assert setting["n_train"] + setting["n_val"] == 40 and setting["lr_grids"]["full"] == [1e-4, 1e-3]
    chosen = {k: v["lr"] for k, v in summary["learning_rates"].items()}
    for m in ("lora", "full"):
        scores = summary["learning_rates"][m]["scores"]
        assert set(scores) == {f"{x:g}" for x in cc.lr_grids[m]}
        assert {r["lr"] for r in summary["runs"] if r["method"] == m} == {chosen[m]}


def test_study_resumes_from_the_evidence_records_alone(study, monkeypatch):
    d, cc, summary, _, _ = study

    def boom(*a, **k):
        raise AssertionError("a recorded run was trained again")

    monkeypatch.setattr(compare_mod, "run_train", boom)
    again = run_compare(cc, d / "cmp-fresh-folder", progress=False)  # no run folders there: records only
    assert {k: v["lr"] for k, v in again["learning_rates"].items()} == \
        {k: v["lr"] for k, v in summary["learning_rates"].items()}
    assert [r["eval"] for r in again["runs"]] == [r["eval"] for r in summary["runs"]]
    other = CompareConfig(**{**cc.__dict__, "base": RunConfig(**{**cc.base.to_dict(), "steps": 5})})
    with pytest.raises(RunDirError, match="different settings"):
        run_compare(other, d / "cmp-other", progress=False)


def test_evidence_report_rebuilds_the_runner_choices_and_intervals(study):
    d, cc, summary, _, _ = study
    root = d / "evidence"
    out = build_report(root, d / "evidence.md")
    an = out["settings"]["tiny"]
    for g in an["groups"]:
        assert g["lr"] == summary["learning_rates"][g["label"]]["lr"]
        vals = [r["eval"]["accuracy"] for r in summary["runs"] if r["method"] == g["label"]]
        assert g["mean"] == pytest.approx(sum(vals) / len(vals)) and sorted(g["values"]) == sorted(vals)
        assert g["ci95"] == pytest.approx(t_interval(vals)[1])
        sweep = [r for r in summary["runs"] if r["method"] == g["label"] and r["seed"] == cc.seeds[0]]
        if len(sweep) > 1:  # the rate the validation loss would have chosen, beside the metric's choice
            assert g["lr_by_loss"] == min(sweep, key=lambda r: r["val"]["loss"])["lr"]
    text = (d / "evidence.md").read_text()
    assert "| 8 | LoRA |" in text and "full fine-tuning" in text and "Majority class" in text
    for p in an["plots"]:
        assert (root / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="holds no study"):
        build_report(d / "cmp", d / "x.md")


def test_validation_scores_match_evaluate_and_a_hand_computed_loss(study):
    import torch

    from sdslora.experiments.data import Collator, encode, evaluate, validation_scores
    from sdslora.experiments.models import load_model
    from sdslora.tasks import file_task
    from sdslora.tasks.glue import load_cls_file

    d, cc, _, _, (train, dev) = study
    task = file_task("cls", train, dev)
    model, tok, _ = load_model(cc.base.model, "classification", 2)
    rows = load_cls_file(dev)
    got = validation_scores(model, tok, task, rows, batch_size=3)  # uneven last batch
    ref = evaluate(model, tok, task, rows)
    assert got["accuracy"] == ref["accuracy"] and got["f1"] == ref["f1"]
    losses = []
    with torch.no_grad():
        for item in encode(task, tok, rows, 128):
            b = Collator(tok.pad_token_id)([item])
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double()
            losses.append(float(torch.nn.functional.cross_entropy(logits, b["labels"])))
    assert got["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_study_flags_reach_the_config():
    from sdslora.cli import build_parser
    from sdslora.cli_compare import build_compare_config

    args = build_parser().parse_args([
        "compare", "--task", "cola", "--methods", "lora,sds:lr_scale=0.35,full", "--lr-sweep", "1e-4,1e-3",
        "--lr-sweep", "sds:lr_scale=0.35=1e-4,3e-4", "--lr-sweep", "full=1e-5,3e-5", "--val-max", "50",
        "--widen", "1", "--eval-every", "20", "--evidence", "ev/cola"])
    cc, _ = build_compare_config(args, "x")
    assert cc.study and cc.lr_sweep == [1e-4, 1e-3] and cc.val_max == 50 and cc.widen == 1
    assert cc.lr_grids == {"sds:lr_scale=0.35": [1e-4, 3e-4], "full": [1e-5, 3e-5]}
    assert cc.grid_for("lora") == [1e-4, 1e-3] and cc.grid_for("full") == [1e-5, 3e-5]
    assert cc.base.eval_every == 20 and cc.evidence_dir == "ev/cola"
    args = build_parser().parse_args(["compare", "--task", "cola", "--lr-sweep", "dora=1e-3"])
    with pytest.raises(ValueError, match="not compared"):
        build_compare_config(args, "x")


def test_generation_study_selects_on_validation_loss(tmp_path):
    from harness_fixtures import math_file, tiny_llama_dir

    model = tiny_llama_dir(tmp_path / "llama")
    data = math_file(tmp_path / "math.json", n=12)
    base = RunConfig(model=str(model), task=None, train_file=str(data), eval_file=str(data), format="alpaca-number",
                     method="lora", steps=2, batch_size=2, max_new_tokens=3, max_length=64, eval_every=1)
    cc = CompareConfig(base=base, methods=["lora"], seeds=[0], lr_sweep=[1e-3, 1e-1], widen=0, val_fraction=0.25)
    summary = run_compare(cc, tmp_path / "cmp", progress=False)
    runs = {r["lr"]: r for r in summary["runs"]}
    sweep = summary["learning_rates"]["lora"]
    assert sweep["selected_on"] == "validation loss"
    losses = {float(k): v for k, v in sweep["scores"].items()}
    assert set(runs) == {min(losses, key=losses.get)}  # the lower validation loss wins
    rec = next(iter(runs.values()))
    assert set(rec["val"]) == {"loss", "n"} and rec["val"]["n"] == 3  # no decoding pass on the validation split
    assert [p["step"] for p in rec["curve"]] == [0, 1, 2] and all("loss" in p for p in rec["curve"])


def test_paired_interval_by_seed_matches_a_hand_computation(monkeypatch):
    from sdslora.experiments.stats import paired_interval

    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    lora = {0: 0.76, 1: 0.735, 2: 0.703}
    sds = {0: 0.74, 1: 0.691, 2: 0.657, 7: 0.9}  # a seed only one side has is ignored
    lo, hi, n = paired_interval(lora, sds)
    d = [-0.020, -0.044, -0.046]
    m = sum(d) / 3
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / 2)
    assert n == 3 and (lo + hi) / 2 == pytest.approx(m) and (hi - lo) / 2 == pytest.approx(4.303 * sd / math.sqrt(3))
    assert paired_interval({0: 1.0}, {0: 2.0}) is None


def test_full_fine_tuning_runs_once_per_seed_under_the_base_rank():
    from sdslora.experiments.compare import CompareConfig
    from sdslora.experiments.train import RunConfig

    cc = CompareConfig(base=RunConfig(model="minilm-l6", task="mrpc", r=8), methods=["full", "lora"], seeds=[0, 1],
                       ranks=[1, 32])
    grid = cc.grid()
    assert [g for g in grid if g[0] == "full"] == [("full", 8, 0), ("full", 8, 1)]  # the same runs for any ranks
    assert [g for g in grid if g[0] == "lora"] == [("lora", 1, 0), ("lora", 32, 0), ("lora", 1, 1), ("lora", 32, 1)]


def test_records_made_before_a_runconfig_field_existed_still_match():
    """A study resumes across versions: a record (or setting) saved before RunConfig grew a field reads that field
    at its default, so it is not taken for a different run."""
    from sdslora.experiments.train import RunConfig, with_defaults

    now = RunConfig(model="minilm-l6", task="mrpc").to_dict()
    old = {k: v for k, v in now.items() if k != "adapter_dtype"}
    assert with_defaults(old, now) == now
    changed = dict(old, adapter_dtype="base")
    assert with_defaults(changed, now) != now  # a value that was set is kept


def test_report_expects_what_the_commands_asked_for_not_every_method_at_every_rank():
    from sdslora.experiments.evidence import planned_runs

    setting = {
        "methods": ["full", "lora", "sds", "dora"], "ranks": [8, 32], "base": {"r": 8},
        "commands": [
            "sdslora compare --task sst2 --methods full,lora,sds --ranks 8,32 --lr-sweep 1e-3",
            "sdslora compare --task sst2 --methods dora --ranks 32 --lr-sweep 1e-3",
        ],
    }
    want = planned_runs(setting)
    assert want == {("full", None), ("lora", 8), ("lora", 32), ("sds", 8), ("sds", 32), ("dora", 32)}
    setting["commands"] = ["sdslora compare --task sst2 --lr-sweep 1e-3"]  # defaults: lora, sds, full at base r
    assert planned_runs(setting) == {("full", None), ("lora", 8), ("sds", 8)}
    setting["commands"] = ["not a compare command"]  # unreadable: every method at every rank
    assert ("dora", 8) in planned_runs(setting)


def _merge_entry(folder: str, entry: str) -> None:
    import time
    from pathlib import Path

    from sdslora.experiments.run_folder import folder_lock, write_json

    f = Path(folder) / "setting.json"
    with folder_lock(Path(folder)):
        old = json.loads(f.read_text()) if f.is_file() else []
        time.sleep(0.3)  # another study starting meanwhile would read the same old list
        write_json(f, [*old, entry])


def test_studies_started_side_by_side_merge_their_setting(tmp_path):
    """Several studies of one setting may start at once (one process per method on one GPU): each reads, merges
    and writes setting.json under the folder's lock, so none overwrites another's methods, and the atomic writes
    of different processes never share a temporary file."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_merge_entry, args=(str(tmp_path), m)) for m in ("full", "lora", "sds")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert sorted(json.loads((tmp_path / "setting.json").read_text())) == ["full", "lora", "sds"]
    assert not list(tmp_path.glob("*.tmp"))
