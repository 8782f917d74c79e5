"""Bad data files and bad run settings fail early with a ValueError that says where and what (file + line, label +
allowed range, field name) — not a JSONDecodeError position inside one row, a torch IndexError in training, or
``--train-limit -5`` silently meaning "all rows but five". No model is trained here."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from sdslora.cli import main
from sdslora.experiments.data import encode
from sdslora.experiments.train import RunConfig
from sdslora.tasks import file_task, get_task

MRPC_HEAD = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
GOOD_JSONL = '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n'

# ---- data files --------------------------------------------------------------------------------------------------
# (id, how it is loaded, file name, content, regex the message must match); "fmt:<format>" loads the file as the
# training split of file_task(<format>, ...); "task:<name>:<rel path>" writes it under a data dir and loads the
# registered task's training split.
DATA_CASES: list[tuple[str, str, str, str | bytes, str]] = [
    ("jsonl-malformed-row", "fmt:cls", "train.jsonl",
     '{"text": "a", "label": 1}\n\n{"text": "b" "label": 0}\n',
     r"train\.jsonl line 3 is not valid JSON \(Expecting ',' delimiter: column 14\); fix or remove that row"),
    ("jsonl-in-.json-malformed-row", "fmt:cls", "train.json",
     '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n{"text": "c", label: 1}\n',
     r"train\.json line 3 is not valid JSON \(Expecting property name enclosed in double quotes: column 15\)"),
    ("json-list-malformed", "fmt:cls", "train.json",
     '[{"text": "a", "label": 1},\n {"text": "b" "label": 0}]\n',
     r"train\.json is not valid JSON: line 2 column 15: Expecting ',' delimiter"),
    ("json-object-malformed-multiline", "fmt:alpaca-number", "train.json",
     '{\n "instruction": "2 + 3?",\n "answer" "5"\n}\n',
     r"train\.json is not valid JSON: line 3 column 11: Expecting ':' delimiter"),
    ("jsonl-row-not-an-object", "fmt:alpaca-number", "train.jsonl",
     '{"instruction": "q", "answer": "1"}\n[1, 2]\n',
     r"train\.jsonl line 2 is a JSON list, not an object"),
    ("json-list-entry-not-an-object", "fmt:alpaca-number", "train.json",
     '[{"instruction": "q", "answer": "1"}, 7]',
     r"train\.json: entry 2 of the list is a JSON number, not an object"),
    ("json-not-a-list", "fmt:alpaca-number", "train.json", '"just a string"',
     r"train\.json must hold a list of JSON objects .* got a JSON string"),
    ("not-utf8", "fmt:cls", "train.jsonl", b'{"text": "a", "label": 1}\n{"text": "caf\xe9", "label": 0}\n',
     r"train\.jsonl line 2 is not UTF-8 text"),
    ("tsv-too-few-fields", "fmt:cls", "train.tsv", "sentence\tlabel\na\t1\n\nb\n",
     r"train\.tsv line 4 has 1 tab-separated field\(s\), but the header \(line 1\) has 2"),
    ("tsv-too-many-fields", "fmt:cls", "train.tsv", "sentence\tlabel\na\t1\tstray\n",
     r"train\.tsv line 2 has 3 tab-separated field\(s\), but the header \(line 1\) has 2"),
    ("tsv-missing-column", "task:sst2:sst2/train.tsv", "", "text\tlabel\na\t1\n",
     r"train\.tsv line 1: the header has no column\(s\) \['sentence'\]"),
    ("cls-label-out-of-range", "fmt:cls", "train.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 5}\n',
     r"train\.jsonl line 2 has label 5, but --format cls has 2 classes \(labels 0\.\.1\)"),
    ("cls-label-negative-tsv", "fmt:cls", "train.tsv", "sentence\tlabel\na\t1\nb\t-1\n",
     r"train\.tsv line 3 has label -1, but --format cls has 2 classes \(labels 0\.\.1\)"),
    ("cls-label-not-a-number", "fmt:cls", "train.json", '[{"text": "a", "label": "yes"}]',
     r"train\.json entry 1 has label 'yes', which is not an integer class id; --format cls has 2 classes"),
    ("cls-label-fractional", "fmt:cls", "train.jsonl", '{"text": "a", "label": 0.5}\n',
     r"train\.jsonl line 1 has label 0\.5, which is not an integer class id"),
    ("cls-label-bool", "fmt:cls", "train.jsonl", '{"text": "a", "label": true}\n',
     r"train\.jsonl line 1 has label True, which is not an integer class id"),
    ("cls-label-missing", "fmt:cls", "train.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n',
     r"train\.jsonl line 2: classification rows need 'label'"),
    ("mrpc-label-out-of-range", "task:mrpc:mrpc/train.tsv", "",
     MRPC_HEAD + "1\t1\t2\ta\tb\n2\t3\t4\tc\td\n",
     r"mrpc/train\.tsv line 3 has label 2, but task mrpc has 2 classes \(labels 0\.\.1\)"),
    ("sst2-label-not-integer", "task:sst2:sst2/train.tsv", "", "sentence\tlabel\nfine\t1\nbad\tneg\n",
     r"sst2/train\.tsv line 3 has label 'neg', which is not an integer class id; task sst2 has 2 classes"),
    ("rte-unknown-label", "task:rte:rte/train.tsv", "", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n",
     r"rte/train\.tsv line 2 has label 'maybe', but task rte has the labels \['entailment', 'not_entailment'\]"),
    ("cola-wrong-field-count", "task:cola:cola/train.tsv", "", "gj04\t1\t\tThe dog barked.\n\ngj04\t0\tDog.\n",
     r"cola/train\.tsv line 3 has 3 tab-separated field\(s\); CoLA rows have 4"),
    ("cola-label-out-of-range", "task:cola:cola/train.tsv", "", "gj04\t1\t\tThe dog barked.\ngj04\t3\t*\tDog.\n",
     r"cola/train\.tsv line 2 has label 3, but task cola has 2 classes"),
    ("gsm8k-malformed-json", "task:gsm8k:math/math_data.json", "",
     '[{"instruction": "2 + 3?", "answer": "5"},\n {"instruction": "1 + 1?", "answer": "2",}]',
     r"math_data\.json is not valid JSON: line 2 column 42: Expecting property name"),
]


@pytest.mark.parametrize("how,name,content,expect", [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_bad_data_file_names_file_line_and_problem(tmp_path: Path, how: str, name: str, content: str | bytes,
                                                   expect: str) -> None:
    kind, _, rest = how.partition(":")
    if kind == "fmt":
        path = tmp_path / name
        task = None
    else:
        task_name, _, rel = rest.partition(":")
        path = tmp_path / "data" / rel
        task = get_task(task_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=expect) as info:
        if task is None:
            file_task(rest, path, None).load("train")
        else:
            task.load("train", tmp_path / "data")
    assert str(path) in str(info.value)  # the whole path, so the user can open it


def test_good_files_still_load_including_tolerated_quirks(tmp_path: Path) -> None:
    """What stays accepted: blank lines, a BOM, CRLF, trailing empty TSV fields, integral float / string labels,
    one JSON object in a .json file, a pretty-printed JSON list."""
    jl = tmp_path / "a.jsonl"
    jl.write_bytes(b'\xef\xbb\xbf{"text": "a", "label": 1}\r\n\r\n{"text": "b", "label": "0"}\r\n{"text": "c", '
                   b'"label": 1.0}\n')
    assert [r["label"] for r in file_task("cls", jl, None).load("train")] == [1, 0, 1]
    tsv = tmp_path / "a.tsv"
    tsv.write_text("sentence\tlabel\na\t1\t\t\n\nb\t0\n")
    assert [(r["text"], r["label"]) for r in file_task("cls", tsv, None).load("train")] == [("a", 1), ("b", 0)]
    one = tmp_path / "one.json"
    one.write_text('{\n "text": "x",\n "label": 0\n}\n')
    assert file_task("cls", one, None).load("train")[0]["label"] == 0
    lst = tmp_path / "list.json"
    lst.write_text(json.dumps([{"instruction": "q", "answer": "1"}], indent=2))
    assert file_task("alpaca-number", lst, None).load("train")[0]["answer"] == "1"


# ---- labels that reach encoding without a loader (rows given to run_train / encode directly) -----------------------
class _Tok:
    def __call__(self, text: str, pair: str | None = None, **kw: Any) -> dict[str, list[int]]:
        return {"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1]}


@pytest.mark.parametrize("label,expect", [
    (2, r"row 2 of 2 has label 2, but task mrpc has 2 classes \(labels 0\.\.1\)"),
    (-1, r"row 2 of 2 has label -1, but task mrpc has 2 classes"),
    ("pos", r"row 2 of 2 has label 'pos', which is not an integer class id; task mrpc has 2 classes"),
    (None, r"row 2 of 2 has label None, which is not an integer class id"),
], ids=["too-big", "negative", "word", "missing"])
def test_encode_rejects_labels_outside_the_head(label: Any, expect: str) -> None:
    rows = [{"text": "a", "text_pair": None, "label": 1}, {"text": "b", "text_pair": None, "label": label}]
    with pytest.raises(ValueError, match=expect):
        encode(get_task("mrpc"), _Tok(), rows, 16)
    rows[1]["label"] = 0
    assert [e["labels"] for e in encode(get_task("mrpc"), _Tok(), rows, 16)] == [1, 0]


# ---- run settings -----------------------------------------------------------------------------------------------
CONFIG_CASES: list[tuple[str, Any]] = [
    ("train_limit", -5), ("train_limit", 0), ("train_limit", True), ("train_limit", 2.5), ("train_limit", "5"),
    ("eval_limit", -1), ("eval_limit", 0),
    ("lr", math.inf), ("lr", math.nan), ("lr", True), ("lr", "1e-3"), ("lr", 0.0), ("lr", -1e-3),
    ("epochs", math.inf), ("epochs", 0), ("epochs", "2"),
    ("warmup_ratio", 1.0), ("warmup_ratio", -0.1), ("warmup_ratio", math.nan),
    ("weight_decay", -0.01), ("weight_decay", math.inf),
    ("dropout", "0.1"), ("dropout", 1.0), ("dropout", -0.1),
    ("seed", True), ("seed", 1.5), ("seed", -1), ("seed", 2**32), ("seed", "0"),
    ("max_new_tokens", 0), ("max_new_tokens", 8.0),
    ("batch_size", True), ("steps", 0), ("steps", False), ("alpha", True), ("alpha", math.inf),
    ("eval_every", -1), ("diagnostics_every", 1.5),
]


@pytest.mark.parametrize("name,value", CONFIG_CASES, ids=[f"{n}={v!r}" for n, v in CONFIG_CASES])
def test_run_config_rejects_bad_numbers_naming_the_field(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"^{name} must be .*, got {re.escape(repr(value))}$"):
        RunConfig(task="mrpc", method="lora", **{name: value})


def test_run_config_accepts_good_numbers() -> None:
    cfg = RunConfig(task="mrpc", method="lora", train_limit=5, eval_limit=1, lr=1, epochs=0.5, warmup_ratio=0.0,
                    weight_decay=0, dropout=0, seed=2**32 - 1, max_new_tokens=1, steps=None)
    assert cfg.train_limit == 5 and cfg.learning_rate == 1.0


# ---- the command line: the same errors, exit code 2, nothing written -------------------------------------------
# (a type error such as inf may be caught by the config-file/flag type check before RunConfig's own range check:
# either way the message names the field and the value)
@pytest.mark.parametrize("extra,expect", [
    (["--train-limit", "-5"], r"train_limit must be an int >= 1 \(or None\), got -5"),
    (["--eval-limit", "0"], r"eval_limit must be an int >= 1 \(or None\), got 0"),
    (["--lr", "inf"], r"\blr\b.*\binf\b.*must be|\blr must be .*got inf"),
    (["--lr", "-0.1"], r"lr must be a finite number > 0 \(or None\), got -0\.1"),
    (["--dropout", "nan"], r"\bdropout\b.*\bnan\b.*must be|\bdropout must be .*got nan"),
    (["--warmup-ratio", "1"], r"warmup_ratio must be a finite number >= 0 and < 1, got 1\.0"),
    (["--bad-train-file"], r"train\.jsonl line 2 is not valid JSON"),
    (["--out-of-range-label"], r"train\.jsonl line 2 has label 7, but --format cls has 2 classes \(labels 0\.\.1\)"),
], ids=["train-limit", "eval-limit", "lr-inf", "lr-negative", "dropout-nan", "warmup-1", "malformed-row", "label"])
def test_cli_train_reports_bad_data_and_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 extra: list[str], expect: str) -> None:
    train, dev = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    train.write_text(GOOD_JSONL)
    dev.write_text(GOOD_JSONL)
    if extra == ["--bad-train-file"]:
        train.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 0\n')
        extra = []
    elif extra == ["--out-of-range-label"]:
        train.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 7}\n')
        extra = []
    out = tmp_path / "out"
    argv = ["train", "--train-file", str(train), "--eval-file", str(dev), "--format", "cls", "--method", "lora",
            "--steps", "1", *extra, "-o", str(out), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and re.search(expect, err), err
    assert not out.exists()


def test_cli_eval_rejects_a_negative_eval_limit(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--model", "minilm-l6", "--task", "mrpc", "--eval-limit", "-1"]) == 2
    assert "--eval-limit must be an int >= 1, got -1" in capsys.readouterr().err
