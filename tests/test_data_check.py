"""`sdslora data` and `check_data`: which task files are present, the MRPC fallback, the hints of the data errors,
and `--fetch` against fake downloads (no network, no models)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from sdslora import cli_data
from sdslora.cli import main
from sdslora.data import SHIPPED_MRPC, TASK_FILES, check_data, tasks_reading
from sdslora.tasks import TASKS, get_task

TSV = {
    "mrpc": "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tA cat sat.\tA cat was sitting.\n0\t3\t4\tx\ty\n",
    "sst2": "sentence\tlabel\nit 's fine . \t1\nbad .\t0\n",
    "rte": "index\tsentence1\tsentence2\tlabel\n0\tA man runs.\tA person moves.\tentailment\n1\ta\tb\tnot_entailment\n",
    "cola": "gj04\t1\t\tThe pond froze solid.\ngj04\t0\t*\tPond the solid froze.\n",
}
EXAMPLE = {"instruction": "Is it? Answer format: true/false", "input": "", "output": "the answer is true",
           "answer": "true"}


def _write_all(root: Path, tasks=None) -> None:
    """A data folder with small valid files at every path of TASK_FILES (for ``tasks``, default all)."""
    for task in tasks or TASK_FILES:
        for rel in TASK_FILES[task].values():
            p = root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(TSV[rel.split("/")[0]] if rel.endswith(".tsv") else json.dumps([EXAMPLE]))


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch):
    monkeypatch.delenv("SDSLORA_DATA_DIR", raising=False)


def test_the_file_list_is_what_the_loaders_read(tmp_path):
    """TASK_FILES covers every task, and each listed file is the one its loader reads: with every file present each
    split loads; without a file the loader fails, naming the file and the `sdslora data` call."""
    assert set(TASK_FILES) == set(TASKS)
    _write_all(tmp_path)
    for task in TASKS.values():
        for split in ("train", "eval"):
            assert task.load(split, tmp_path)
    for name, task in TASKS.items():
        for split, rel in TASK_FILES[name].items():
            path = tmp_path / rel
            saved = path.read_bytes()
            path.unlink()
            try:
                if name == "mrpc" and split == "train":  # no mrpc/train.tsv: the shipped subset is used instead
                    assert len(task.load("train", tmp_path)) == 2400
                    continue
                with pytest.raises(ValueError, match="missing data file") as err:
                    task.load(split, tmp_path)
                assert str(path) in str(err.value) and f"sdslora data --task {name}" in str(err.value)
            finally:
                path.write_bytes(saved)
    assert tasks_reading(tmp_path / "math" / "math_data.json") == ["gsm8k", "svamp", "mawps", "aqua"]


def test_complete_folder_exits_0(tmp_path, capsys):
    _write_all(tmp_path)
    assert main(["data", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{len(TASK_FILES)} of {len(TASK_FILES)} task(s) complete" in out and "MISSING" not in out
    files = check_data(tmp_path)
    assert len(files) == 2 * len(TASK_FILES) and all(f.present and not f.shipped for f in files)
    assert all(f.path == tmp_path / f.rel for f in files)


def test_missing_files_are_named_with_where_to_get_them(tmp_path, capsys):
    _write_all(tmp_path, ["sst2", "boolq"])
    (tmp_path / "sst2" / "dev.tsv").unlink()
    assert main(["data", "--data-dir", str(tmp_path), "--task", "sst2", "--task", "boolq", "--task", "piqa"]) == 1
    out = capsys.readouterr().out
    assert "sst2        missing 1 of 2 file(s)" in out and "boolq       complete" in out
    assert f"MISSING  {tmp_path / 'sst2' / 'dev.tsv'}" in out
    assert f"found    {tmp_path / 'sst2' / 'train.tsv'}" in out
    assert f"MISSING  {tmp_path / 'commonsense' / 'piqa' / 'test.json'}" in out
    assert "nyu-mll/glue" in out and "LLM-Adapters" in out and "docs/data.md" in out
    assert "1 of 3 task(s) complete" in out
    # --eval-only: piqa without its train file is enough for evaluation
    _write_all(tmp_path, ["piqa"])
    (tmp_path / "commonsense" / "piqa" / "train.json").unlink()
    assert main(["data", "--data-dir", str(tmp_path), "--task", "piqa", "--eval-only"]) == 0
    assert main(["data", "--data-dir", str(tmp_path), "--task", "piqa"]) == 1


def test_environment_data_dir_and_no_data_dir(tmp_path, capsys, monkeypatch):
    _write_all(tmp_path, ["rte"])
    monkeypatch.setenv("SDSLORA_DATA_DIR", str(tmp_path))
    assert main(["data", "--task", "rte"]) == 0
    assert f"data directory: {tmp_path} (SDSLORA_DATA_DIR)" in capsys.readouterr().out
    monkeypatch.delenv("SDSLORA_DATA_DIR")
    assert main(["data", "--task", "rte"]) == 1
    out = capsys.readouterr().out
    assert "data directory: none" in out and "MISSING  <data dir>/rte/dev.tsv" in out
    assert [f.path for f in check_data(None, ["rte"])] == [None, None]


def test_unknown_task_and_absent_folder_are_errors(tmp_path, capsys):
    assert main(["data", "--task", "nope"]) == 2
    assert "unknown task(s) ['nope']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown task"):
        check_data(tmp_path, ["mrpc", "nope"])
    with pytest.raises(ValueError, match="splits"):
        check_data(tmp_path, ["mrpc"], ("test",))
    assert main(["data", "--data-dir", str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_shipped_mrpc_subset_counts_as_present(tmp_path, capsys):
    for data_dir in (None, tmp_path):  # no data dir, or one without mrpc/: the subset in the package is used
        files = check_data(data_dir, ["mrpc"])
        assert [f.path for f in files] == [SHIPPED_MRPC / "train.tsv", SHIPPED_MRPC / "dev.tsv"]
        assert all(f.present and f.shipped for f in files)
    assert main(["data", "--task", "mrpc"]) == 0
    assert "complete (the MRPC subset shipped in the package)" in capsys.readouterr().out
    _write_all(tmp_path, ["mrpc"])  # a full copy in the data folder takes precedence, as in training
    files = check_data(tmp_path, ["mrpc"])
    assert [f.path for f in files] == [tmp_path / "mrpc" / "train.tsv", tmp_path / "mrpc" / "dev.tsv"]
    assert not any(f.shipped for f in files)


def test_run_train_data_errors_point_to_sdslora_data(tmp_path):
    # the errors run_train surfaces come from the task loaders (prepare_data -> Task.load)
    with pytest.raises(ValueError, match=r"needs the GLUE files.*`sdslora data --task sst2`"):
        get_task("sst2").load("train", None)
    with pytest.raises(ValueError, match=r"`sdslora data --task gsm8k`"):
        get_task("gsm8k").load("eval", None)
    with pytest.raises(ValueError, match=r"missing data file .*cola.*`sdslora data --task cola`"):
        get_task("cola").load("eval", tmp_path)
    with pytest.raises(ValueError, match=r"math_data.json \(task svamp\).*`sdslora data --task svamp`"):
        get_task("svamp").load("train", tmp_path)


# ---- --fetch ---------------------------------------------------------------------------------------------------
HUB = {
    "mrpc": [{"sentence1": "He said\tso.", "sentence2": "He\nsaid it.", "label": 1, "idx": 0},
             {"sentence1": "a", "sentence2": "b", "label": 0, "idx": 1}],
    "sst2": [{"sentence": 'a "quoted" film', "label": 1, "idx": 0}, {"sentence": "dull", "label": 0, "idx": 1}],
    "rte": [{"sentence1": "p", "sentence2": "h", "label": 0, "idx": 0},
            {"sentence1": "p2", "sentence2": "h2", "label": 1, "idx": 1}],
    "cola": [{"sentence": "Good one.", "label": 1, "idx": 0}, {"sentence": "One good the.", "label": 0, "idx": 1}],
}


def _fake_datasets(monkeypatch, calls):
    def load_dataset(path, name, split):
        calls.append((path, name, split))
        assert split in ("train", "validation")
        return [dict(r) for r in HUB[name]]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


def test_fetch_glue_writes_the_glue_layout(tmp_path, capsys, monkeypatch):
    calls: list = []
    _fake_datasets(monkeypatch, calls)
    out = tmp_path / "data"  # created by --fetch
    argv = ["data", "--data-dir", str(out)]
    for t in HUB:
        argv += ["--fetch", t]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "4 of 4 task(s) complete" in printed and "wrote" in printed
    assert ("nyu-mll/glue", "rte", "validation") in calls and ("nyu-mll/glue", "mrpc", "train") in calls
    mrpc = get_task("mrpc").load("train", out)
    assert mrpc[0] == {"text": "He said so.", "text_pair": "He said it.", "label": 1} and mrpc[1]["label"] == 0
    assert [r["label"] for r in get_task("rte").load("eval", out)] == [0, 1]
    assert (out / "rte" / "dev.tsv").read_text().splitlines()[1].endswith("\tentailment")
    assert get_task("sst2").load("train", out)[0]["text"] == 'a "quoted" film'
    cola = get_task("cola").load("eval", out)
    assert [(r["text"], r["label"]) for r in cola] == [("Good one.", 1), ("One good the.", 0)]
    assert (out / "cola" / "train.tsv").read_text().splitlines()[1] == "glue\t0\t*\tOne good the."
    # files already there are kept unless --force
    calls.clear()
    assert main(["data", "--data-dir", str(out), "--fetch", "sst2"]) == 0
    assert calls == [] and "kept" in capsys.readouterr().out
    assert main(["data", "--data-dir", str(out), "--fetch", "sst2", "--force"]) == 0
    assert len(calls) == 2


def test_fetch_needs_datasets_and_a_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    assert main(["data", "--data-dir", str(tmp_path), "--fetch", "sst2"]) == 2
    assert "pip install datasets" in capsys.readouterr().err
    assert main(["data", "--fetch", "sst2"]) == 2
    assert "--fetch needs a folder" in capsys.readouterr().err
    assert main(["data", "--data-dir", str(tmp_path), "--fetch", "nope"]) == 2


def test_fetch_llm_adapters_files(tmp_path, capsys, monkeypatch):
    got: list[str] = []

    def download(url):
        got.append(url)
        if "piqa/train.json" in url:
            raise OSError("HTTP Error 404: Not Found")
        ex = dict(EXAMPLE, answer="4") if "math" in url or "gsm8k" in url else EXAMPLE
        return json.dumps([ex]).encode()

    monkeypatch.setattr(cli_data, "_download", download)
    assert main(["data", "--data-dir", str(tmp_path), "--fetch", "gsm8k", "--fetch", "piqa"]) == 1
    out = capsys.readouterr().out
    base = cli_data.LLM_ADAPTERS_RAW
    assert got == [base + "ft-training_set/math_data.json", base + "dataset/gsm8k/test.json",
                   base + "dataset/piqa/train.json", base + "dataset/piqa/test.json"]
    assert "could not download" in out and "404" in out and "gsm8k       complete" in out
    assert get_task("gsm8k").load("train", tmp_path)[0]["answer"] == "4"
    assert get_task("piqa").load("eval", tmp_path)[0]["answer"] == "true"
    monkeypatch.setattr(cli_data, "_download", lambda url: b'{"not": "a list"}')
    assert main(["data", "--data-dir", str(tmp_path), "--fetch", "boolq", "--eval-only"]) == 1
    assert "not a JSON list" in capsys.readouterr().out
