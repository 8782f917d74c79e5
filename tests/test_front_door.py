"""What a newcomer meets first (issue 16): start-up without torch, the static ``methods`` listing, bitwise repeatable
seeded runs, one default for what ``all-linear`` adapts, the comparison report (baseline row, no timing ratio that
was not measured side by side, memory named for what it is) and the outer progress of ``compare``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from harness_fixtures import cls_files, tiny_bert_dir
from safetensors.torch import load_file

from sdslora.cli import build_parser, main
from sdslora.cli_train import DEFAULT_EXCLUDE, build_run_config


def _python(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_help_version_and_methods_do_not_import_torch():
    out = _python(
        "import contextlib, io, sys\n"
        "import sdslora, sdslora.cli\n"
        "p = sdslora.cli.build_parser()\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    for argv in (['--version'], ['--help'], ['train', '--help'], ['compare', '--help']):\n"
        "        try:\n"
        "            sdslora.cli.main(argv)\n"
        "        except SystemExit as e:\n"
        "            assert e.code == 0, (argv, e.code)\n"
        "    assert sdslora.cli.main(['methods']) == 0\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'numpy', 'matplotlib') if m in sys.modules)\n"
        "print(heavy)\n"
        "print(buf.getvalue())\n"
    )
    assert out.splitlines()[0] == "[]", out[:500]
    assert f"sdslora {__import__('sdslora').__version__}" in out and "sds " in out and "options:" in out


def test_package_names_resolve_lazily():
    out = _python(
        "import sys, sdslora\n"
        "assert 'torch' not in sys.modules and sdslora.__version__\n"
        "from sdslora import attach, AdapterConfig\n"
        "import sdslora.model, sdslora.io\n"
        "assert attach is sdslora.attach is sdslora.model.attach\n"
        "assert sdslora.load_adapter is sdslora.io.load_adapter\n"
        "assert all(hasattr(sdslora, n) for n in sdslora.__all__)\n"
        "assert set(sdslora.__all__) <= set(dir(sdslora))\n"
        "try:\n"
        "    sdslora.no_such_name\n"
        "except AttributeError as e:\n"
        "    print('AttributeError', e)\n"
    )
    assert "AttributeError" in out and "no_such_name" in out


def test_static_methods_table_matches_the_registry(capsys):
    from sdslora.cli_methods import METHOD_TABLE, registry_table

    assert registry_table() == METHOD_TABLE  # regenerate METHOD_TABLE from registry_table() after a change
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(f"{name:12s} " in out for name, *_ in METHOD_TABLE)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("front")
    return d, tiny_bert_dir(d / "bert"), *cls_files(d / "data")


def _train_flags(files, *extra: str) -> list[str]:
    _, model, train, dev = files
    return ["train", "--model", str(model), "--train-file", str(train), "--eval-file", str(dev), "--format", "cls",
            *extra]


def test_a_seeded_train_run_is_bitwise_repeatable(files, capsys):
    """The same ``sdslora train`` command and seed twice: identical losses, gradient norms, evaluation metrics and
    adapter tensors, bit for bit (SDS-LoRA through its re-parameterisation and refreshes)."""
    d = files[0]
    flags = _train_flags(files, "--method", "sds", "--steps", "6", "--batch-size", "4", "--lr", "5e-3", "--seed", "3",
                         "--option", "warmup_steps=2", "--no-progress", "--checkpoint-every", "0")
    for name in ("a", "b"):
        assert main([*flags, "-o", str(d / name)]) == 0
    capsys.readouterr()

    def records(name: str) -> list[dict]:
        recs = [json.loads(x) for x in (d / name / "metrics.jsonl").read_text().splitlines() if x.strip()]
        return [{k: v for k, v in r.items() if "time" not in k and "runtime" not in k and "per_second" not in k}
                for r in recs]

    a, b = records("a"), records("b")
    assert len([r for r in a if "loss" in r]) == 6 and a == b
    assert json.loads((d / "a" / "eval.json").read_text()) == json.loads((d / "b" / "eval.json").read_text())
    ta = load_file(str(d / "a" / "adapter" / "adapter_model.safetensors"))
    tb = load_file(str(d / "b" / "adapter" / "adapter_model.safetensors"))
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape
        assert torch.equal(ta[k].view(torch.uint8), tb[k].view(torch.uint8)), k
    assert len({r["loss"] for r in a if "loss" in r}) > 1  # it trained (the loss moved)


def test_all_linear_leaves_the_pooler_out_by_default(files):
    """One default: ``train`` and ``compare`` (the demo included) exclude BERT's pretraining pooler when the targets
    are all-linear and no ``--exclude`` is given; the resolved list is in the config (run.json)."""
    from sdslora.cli_compare import build_compare_config
    from sdslora.experiments.compare import demo_config

    parser = build_parser()
    cfg = build_run_config(parser.parse_args(_train_flags(files, "-o", "x")))
    assert cfg.targets == "all-linear" and cfg.exclude == list(DEFAULT_EXCLUDE) == ["pooler"]
    assert build_run_config(parser.parse_args(_train_flags(files, "--exclude", "", "-o", "x"))).exclude == []
    assert build_run_config(parser.parse_args(_train_flags(files, "--exclude", "classifier", "-o", "x"))).exclude == [
        "classifier"]
    assert build_run_config(parser.parse_args(_train_flags(files, "--targets", "query,value", "-o", "x"))).exclude is None
    _, model, train, dev = files
    cc, _ = build_compare_config(parser.parse_args(["compare", "--model", str(model), "--train-file", str(train),
                                                    "--eval-file", str(dev), "--format", "cls"]), "x")
    assert cc.base.exclude == ["pooler"]
    assert demo_config().base.exclude == ["pooler"]
    # a study's explicit --exclude pooler resolves to the same config as before
    cc, _ = build_compare_config(parser.parse_args(["compare", "--model", str(model), "--train-file", str(train),
                                                    "--eval-file", str(dev), "--format", "cls", "--exclude",
                                                    "pooler"]), "x")
    assert cc.base.exclude == ["pooler"]

    import sdslora
    from sdslora.experiments.models import load_model

    counts = {}
    for exclude in (["pooler"], []):
        m, _, _ = load_model(str(model), "classification")
        a = sdslora.attach(m, sdslora.AdapterConfig(method="lora", r=8, exclude_modules=exclude,
                                                    modules_to_save=["classifier"]))
        counts[bool(exclude)] = a.trainable_summary()["trainable"]
    assert counts[False] - counts[True] == 8 * (16 + 16)  # the tiny BERT's 16x16 pooler at rank 8


def test_compare_report_and_progress(files, capsys):
    """The report: a majority-class row, the memory column named for what it is, no step-time ratio (a note points
    to benchmarks/overhead.py); the progress: the plan before the first run, then one bar over all steps."""
    from sdslora.experiments.compare import CompareConfig, planned_work, run_compare
    from sdslora.experiments.train import RunConfig

    d, model, train, dev = files
    base = RunConfig(model=str(model), task=None, train_file=str(train), eval_file=str(dev), format="cls",
                     steps=3, batch_size=4, options={"warmup_steps": 2}, exclude=["pooler"])
    cc = CompareConfig(base=base, methods=["lora", "sds"], seeds=[0])
    out = d / "cmp"
    summary = run_compare(cc, out, progress=True)
    captured = capsys.readouterr()
    assert "compare: 2 runs x 3 optimizer steps = 6 steps" in captured.out
    assert "compare: 100%" in captured.err and "6/6" in captured.err
    text = (out / "report.md").read_text()
    assert "step time / LoRA" not in text and "step time / LoRA" not in summary["table_columns"]
    assert "adapter training state / LoRA (analytic)" in summary["table_columns"]
    assert "| majority class (always " in text and "benchmarks/overhead.py" in text
    assert "Step times are not compared" in captured.out
    for png in summary["plots"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second time: every run is skipped, nothing counted as trained
    run_compare(cc, out, progress=True)
    assert "2 skipped" in capsys.readouterr().err
    # the plan of a study counts its sweeps; the seed-0 run at the chosen rate (the sweep's own) is counted once
    study = CompareConfig(base=base, methods=["lora", "sds"], seeds=[0, 1, 2], lr_sweep=[1e-4, 1e-3, 1e-2],
                          lrs={"sds": 1e-3})
    plan = planned_work(study, 10)
    assert plan["runs"] == (3 + 2) + 3 and plan["steps_per_run"] == 3 and "widened" in plan["text"]
    study = CompareConfig(base=base, methods=["lora"], seeds=[0, 1], lr_sweep=[1e-3, 1e-2], widen=0, val_max=4)
    run_compare(study, d / "study", progress=True)
    captured = capsys.readouterr()
    assert "compare: 3 runs x 3 optimizer steps = 9 steps" in captured.out
    assert "9/9 [" in captured.err.split("\r")[-1] and "skipped" not in captured.err


def test_progress_tracker_counts_steps_from_the_metrics_file(tmp_path):
    from sdslora.experiments.compare import _StepProgress

    bar = _StepProgress(runs=2, steps_per_run=4, enabled=True)
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1, "loss": 1.0}\n')  # an older run's record: not counted
    tracker = bar.track("r1", f)
    with open(f, "a") as fh:
        fh.write('{"step": 2, "loss": 0.9}\n{"step": 3, "lo')
    tracker._poll()
    assert bar.bar.n == 1
    with open(f, "a") as fh:
        fh.write('ss": 0.8}\n{"step": 3, "train_loss": 0.8}\n')
    tracker._poll()
    assert bar.bar.n == 2
    f.write_text('{"step": 1, "loss": 1.0}\n')  # rewritten from the start
    tracker._poll()
    assert bar.bar.n == 3
    tracker.finished(4)
    assert bar.bar.n == 4 and bar.bar.total == 8
    bar.skipped("r2")
    assert bar.bar.total == 4
    bar.close()
