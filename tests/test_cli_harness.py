"""``sdslora train | eval | compare`` from the command line: config file vs flags, bad input, eval of a run."""

from __future__ import annotations

import json

import pytest
from harness_fixtures import cls_files, tiny_bert_dir

from sdslora.cli import build_parser, main
from sdslora.cli_compare import build_compare_config
from sdslora.cli_train import build_run_config, parse_options
from sdslora.experiments.compare import demo_config
from sdslora.experiments.train import RunConfig


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    model = tiny_bert_dir(d / "bert")
    train, dev = cls_files(d / "data")
    return d, model, train, dev


def _flags(files, *extra: str) -> list[str]:
    d, model, train, dev = files
    return ["--model", str(model), "--train-file", str(train), "--eval-file", str(dev), "--format", "cls",
            "--method", "sds", "--steps", "3", "--batch-size", "4", "--option", "warmup_steps=2", *extra]


def test_config_file_and_flags_agree(files, tmp_path):
    d, model, train, dev = files
    parser = build_parser()
    args = parser.parse_args(["train", *_flags(files, "--lr", "3e-4", "--targets", "query,value", "--seed", "2"),
                              "-o", "x"])
    from_flags = build_run_config(args)
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        f"model: {model}\ntask: null\ntrain_file: {train}\neval_file: {dev}\nformat: cls\nmethod: sds\nsteps: 3\n"
        "batch_size: 4\noptions: {warmup_steps: 2}\nlr: 3.0e-4\ntargets: [query, value]\nseed: 2\n")
    from_file = build_run_config(parser.parse_args(["train", "--config", str(yaml_file), "-o", "x"]))
    assert from_file == from_flags
    assert from_flags.targets == ["query", "value"] and from_flags.options == {"warmup_steps": 2}
    # flags override the file
    over = build_run_config(parser.parse_args(["train", "--config", str(yaml_file), "--lr", "1e-3", "--option",
                                               "refresh=every:2", "-o", "x"]))
    assert over.lr == 1e-3 and over.options == {"warmup_steps": 2, "refresh": "every:2"} and over.seed == 2
    assert parse_options(["a=1", "b=x", "c=true", "d=0.5"]) == {"a": 1, "b": "x", "c": True, "d": 0.5}
    with pytest.raises(ValueError, match="key=value"):
        parse_options(["novalue"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("stepz: 3\n")
    with pytest.raises(ValueError, match="unknown run config field.*stepz"):
        build_run_config(parser.parse_args(["train", "--config", str(bad), "-o", "x"]))


def test_train_then_eval_from_the_command_line(files, capsys):
    d = files[0]
    out = d / "run"
    assert main(["train", *_flags(files), "-o", str(out), "--no-progress"]) == 0
    assert "done:" in capsys.readouterr().out
    saved = json.loads((out / "eval.json").read_text())
    assert main(["eval", "--model", str(files[1]), "--adapter", str(out / "adapter"), "--eval-file",
                 str(files[3]), "--format", "cls"]) == 0
    printed = capsys.readouterr().out
    assert f"accuracy: {saved['accuracy']:.4f}" in printed
    written = json.loads((out / "eval-file.json").read_text())
    assert written["accuracy"] == saved["accuracy"] and written["f1"] == saved["f1"]


@pytest.mark.parametrize("case", ["missing-file", "unknown-task", "unknown-method", "not-a-model", "unrelated-out",
                                  "bad-option"])
def test_bad_input_is_a_clear_error_and_nothing_is_written(files, tmp_path, capsys, case):
    d, model, train, dev = files
    out = tmp_path / "out"
    argv = _flags(files)
    expect = {"missing-file": "missing data file", "unknown-task": "unknown task 'nope'",
              "unknown-method": "unknown method 'nope'", "not-a-model": "not a Hugging Face model folder",
              "unrelated-out": "holds no sdslora run", "bad-option": "unknown option"}[case]
    if case == "missing-file":
        argv[argv.index("--train-file") + 1] = str(tmp_path / "absent.tsv")
    elif case == "unknown-task":
        argv = ["--model", str(model), "--task", "nope"]
    elif case == "unknown-method":
        argv[argv.index("--method") + 1] = "nope"
    elif case == "not-a-model":
        (tmp_path / "empty_model").mkdir()
        argv[argv.index("--model") + 1] = str(tmp_path / "empty_model")
    elif case == "unrelated-out":
        out.mkdir()
        (out / "thesis.tex").write_text("precious")
    elif case == "bad-option":
        argv += ["--option", "warmup=3"]
    assert main(["train", *argv, "-o", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and expect in err
    if case == "unrelated-out":
        assert [p.name for p in out.iterdir()] == ["thesis.tex"] and (out / "thesis.tex").read_text() == "precious"
    elif case != "not-a-model":
        assert not out.exists()


def test_compare_without_arguments_is_the_demo_preset():
    args = build_parser().parse_args(["compare"])
    cc, out = build_compare_config(args, "sdslora compare")
    demo = demo_config("sdslora compare")
    assert cc.base == demo.base and cc.methods == ["lora", "sds", "full"] and cc.synthetic
    assert cc.base.model == "minilm-l6" and cc.base.task == "mrpc" and cc.base.r == 8
    assert cc.base.modules_to_save == ["classifier"] and cc.base.diagnostics_every > 0
    assert cc.lrs == demo.lrs and set(cc.lrs) == {"lora", "sds", "full"}  # the rates the MRPC study chose
    args = build_parser().parse_args(["compare", "--lr", "sds=2e-4"])
    assert build_compare_config(args, "x")[0].lrs == {**demo.lrs, "sds": 2e-4}
    args = build_parser().parse_args(["compare", "--lr", "3e-4", "--methods", "lora,sds"])
    cc2, _ = build_compare_config(args, "x")
    assert cc2.lrs == {} and cc2.base.lr == 3e-4
    args = build_parser().parse_args(["compare", "--steps", "7", "--seeds", "0,1", "--lr", "sds=1e-4"])
    cc, _ = build_compare_config(args, "x")
    assert cc.base.steps == 7 and cc.seeds == [0, 1] and cc.lrs == {**demo.lrs, "sds": 1e-4}
    args = build_parser().parse_args(["compare", "--task", "nope"])
    with pytest.raises(ValueError, match="unknown task"):
        build_compare_config(args, "x")
    assert isinstance(cc.base, RunConfig)
