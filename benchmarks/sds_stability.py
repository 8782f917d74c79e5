"""SDS-LoRA stability benchmark (issue 7): the paper-faithful algorithm against the robustness options.

For each model (MiniLM-L6 on MRPC, SmolLM2-135M on the LLM-Adapters math training file), seed and variant, one
plain AdamW training loop (same batches for every variant of a seed) records: the relative ΔW jump of every basis
refresh (the Controller's ``refresh`` events: per-refresh mean and max over layers), the train loss per step, the eval
loss at the end, and gradient diagnostics (``sdslora.diagnostics.diagnose``: cos(G, G̃), cos(G̃, G*)) at fixed steps.
With ``--lr-sweep`` it also trains LoRA and SDS-LoRA over a learning-rate grid (learning-rate transfer rule).

    python benchmarks/sds_stability.py --quick                 # MiniLM, 1 seed, 40 steps, batch 8x64
    python benchmarks/sds_stability.py --models minilm smollm2 --seeds 0 1 2 --steps 100 --lr-sweep   # full

Writes ``docs/sds_stability_results.json`` (every number) and ``docs/sds_stability_*.png``; the summary table is
printed (docs/sds_stability.md quotes it).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import sdslora
from sdslora.diagnostics import diagnose

ROOT = Path(__file__).resolve().parents[1]
DATA = Path("/work/shared/data")

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("lora", {}),
    "faithful": ("sds", {"faithful": True}),
    "procrustes": ("sds", {"refresh_align": "procrustes"}),
    "preserve": ("sds", {"refresh_align": "preserve"}),
    "carry": ("sds", {"reparam_state": "carry"}),
    "rewarm5": ("sds", {"reparam_state": "rewarm:5"}),
    "procrustes+carry": ("sds", {"refresh_align": "procrustes", "reparam_state": "carry"}),
    "procrustes+rewarm5": ("sds", {"refresh_align": "procrustes", "reparam_state": "rewarm:5"}),
    "preserve+carry": ("sds", {"refresh_align": "preserve", "reparam_state": "carry"}),
}


# ---- data and models --------------------------------------------------------------------------------------------
def mrpc_rows(split: str) -> list[dict[str, Any]]:
    with open(DATA / "mrpc" / f"{split}.tsv", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [{"a": r["#1 String"], "b": r["#2 String"], "label": int(r["Quality"])} for r in rows]


def math_rows() -> list[dict[str, Any]]:
    rows = json.loads((DATA / "math" / "math_data.json").read_text())
    head = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    return [
        {
            "prompt": f"{head}\n\n### Instruction:\n{r['instruction']}\n\n### Response:\n",
            "target": r["output"],
        }
        for r in rows
    ]


class Setup:
    """A model family: builds a fresh base model and encodes batches."""

    def __init__(self, name: str, batch: int, seq: int):
        self.name, self.batch, self.seq = name, batch, seq
        from sdslora.experiments.models import load_model

        kind = "classification" if name == "minilm" else "generation"
        spec = "minilm-l6" if name == "minilm" else "smollm2-135m"
        self._load = lambda: load_model(spec, kind, num_labels=2)[0]
        _m, self.tok, _ = load_model(spec, kind, num_labels=2)
        if name == "minilm":
            self.train, self.eval = mrpc_rows("train"), mrpc_rows("dev")[:128]
            self.targets = ["query", "key", "value", "dense"]
            self.save = ["classifier"]
        else:
            rows = math_rows()
            g = torch.Generator().manual_seed(1234)
            order = torch.randperm(len(rows), generator=g).tolist()
            self.eval = [rows[i] for i in order[:64]]
            self.train = [rows[i] for i in order[64:]]
            self.targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            self.save = []

    def model(self) -> torch.nn.Module:
        return self._load()

    def encode(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.name == "minilm":
            enc = self.tok(
                [r["a"] for r in rows],
                [r["b"] for r in rows],
                truncation=True,
                max_length=self.seq,
                padding=True,
                return_tensors="pt",
            )
            enc["labels"] = torch.tensor([r["label"] for r in rows])
            return dict(enc)
        ids, labels = [], []
        for r in rows:
            p = self.tok(r["prompt"], add_special_tokens=False)["input_ids"]
            t = self.tok(r["target"], add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            x = (p + t)[: self.seq]
            ids.append(x)
            labels.append(([-100] * len(p) + t)[: self.seq])
        width = max(len(x) for x in ids)
        pad = self.tok.pad_token_id
        return {
            "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            "labels": torch.tensor([y + [-100] * (width - len(y)) for y in labels]),
        }

    def batches(self, seed: int, steps: int) -> list[dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.train), generator=g).tolist()
        need = steps * self.batch
        order = (order * (need // len(order) + 1))[:need]
        return [
            self.encode([self.train[i] for i in order[k * self.batch : (k + 1) * self.batch]])
            for k in range(steps)
        ]


# ---- one run ----------------------------------------------------------------------------------------------------
def run_one(
    setup: Setup,
    variant: str,
    seed: int,
    steps: int,
    lr: float,
    batches: list[dict[str, torch.Tensor]],
    schedule: str,
    rank: int,
    diag_steps: tuple[int, ...],
    diagnostics: bool = True,
    lr_scale: float = 1.0,
) -> dict[str, Any]:
    method, options = VARIANTS[variant]
    if lr_scale != 1.0 and method == "sds":
        options = {**options, "lr_scale": lr_scale}
    torch.manual_seed(seed)
    base = setup.model()
    cfg = sdslora.AdapterConfig(
        method=method,
        r=rank,
        alpha=4.0,
        target_modules=setup.targets,
        modules_to_save=setup.save,
        dropout=0.0,
        options=dict(options),
    )
    model = sdslora.attach(base, cfg)
    model.train()
    opt = torch.optim.AdamW(model.trainable_param_groups(), lr=lr, weight_decay=0.0)  # lr_scale: adapter only
    if schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    ctl = sdslora.Controller(model, opt, total_steps=steps)
    probe = batches[0]
    losses, diags, t0 = [], {}, time.time()
    for t in range(1, steps + 1):
        loss = model(**batches[t - 1]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ctl.step()
        sched.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            break
        if diagnostics and t in diag_steps:
            d = diagnose(model, probe, optimizer=opt)
            diags[t] = {k: d.summary.get(k) for k in ("cos_g_geff", "cos_geff_gstar", "cos_g_geff_opt")}
    model.eval()
    with torch.no_grad():
        ev = [
            float(model(**setup.encode(setup.eval[i : i + setup.batch])).loss)
            for i in range(0, len(setup.eval), setup.batch)
        ]
    refresh = [e for e in ctl.events if e["event"] == "refresh" and "jump_mean" in e]
    return {
        "variant": variant,
        "seed": seed,
        "lr": lr,
        "lr_scale": lr_scale if method == "sds" else 1.0,
        "losses": losses,
        "eval_loss": statistics.fmean(ev),
        "refresh": [
            {k: e.get(k) for k in ("step", "jump_mean", "jump_max", "sim_A_mean", "sim_B_mean")}
            for e in refresh
        ],
        "diag": diags,
        "seconds": time.time() - t0,
    }


# ---- summaries ----------------------------------------------------------------------------------------------------
def summarise(runs: list[dict[str, Any]], window: tuple[int, int] = (11, 30)) -> dict[str, dict[str, Any]]:
    lora = {r["seed"]: r for r in runs if r["variant"] == "lora"}
    out: dict[str, dict[str, Any]] = {}
    lo, hi = window
    for variant in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == variant]
        row: dict[str, Any] = {"seeds": len(rs)}
        jumps_max = [e["jump_max"] for r in rs for e in r["refresh"]]
        jumps_mean = [e["jump_mean"] for r in rs for e in r["refresh"]]
        if jumps_max:
            row["jump_max"] = max(jumps_max)
            row["jump_median"] = statistics.median(jumps_mean)
            row["first_jumps"] = [round(e["jump_mean"], 3) for e in rs[0]["refresh"][:5]]
        ex = [
            statistics.fmean(
                a - b
                for a, b in zip(
                    r["losses"][lo - 1 : hi], lora[r["seed"]]["losses"][lo - 1 : hi], strict=False
                )
            )
            for r in rs
            if r["seed"] in lora
        ]
        row["excess_11_30"] = statistics.fmean(ex) if ex else None
        row["excess_11_30_sd"] = statistics.stdev(ex) if len(ex) > 1 else None
        row["final_train"] = statistics.fmean(statistics.fmean(r["losses"][-10:]) for r in rs)
        row["eval_loss"] = statistics.fmean(r["eval_loss"] for r in rs)
        for key in ("cos_g_geff", "cos_geff_gstar", "cos_g_geff_opt"):
            vals = [d[key] for r in rs for d in r["diag"].values() if d.get(key) is not None]
            row[key] = statistics.fmean(vals) if vals else None
        out[variant] = row
    return out


def noise_of_lora(runs: list[dict[str, Any]], steps: int) -> float | None:
    """Seed noise of a 20-step mean train loss: the sd over seeds of LoRA's mean loss in steps 11-30."""
    xs = [statistics.fmean(r["losses"][10:30]) for r in runs if r["variant"] == "lora"]
    return statistics.stdev(xs) if len(xs) > 1 else None


def table(summary: dict[str, dict[str, Any]]) -> str:
    cols = [
        "variant",
        "jump_max",
        "jump_median",
        "excess_11_30",
        "final_train",
        "eval_loss",
        "cos_g_geff",
        "cos_geff_gstar",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for v, row in summary.items():
        cells = [v] + [("" if row.get(c) is None else f"{row[c]:.4f}") for c in cols[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(model_name: str, runs: list[dict[str, Any]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    seed0 = min(r["seed"] for r in runs)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    lora = {r["seed"]: r for r in runs if r["variant"] == "lora"}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == variant]
        n = min(len(r["losses"]) for r in rs)
        mean = [statistics.fmean(r["losses"][i] for r in rs) for i in range(n)]
        k = 5
        smooth = [statistics.fmean(mean[max(0, i - k + 1) : i + 1]) for i in range(n)]
        axes[0].plot(range(1, n + 1), smooth, label=variant, lw=1.2)
        if variant != "lora" and rs[0]["seed"] in lora:
            diff = [
                statistics.fmean(r["losses"][i] - lora[r["seed"]]["losses"][i] for r in rs) for i in range(n)
            ]
            sm = [statistics.fmean(diff[max(0, i - k + 1) : i + 1]) for i in range(n)]
            axes[1].plot(range(1, n + 1), sm, label=variant, lw=1.2)
    axes[0].set(title=f"{model_name}: train loss (5-step running mean, mean over seeds)", xlabel="step")
    axes[1].axhline(0, color="k", lw=0.6)
    axes[1].axvline(10, color="gray", ls=":", lw=0.8)
    axes[1].set(title="train loss minus LoRA's (same batches)", xlabel="step")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    p = out / f"sds_stability_{model_name}_loss.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(p.name)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in runs:
        if r["seed"] != seed0 or not r["refresh"]:
            continue
        ax.semilogy(
            [e["step"] for e in r["refresh"]],
            [max(e["jump_max"], 1e-8) for e in r["refresh"]],
            marker=".",
            label=r["variant"],
            lw=1,
        )
    ax.axhline(0.10, color="r", ls=":", lw=0.8)
    ax.axhline(0.02, color="g", ls=":", lw=0.8)
    ax.set(title=f"{model_name}: max relative ΔW jump per refresh (seed {seed0})", xlabel="step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = out / f"sds_stability_{model_name}_jumps.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(p.name)
    return files


# ---- learning-rate transfer rule -------------------------------------------------------------------------------
def best_lr(points: dict[float, float]) -> tuple[float, float, bool]:
    """(grid argmin, interpolated optimum, interior?) of a loss-vs-learning-rate curve.

    The optimum is the vertex of the parabola through the grid minimum and its two neighbours in log(lr) (clamped to
    that bracket); at an edge of the grid the grid point is returned and ``interior`` is False.
    """
    lrs = sorted(points)
    i = min(range(len(lrs)), key=lambda k: points[lrs[k]])
    if i == 0 or i == len(lrs) - 1:
        return lrs[i], lrs[i], False
    x = [math.log(lrs[k]) for k in (i - 1, i, i + 1)]
    y = [points[lrs[k]] for k in (i - 1, i, i + 1)]
    den = (x[0] - x[1]) * (x[0] - x[2]) * (x[1] - x[2])
    a = (x[2] * (y[1] - y[0]) + x[1] * (y[0] - y[2]) + x[0] * (y[2] - y[1])) / den
    b = (x[2] ** 2 * (y[0] - y[1]) + x[1] ** 2 * (y[2] - y[0]) + x[0] ** 2 * (y[1] - y[2])) / den
    vertex = -b / (2 * a) if a > 0 else x[1]
    return lrs[i], math.exp(min(max(vertex, x[0]), x[2])), True


def lr_rule(sweep: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (rank, variant): the best learning rate by final train loss and by eval loss (means over seeds), and its
    ratio to LoRA's at the same rank."""
    rows = []
    for rank in sorted({e["rank"] for e in sweep}):
        best: dict[str, dict[str, Any]] = {}
        for v in dict.fromkeys(e["variant"] for e in sweep if e["rank"] == rank):
            es = [e for e in sweep if e["rank"] == rank and e["variant"] == v]
            row: dict[str, Any] = {"rank": rank, "variant": v, "seeds": len({e["seed"] for e in es})}
            for metric in ("final_train", "eval_loss"):
                pts: dict[float, float] = {}
                for lr in sorted({e["lr"] for e in es}):
                    vals = [e[metric] for e in es if e["lr"] == lr]
                    pts[lr] = statistics.fmean(vals) if all(math.isfinite(x) for x in vals) else math.inf
                grid, fit, interior = best_lr(pts)
                row[metric] = {
                    "grid_best": grid,
                    "fit_best": fit,
                    "interior": interior,
                    "best_value": pts[grid],
                    "curve": {str(k): val for k, val in pts.items()},
                }
            best[v] = row
            rows.append(row)
        if "lora" in best:
            for row in best.values():
                for metric in ("final_train", "eval_loss"):
                    row[metric]["ratio_to_lora"] = row[metric]["fit_best"] / best["lora"][metric]["fit_best"]
    return rows


def lr_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| rank | variant | seeds | best lr (train) | ratio to LoRA (train) | best lr (eval) | ratio to LoRA (eval) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = []
        for metric in ("final_train", "eval_loss"):
            m = r[metric]
            edge = "" if m["interior"] else " (edge)"
            cells += [f"{m['fit_best']:.2e}{edge}", f"{m.get('ratio_to_lora', float('nan')):.2f}"]
        lines.append(f"| {r['rank']} | {r['variant']} | {r['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sweep(model_name: str, sweep: list[dict[str, Any]], out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = sorted({e["rank"] for e in sweep})
    fig, axes = plt.subplots(2, len(ranks), figsize=(3.6 * len(ranks), 6.4), squeeze=False)
    for j, rank in enumerate(ranks):
        for i, metric in enumerate(("final_train", "eval_loss")):
            ax = axes[i][j]
            for v in dict.fromkeys(e["variant"] for e in sweep):
                es = [e for e in sweep if e["rank"] == rank and e["variant"] == v]
                lrs = sorted({e["lr"] for e in es})
                ys = [statistics.fmean(e[metric] for e in es if e["lr"] == lr) for lr in lrs]
                ax.semilogx(lrs, ys, marker=".", label=v)
            grid = sorted({e["lr"] for e in sweep})
            ax.set_xticks(grid, [f"{x:.3g}" for x in grid], rotation=45, fontsize=7)
            ax.minorticks_off()
            ax.set(title=f"r={rank}: {metric.replace('_', ' ')}", xlabel="learning rate")
            ax.legend(fontsize=7)
    fig.suptitle(f"{model_name}: loss vs learning rate (mean over seeds)")
    fig.tight_layout()
    p = out / f"sds_stability_{model_name}_sweep.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p.name


def merge(files: list[str], out: Path, tag: str) -> int:
    """Summary, table and plots of the runs of several results files (per model)."""
    merged: dict[str, Any] = {"merged_from": files, "models": {}}
    for f in files:
        res = json.loads(Path(f).read_text())
        merged.setdefault("commands", []).append(res.get("command"))
        merged["date"], merged["machine"] = res.get("date"), res.get("machine")
        for name, entry in res["models"].items():
            m = merged["models"].setdefault(
                name, {k: entry.get(k) for k in ("batch", "seq", "rank")} | {"runs": []}
            )
            seen = {(r["variant"], r["seed"], r["lr"], r.get("lr_scale", 1.0)) for r in m["runs"]}
            for r in entry["runs"]:  # a run repeated in several files (same variant, seed, lr) counts once
                key = (r["variant"], r["seed"], r["lr"], r.get("lr_scale", 1.0))
                if key in seen:
                    print(f"merge: {name} {key} repeated in {f}: kept the first")
                    continue
                seen.add(key)
                m["runs"].append(r)
            if entry.get("lr_sweep"):
                m.setdefault("lr_sweep", []).extend(entry["lr_sweep"])
    for name, m in merged["models"].items():
        print(f"## {name}")
        m["plots"] = []
        if m["runs"]:
            m["summary"] = summarise(m["runs"])
            m["lora_seed_sd_11_30"] = noise_of_lora(m["runs"], 0)
            m["plots"] = plot(name + tag, m["runs"], out)
            print(table(m["summary"]))
        if m.get("lr_sweep"):
            m["lr_rule"] = lr_rule(m["lr_sweep"])
            m["plots"].append(plot_sweep(name + tag, m["lr_sweep"], out))
            print(lr_table(m["lr_rule"]))
    (out / f"sds_stability_results{tag}.json").write_text(json.dumps(merged, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="MiniLM, seed 0, 40 steps, batch 8x64, diagnostics at step 40"
    )
    ap.add_argument("--models", nargs="+", default=["minilm"], choices=["minilm", "smollm2"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr-lora", type=float, default=1e-3)
    ap.add_argument("--lr-sds", type=float, default=5e-4)
    ap.add_argument(
        "--lr-scale",
        type=float,
        default=1.0,
        help="SDS variants: lr_scale option (adapter lr multiplier after the warm-up)",
    )
    ap.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument(
        "--lr-sweep",
        nargs="*",
        type=float,
        default=None,
        help="also sweep these learning rates for lora, faithful and the variants in --sweep-variants",
    )
    ap.add_argument("--sweep-variants", nargs="+", default=["lora", "faithful"], choices=list(VARIANTS))
    ap.add_argument("--sweep-ranks", nargs="+", type=int, default=None)
    ap.add_argument(
        "--sweep-seeds", nargs="+", type=int, default=None, help="seeds of the sweep (default: first seed)"
    )
    ap.add_argument(
        "--sweep-only", action="store_true", help="skip the per-variant runs, only the learning-rate sweep"
    )
    ap.add_argument(
        "--diag-steps", nargs="*", type=int, default=None, help="steps with diagnostics (default 20, T)"
    )
    ap.add_argument("--out", default=str(ROOT / "docs"))
    ap.add_argument("--tag", default="", help="suffix of the results file and plots")
    ap.add_argument(
        "--merge",
        nargs="+",
        default=None,
        help="only re-summarise: merge the runs of these results files (e.g. seed 0 and seeds 1-2)",
    )
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out), args.tag)
    if args.quick:
        args.models, args.seeds, args.steps = ["minilm"], [0], 40
        args.batch, args.seq, args.diag_steps = args.batch or 8, args.seq or 64, args.diag_steps or [40]
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/sds_stability.py", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        "args": vars(args),
        "models": {},
    }
    path = out / f"sds_stability_results{args.tag}.json"
    for name in args.models:
        batch = args.batch or (16 if name == "minilm" else 4)
        seq = args.seq or (96 if name == "minilm" else 128)
        setup = Setup(name, batch, seq)
        diag_steps = tuple(args.diag_steps or (20, args.steps))
        runs: list[dict[str, Any]] = []
        entry: dict[str, Any] = {"batch": batch, "seq": seq, "rank": args.rank, "runs": runs}
        result["models"][name] = entry
        for seed in [] if args.sweep_only else args.seeds:
            batches = setup.batches(seed, args.steps)
            for v in args.variants:
                lr = args.lr_lora if VARIANTS[v][0] == "lora" else args.lr_sds
                r = run_one(
                    setup,
                    v,
                    seed,
                    args.steps,
                    lr,
                    batches,
                    args.schedule,
                    args.rank,
                    diag_steps,
                    lr_scale=args.lr_scale,
                )
                runs.append(r)
                entry["partial"] = True
                path.write_text(json.dumps(result, indent=1))
                print(
                    f"[{name}] seed {seed} {v:20s} lr {lr:g}: final {statistics.fmean(r['losses'][-10:]):.4f} "
                    f"eval {r['eval_loss']:.4f} ({r['seconds']:.0f}s)",
                    flush=True,
                )
        if runs:
            summary = summarise(runs)
            entry |= {"summary": summary, "lora_seed_sd_11_30": noise_of_lora(runs, args.steps)}
            entry.pop("partial", None)
            path.write_text(json.dumps(result, indent=1))
            print(table(summary))
            entry["plots"] = plot(name + args.tag, runs, out)
        if args.lr_sweep:
            sweep: list[dict[str, Any]] = []
            entry["lr_sweep"] = sweep
            for seed in args.sweep_seeds or args.seeds[:1]:
                batches = setup.batches(seed, args.steps)
                for rank in args.sweep_ranks or [args.rank]:
                    for v in args.sweep_variants:
                        for lr in args.lr_sweep:
                            r = run_one(
                                setup,
                                v,
                                seed,
                                args.steps,
                                lr,
                                batches,
                                args.schedule,
                                rank,
                                (),
                                diagnostics=False,
                                lr_scale=args.lr_scale,
                            )
                            final = statistics.fmean(r["losses"][-10:])
                            sweep.append(
                                {
                                    "variant": v,
                                    "rank": rank,
                                    "seed": seed,
                                    "lr": lr,
                                    "lr_scale": r["lr_scale"],
                                    "final_train": final,
                                    "eval_loss": r["eval_loss"],
                                    "losses": r["losses"],
                                    "max_loss_after_20": max(r["losses"][20:], default=None),
                                }
                            )
                            path.write_text(json.dumps(result, indent=1))
                            print(
                                f"[{name}] sweep seed {seed} r={rank} {v:12s} lr {lr:g}: final {final:.4f} eval "
                                f"{r['eval_loss']:.4f} ({r['seconds']:.0f}s)",
                                flush=True,
                            )
            entry["lr_rule"] = lr_rule(sweep)
            print(lr_table(entry["lr_rule"]))
            entry.setdefault("plots", []).append(plot_sweep(name + args.tag, sweep, out))
        path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
