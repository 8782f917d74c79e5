"""Memory of LoRA / SDS-LoRA on quantised bases (QLoRA) against the full-precision base, on CPU.

    python benchmarks/quantised.py                    # SmolLM2-135M (sdslora.experiments.models), batch 2 x 128
    python benchmarks/quantised.py --model tiny       # a small Llama built from a config (no files needed)

Each configuration runs in its own process (peak RSS is per process): load the base (full precision, or a
pre-quantised checkpoint written once beforehand by transformers' ``quantization_config`` + ``save_pretrained``:
bitsandbytes nf4 with double quantisation and float32 compute, bitsandbytes 8-bit, torchao int8 weight-only; as one
loads a pre-quantised hub checkpoint, so that the fp32 weights a quantise-on-load would read first do not inflate
the process's memory), attach the adapter (r = 8, all linear layers, float32 adapter tensors; SDS-LoRA is
re-parameterised first, so its decoupled forward and Q buffers are measured), then run forward + backward steps on
one batch. Printed per configuration:

* base MB: bytes of the model's parameters and buffers outside the adapter, quantised weights counted as stored
  (packed data + scales: ``sdslora.methods.quantised.storage_bytes``); the tied / unquantised embedding included;
* adapter MB: the adapter's parameters and buffers (factors, SDS-LoRA's Q buffers);
* RSS before / after load MB: the process's resident memory after importing the libraries (the quantisation
  backend included), and after loading and attaching (memory the loader freed but the allocator kept included);
* peak MB: the resident-memory high-water mark during the forward/backward steps (``VmHWM`` after resetting it
  through ``/proc/self/clear_refs``: the loading peak, when transformers holds fp32 weights before quantising them,
  is excluded);
* step s: the time of the last forward + backward (indicative only on a shared machine).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

CONFIGS = ["fp32-lora", "fp32-sds", "nf4-lora", "nf4-sds", "int8-sds", "torchao-int8-sds"]


def _status(field: str) -> float:
    """A ``/proc/self/status`` memory field in MB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _folder(model: str, tmp: Path) -> Path:
    if model != "tiny":
        from sdslora.experiments.models import resolve_model

        return resolve_model(model)
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp / "tiny-llama-512"
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                          num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                          tie_word_embeddings=False)
        LlamaForCausalLM(cfg).save_pretrained(str(path))
    return path


def _quant_config(kind: str):
    if kind == "nf4":
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.float32)
    if kind == "int8":
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_8bit=True)
    if kind == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return TorchAoConfig(quant_type=Int8WeightOnlyConfig())
    return None


def quantise(kind: str, folder: Path, out: Path) -> None:
    """Quantise the model in ``folder`` on load and save the quantised checkpoint to ``out``."""
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, device_map="cpu",
                                                     quantization_config=_quant_config(kind))
        model.save_pretrained(str(out))


def run_one(name: str, folder: Path, batch: int, seq: int, steps: int) -> dict:
    from transformers import AutoModelForCausalLM

    import sdslora
    from sdslora.methods.quantised import storage_bytes

    kind, method = name.rsplit("-", 1)
    _quant_config(kind)  # imports the backend: counted in the RSS before loading
    _trim()
    rss0 = _status("VmRSS")
    kw = {"device_map": "cpu"} if kind != "fp32" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kw)
    opts = {"warmup_steps": 1} if method == "sds" else {}
    model = sdslora.attach(base, sdslora.AdapterConfig(method=method, r=8, alpha=8.0, options=opts))
    if method == "sds":  # the decoupled phase (Q buffers, rank-2r forward), factors unchanged (lr 0)
        sdslora.Controller(model, torch.optim.SGD(model.trainable_parameters(), lr=0.0), total_steps=10).step(t=1)
    adapter_ids = {id(t) for layer in model.adapter_layers().values() for t in layer.adapter_tensors().values()}
    seen: set[int] = set()
    base_bytes = adapter_bytes = 0
    for t in [*model.model.parameters(), *model.model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        if id(t) in adapter_ids:
            adapter_bytes += t.numel() * t.element_size()
        else:
            base_bytes += storage_bytes(t)
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=g)
    _trim()
    rss = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    step_s = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            step_s = time.perf_counter() - t0
            model.zero_grad(set_to_none=True)
    return {"config": name, "base_mb": base_bytes / 2**20, "adapter_mb": adapter_bytes / 2**20, "rss0_mb": rss0,
            "rss_mb": rss,
            "peak_mb": _status("VmHWM"), "step_s": step_s, "loss": float(loss)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m, tiny, or a local model folder")
    ap.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--tmp", default="/tmp/sdslora-bench-quantised")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--quantise", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    folder = _folder(args.model, tmp)
    label = Path(str(args.model)).name
    if args.quantise:
        quantise(args.quantise, folder, tmp / f"{label}-{args.quantise}")
        return 0
    if args.one:
        kind = args.one.rsplit("-", 1)[0]
        src = folder if kind == "fp32" else tmp / f"{label}-{kind}"
        print(json.dumps(run_one(args.one, src, args.batch, args.seq, args.steps)))
        return 0
    common = [sys.executable, __file__, "--model", str(args.model), "--tmp", str(tmp)]
    for kind in sorted({n.rsplit("-", 1)[0] for n in args.configs} - {"fp32"}):
        if not (tmp / f"{label}-{kind}" / "config.json").is_file():  # quantise once, in a process of its own
            subprocess.run([*common, "--quantise", kind], check=True, capture_output=True)
    rows = []
    for name in args.configs:
        cmd = [*common, "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--one", name]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"model {args.model}, batch {args.batch} x {args.seq} tokens, r = 8 on all linear layers, "
          f"torch {torch.__version__}, CPU")
    print("| config | base MB | adapter MB | RSS before load MB | RSS after load MB | peak RSS fwd+bwd MB | step s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['base_mb']:.1f} | {r['adapter_mb']:.2f} | {r['rss0_mb']:.0f} | {r['rss_mb']:.0f} | "
              f"{r['peak_mb']:.0f} | {r['step_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
