"""Task loaders, metrics and answer extraction on known inputs (small files written here, no shared data)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sdslora.data import SHIPPED_MRPC, read_tsv, resolve_data_dir
from sdslora.tasks import TASKS, file_task, get_task
from sdslora.tasks.extract import extract_choice, extract_number, extract_option_letter, response_part
from sdslora.tasks.metrics import accuracy, f1_binary, matthews, numbers_equal
from sdslora.tasks.prompts import alpaca_prompt, choice_labels

BOM = "\ufeff"


def _glue_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    (d / "mrpc").mkdir(parents=True)
    (d / "mrpc" / "train.tsv").write_text(
        BOM + "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
        '1\t1\t2\tHe said " yes " .\tHe said yes .\n0\t3\t4\tA cat .\tA dog .\n', encoding="utf-8")
    (d / "mrpc" / "dev.tsv").write_text(BOM + "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t5\t6\tx\ty\n",
                                        encoding="utf-8")
    (d / "rte").mkdir()
    for split in ("train", "dev"):
        (d / "rte" / f"{split}.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\tA b.\tA.\tentailment\n"
                                                "1\tC d.\tE.\tnot_entailment\n")
    (d / "sst2").mkdir()
    for split in ("train", "dev"):
        (d / "sst2" / f"{split}.tsv").write_text("sentence\tlabel\nfine film \t1\nbad movie \t0\n")
    (d / "cola").mkdir()
    for split in ("train", "dev"):
        (d / "cola" / f"{split}.tsv").write_text("gj04\t1\t\tThe dog barked.\ngj04\t0\t*\tDog the barked.\n")
    (d / "math" / "gsm8k").mkdir(parents=True)
    rows = [{"instruction": "2 + 3?", "input": "", "output": "The answer is 5.", "answer": "5.0"}]
    (d / "math" / "math_data.json").write_text(json.dumps(rows))
    (d / "math" / "gsm8k" / "test.json").write_text(json.dumps(rows))
    (d / "commonsense" / "boolq").mkdir(parents=True)
    b = [{"instruction": "Please answer the following question with true or false, question: is it?\n\n"
                         "Answer format: true/false", "input": "", "output": "the correct answer is true",
          "answer": "true"}]
    (d / "commonsense" / "boolq" / "test.json").write_text(json.dumps(b))
    return d


def test_glue_loaders_parse_the_real_formats(tmp_path):
    d = _glue_dir(tmp_path)
    mrpc = get_task("mrpc").load("train", d)
    assert mrpc == [{"text": 'He said " yes " .', "text_pair": "He said yes .", "label": 1},
                    {"text": "A cat .", "text_pair": "A dog .", "label": 0}]
    assert [r["label"] for r in get_task("rte").load("train", d)] == [0, 1]  # entailment = 0 (GLUE)
    assert get_task("sst2").load("eval", d)[0] == {"text": "fine film", "text_pair": None, "label": 1}
    cola = get_task("cola").load("train", d)
    assert [(r["text"], r["label"]) for r in cola] == [("The dog barked.", 1), ("Dog the barked.", 0)]
    assert get_task("gsm8k").gold(get_task("gsm8k").load("eval", d)[0]) == 5.0
    assert get_task("boolq").load("eval", d)[0]["answer"] == "true"


def test_shipped_mrpc_subset_is_used_without_a_data_dir():
    rows = get_task("mrpc").load("train", None)
    dev = get_task("mrpc").load("eval", None)
    assert len(rows) == 2400 and len(dev) == 408
    assert {r["label"] for r in rows} == {0, 1}
    assert (SHIPPED_MRPC / "SOURCE.md").is_file() and (SHIPPED_MRPC / "LICENSE.md").is_file()
    raw = read_tsv(SHIPPED_MRPC / "train.tsv")
    assert raw[0]["#1 String"] == rows[0]["text"]


def test_missing_files_and_unknown_tasks_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(ValueError, match="missing data file .*sst2"):
        get_task("sst2").load("train", tmp_path)
    with pytest.raises(ValueError, match="no local training split"):
        get_task("piqa").load("train", tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        resolve_data_dir(tmp_path / "absent")
    with pytest.raises(ValueError, match="unknown data format"):
        file_task("csv", None, None)
    with pytest.raises(ValueError, match="missing data file"):
        file_task("cls", tmp_path / "no.tsv", None)
    assert {"mrpc", "sst2", "rte", "cola", "gsm8k", "svamp", "aqua", "mawps", "boolq", "piqa", "siqa", "winogrande",
            "arc-e", "arc-c", "obqa"} <= set(TASKS)


def test_metrics_against_hand_computed_references():
    preds, labels = [1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0]
    tp, tn, fp, fn = 2, 2, 1, 1
    assert accuracy(preds, labels) == pytest.approx(4 / 6)
    assert f1_binary(preds, labels) == pytest.approx(2 * tp / (2 * tp + fp + fn))
    ref = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert matthews(preds, labels) == pytest.approx(ref)
    assert matthews([1, 1, 1], [1, 0, 1]) == 0.0  # empty marginal
    assert matthews([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    assert f1_binary([0, 0], [0, 0]) == 0.0
    with pytest.raises(ValueError, match="2 predictions for 3 labels"):
        accuracy([1, 0], [1, 0, 1])
    assert numbers_equal(576.0004, 576.0) and not numbers_equal(float("inf"), 576.0)


def test_number_extraction_on_model_like_outputs():
    prompt = alpaca_prompt({"instruction": "How many tiles for 36 sq ft?", "input": ""})
    assert extract_number(prompt + "He needs 24 * 24 = 576 tiles. The answer is 576.") == 576.0
    assert extract_number("The total is 1,234 dollars.") == 1234.0  # thousands comma removed
    assert extract_number("It drops by -3.5 degrees") == -3.5
    assert extract_number(prompt + "I do not know.") == float("inf")  # prompt numbers are not read
    assert extract_number("") == float("inf")
    task = get_task("gsm8k")
    ex = [{"answer": "576.0"}, {"answer": "8.0"}]
    preds = [task.predict_from_text(t, e) for t, e in zip(["... The answer is 576.", "no number"], ex)]
    assert task.score(preds, ex) == {"accuracy": 0.5}


def test_option_and_choice_extraction_including_failures():
    assert extract_option_letter("Rationale: 1023.65 - 1000 = 23.65. The answer is (A).") == "A"
    assert extract_option_letter("A: first we compute ... so the answer is D") == "D"  # "A:" is not an answer
    assert extract_option_letter("Between (B) and (C) we pick (C)") == "B"
    assert extract_option_letter("no idea") == ""
    assert extract_option_letter("Clearly Eleven") == ""  # capitals inside words do not count
    labels = choice_labels("Answer1: x Answer2: y\n\nAnswer format: answer1/answer2/answer3/answer4")
    assert labels == ["answer1", "answer2", "answer3", "answer4"]
    assert extract_choice("### Response:\nthe correct answer is answer3", labels) == "answer3"
    assert extract_choice("the correct answer is solution", ["solution1", "solution2"]) == ""
    assert extract_choice("I think true, no wait, false", ["true", "false"]) == "true"  # first occurrence
    assert extract_choice("answer10 fits", [f"answer{i}" for i in range(1, 11)]) == "answer10"
    assert response_part("prompt ### Response:\n  ok ") == "ok"
    with pytest.raises(ValueError, match="Answer format"):
        choice_labels("no format line")
    t = get_task("winogrande")
    ex = {"instruction": "Option1: A Option2: B Answer format: option1/option2", "answer": "option2"}
    assert t.predict_from_text("the correct answer is option2", ex) == "option2"
    assert t.score(["option2", ""], [ex, ex]) == {"accuracy": 0.5}


def test_alpaca_prompt_matches_llm_adapters_template():
    p = alpaca_prompt({"instruction": "Q?", "input": ""})
    assert p == ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                 "request.\n\n### Instruction:\nQ?\n\n### Response:\n")
    p2 = alpaca_prompt({"instruction": "Q?", "input": "ctx"})
    assert "### Input:\nctx\n\n### Response:\n" in p2 and "paired with an input" in p2


def test_file_task_reads_cls_tsv_and_jsonl(tmp_path):
    tsv = tmp_path / "t.tsv"
    tsv.write_text("sentence1\tsentence2\tlabel\na\tb\t1\nc\td\t0\n")
    jl = tmp_path / "e.jsonl"
    jl.write_text('{"text": "x", "label": 1}\n{"text": "y", "label": 0}\n')
    t = file_task("cls", tsv, jl)
    assert t.load("train")[0] == {"text": "a", "text_pair": "b", "label": 1}
    assert [r["label"] for r in t.load("eval")] == [1, 0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sentence": "x"}\n')
    with pytest.raises(ValueError, match="need 'label'"):
        file_task("cls", bad, None).load("train")
