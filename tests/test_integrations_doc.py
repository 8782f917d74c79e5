"""docs/integrations.md runs as written: every ```python block, in order, in one namespace, with ``MODEL`` set to a
tiny Llama saved with its tokenizer (the examples name a hub model)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from harness_fixtures import tiny_tokenizer
from models import tiny_llama

pytest.importorskip("trl")
pytest.importorskip("lm_eval")
pytest.importorskip("tensorboard")

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_every_example_block_runs(tmp_path, monkeypatch):
    folder = tmp_path / "tiny-llama"
    tok = tiny_tokenizer(folder, causal=True)
    model = tiny_llama()
    model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id
    model.config.eos_token_id = model.config.bos_token_id = tok.eos_token_id
    model.save_pretrained(str(folder))
    monkeypatch.chdir(tmp_path)
    blocks = _blocks()
    assert len(blocks) >= 6
    assert 'MODEL = "HuggingFaceTB/SmolLM2-135M"' in blocks[0]
    ns: dict = {}
    for i, code in enumerate(blocks):
        code = code.replace('MODEL = "HuggingFaceTB/SmolLM2-135M"', f"MODEL = {str(folder)!r}")
        try:
            exec(compile(code, f"{DOC.name}[block {i}]", "exec"), ns)
        except Exception as e:  # name the block that broke
            raise AssertionError(f"docs/integrations.md python block {i} failed: {type(e).__name__}: {e}") from e
    assert (tmp_path / "out/sft/peft/adapter_config.json").is_file()
    assert list((tmp_path / "out/ckpt").glob("checkpoint-*/sdslora_adapter/adapter_model.safetensors"))
    assert list(tmp_path.rglob("events.out.tfevents*"))
    assert 0.0 <= ns["results"]["results"]["my_task"]["acc,none"] <= 1.0
