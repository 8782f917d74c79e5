"""Claims 1, 2, 4 and 5 of docs/reproduction.md, rebuilt from the study records.

    python benchmarks/reproduce_claims.py        # rewrites those sections of docs/reproduction.md and their plots

Claim 1 reads the SST-2 evidence setting (``docs/evidence/minilm-sst2``: LoRA, the orthogonal-only ablation, SDS-LoRA
and its paper-faithful variant at rank 8, and full fine-tuning, each at the learning rate chosen on the validation
split); claim 2 reads ``docs/reproduction/refresh-sst2`` (SDS-LoRA at its chosen 1e-3 with one schedule changed per
variant; the default's and LoRA's runs are the evidence study's own, copied); claim 4 reads
``docs/reproduction/lora-sb-sst2-r{8,32,64}`` (LoRA-SB and LoRA-XS at s = 1) beside LoRA's ranks from the evidence
study; claim 5 reads the evidence study at rank 1 (LoRA, SDS-LoRA, LoRA-GA, full fine-tuning) and
``docs/reproduction/claim5-<optimizer>`` (LoRA trained by that optimizer). Each section lies between
``<!-- claimN:begin -->`` and ``<!-- claimN:end -->`` in the document and is replaced as a whole; rows whose runs are
not recorded yet say so. Nothing is trained here.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from sdslora.experiments.evidence import analyse, load_setting
from sdslora.experiments.stats import gap_closed, paired_interval
from sdslora.methods.sds_schedule import SDSOptions, refresh_steps

ROOT = Path(__file__).resolve().parents[1]

CLAIM1_ROWS = [
    ("lora", 8, "LoRA"),
    ("orthogonal", 8, "orthogonal-only (B, A orthonormal after the warm-up; no capacity kept)"),
    ("sds", 8, "SDS-LoRA (default: ΔW-preserving refresh)"),
    ("sds:faithful", 8, "SDS-LoRA, the paper's exact algorithm (`faithful`)"),
    ("full", None, "full fine-tuning"),
]
CLAIM2_ROWS = [
    ("sds", {}, "decaying schedule, k = 5, warm-up 10 (default)"),
    ("sds:refresh=never", {"refresh": "never"}, "never refresh (bases fixed at the re-parameterisation)"),
    ("sds:refresh=every:1", {"refresh": "every:1"}, "every step"),
    ("sds:refresh=every:5", {"refresh": "every:5"}, "every 5 steps"),
    ("sds:refresh=every:10", {"refresh": "every:10"}, "every 10 steps"),
    ("sds:refresh=every:20", {"refresh": "every:20"}, "every 20 steps"),
    ("sds:refresh_k=3", {"refresh_k": 3}, "decaying schedule, k = 3"),
    ("sds:refresh_k=8", {"refresh_k": 8}, "decaying schedule, k = 8"),
    ("sds:warmup_steps=5", {"warmup_steps": 5}, "warm-up 5 steps (decaying, k = 5)"),
    ("sds:warmup_steps=50", {"warmup_steps": 50}, "warm-up 50 steps (decaying, k = 5)"),
    ("lora", None, "LoRA (reference)"),
]

CLAIM1_CMD = """\
SDSLORA_DATA_DIR=/path/to/glue sdslora compare --model minilm-l6 --task sst2 --train-limit 20000 --seeds 0,1,2 \\
  --steps 300 --batch-size 32 --max-length 64 --eval-every 50 --diagnostics-every 100 --val-max 500 \\
  --eval-batch-size 128 --exclude pooler --evidence docs/evidence/minilm-sst2 --no-progress --ranks 8 \\
  --methods orthogonal,sds:faithful --lr-sweep orthogonal=1e-4,3e-4,1e-3,3e-3 \\
  --lr-sweep sds:faithful=1e-4,3e-4,1e-3,3e-3 -o runs/study-sst2-ablation
python benchmarks/reproduce_claims.py"""

CLAIM2_CMD = """\
COMMON="--model minilm-l6 --task sst2 --train-limit 20000 --seeds 0,1,2 --steps 300 --batch-size 32 --max-length 64 \\
  --eval-every 50 --diagnostics-every 100 --val-max 500 --eval-batch-size 128 --exclude pooler --no-progress \\
  --evidence docs/reproduction/refresh-sst2 --ranks 8 --widen 0 -o runs/refresh-sst2"
for v in refresh=never refresh=every:1 refresh_k=3 refresh_k=8 refresh=every:5 refresh=every:20 refresh=every:10 \\
         warmup_steps=5 warmup_steps=50; do
  SDSLORA_DATA_DIR=/path/to/glue sdslora compare $COMMON --methods "sds:$v" --lr-sweep "sds:$v=1e-3"
done
python benchmarks/reproduce_claims.py"""


def _groups(folder: Path) -> tuple[dict[tuple[str, int | None], dict[str, Any]], dict[str, Any]]:
    setting, runs = load_setting(folder)
    an = analyse(setting, runs)
    return {(g["label"], g["r"]): g for g in an["groups"]}, setting


def _by_seed(g: dict[str, Any]) -> dict[int, float]:
    return dict(zip(g["seeds"], g["values"], strict=True))


def _pm(g: dict[str, Any]) -> str:
    ci = f" ± {g['ci95']:.3f}" if g.get("ci95") is not None else ""
    return f"{g['mean']:.3f}{ci} (n={len(g['values'])})"


def _interval(ref: dict[str, Any] | None, g: dict[str, Any]) -> str:
    if ref is None or ref is g:
        return "–"
    d = paired_interval(_by_seed(ref), _by_seed(g))
    return "–" if d is None else f"[{d[0]:+.3f}, {d[1]:+.3f}]"


def _bars(rows: list[tuple[str, dict[str, Any]]], path: Path, title: str, ref: float | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.4))
    ys = list(range(len(rows)))[::-1]
    for y, (_name, g) in zip(ys, rows, strict=True):
        ax.errorbar(g["mean"], y, xerr=g.get("ci95") or 0.0, fmt="o", capsize=4, color="C0")
        for v in g["values"]:
            ax.plot(v, y, ".", color="0.6", ms=4)
    if ref is not None:
        ax.axvline(ref, color="C3", lw=0.8, ls="--")
    ax.set_yticks(ys, [name for name, _ in rows], fontsize=8)
    ax.set_xlabel("SST-2 eval accuracy (mean ± 95 % CI over seeds; grey: each seed)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def claim1(folder: Path, out_dir: Path) -> list[str]:
    groups, _ = _groups(folder)
    ref = groups.get(("lora", 8))
    lines = [
        "Setting: the SST-2 evidence study at rank 8 (MiniLM-L6, 20,000 training rows of which 500 carved out for "
        "validation, 300 steps × 32, 3 seeds, eval on the 872-row GLUE dev set); every method at the learning rate "
        "chosen on the validation split over its own 4-value grid. Δ vs LoRA: t-interval of the per-seed difference "
        "(the seeds share their data order).",
        "",
        "| method | lr (chosen) | eval accuracy | Δ vs LoRA (paired 95 %) | B: stable rank / κ | cos(G, G̃) |",
        "|---|---|---|---|---|---|",
    ]
    done = []
    for label, r, what in CLAIM1_ROWS:
        g = groups.get((label, r))
        if g is None:
            lines.append(f"| {what} | pending | | | | |")
            continue
        d = g.get("diagnostics_last") or {}
        diag = (f"{d['stable_rank_B']:.1f} / {d['kappa_B']:.1f}" if "stable_rank_B" in d and "kappa_B" in d else "–")
        cos = f"{d['cos_g_geff']:.2f}" if "cos_g_geff" in d else "–"
        lines.append(f"| {what} | {g['lr']:g} | {_pm(g)} | {_interval(ref, g)} | {diag} | {cos} |")
        done.append((what.split(" (")[0], g))
    if done:
        png = _bars(done, out_dir / "ablation-sst2.png", "Ablation (claim 1): MiniLM-L6, SST-2, rank 8",
                    ref["mean"] if ref else None)
        lines += ["", f"![ablation](reproduction/{png.name})"]
    lines += ["", "```bash", CLAIM1_CMD, "```"]
    return lines


def claim2(folder: Path, out_dir: Path) -> list[str]:
    groups, setting = _groups(folder)
    total = int(setting["base"]["steps"])
    default = groups.get(("sds", 8))
    lines = [
        f"Setting: as claim 1 (SST-2, rank 8, {total} steps × 32, 3 seeds), SDS-LoRA at its chosen learning rate 1e-3 "
        "with one part of the schedule changed per row (a one-value grid per variant: the schedule is the variable). "
        "Refreshes: how many basis refreshes the run makes. Δ vs default: t-interval of the per-seed difference.",
        "",
        "| schedule | refreshes in the run | eval accuracy | Δ vs default (paired 95 %) |",
        "|---|---|---|---|",
    ]
    done = []
    for label, opts, what in CLAIM2_ROWS:
        g = groups.get((label, 8))
        n_ref = "–" if opts is None else str(len(refresh_steps(total, SDSOptions(**opts))))
        if g is None:
            lines.append(f"| {what} | {n_ref} | pending | |")
            continue
        lines.append(f"| {what} | {n_ref} | {_pm(g)} | {_interval(default, g) if opts is not None else '–'} |")
        done.append((what.split(" (")[0], g))
    if done:
        png = _bars(done, out_dir / "refresh-sst2.png", "Refresh schedule and warm-up (claim 2): SST-2, rank 8",
                    default["mean"] if default else None)
        lines += ["", f"![refresh schedule](reproduction/{png.name})"]
    lines += ["", "```bash", CLAIM2_CMD, "```"]
    return lines


CLAIM4_RANKS = (8, 32, 64)
CLAIM5_RANK = 4  # the smallest rank with a gap at both of LoRA's best rates and anisotropic LoRA factors
CLAIM5_OPTIMIZERS = [
    ("lora_pro", "LoRA-Pro (the full-gradient approximation as an optimizer)"),
    ("scaled_adamw", "ScaledAdamW (Riemannian preconditioning)"),
    ("altlora", "AltLoRA (alternating projected updates)"),
]

CLAIM4_CMD = """\
C="--model minilm-l6 --task sst2 --train-limit 20000 --seeds 0,1,2 --steps 300 --batch-size 32 --max-length 64 \\
  --eval-every 50 --diagnostics-every 100 --val-max 500 --eval-batch-size 128 --exclude pooler --no-progress \\
  --scaling standard"
sdslora compare $C --alpha 32 --ranks 32 --methods lora_sb,lora_xs --lr-sweep lora_sb=1e-4,3e-4,1e-3,3e-3 \\
  --lr-sweep lora_xs=1e-3,3e-3,1e-2,3e-2 --evidence docs/reproduction/lora-sb-sst2-r32 -o runs/lora-sb-r32
for r in 8 64; do  # LR_SB, LR_XS: the rates chosen at r = 32
  sdslora compare $C --alpha $r --ranks $r --methods lora_sb,lora_xs --widen 0 --lr-sweep lora_sb=$LR_SB \\
    --lr-sweep lora_xs=$LR_XS --evidence docs/reproduction/lora-sb-sst2-r$r -o runs/lora-sb-r$r
done
python benchmarks/reproduce_claims.py"""

CLAIM5_CMD = """\
C="--model minilm-l6 --task sst2 --train-limit 20000 --seeds 0,1,2,3,4 --steps 300 --batch-size 32 --max-length 64 \\
  --eval-every 50 --diagnostics-every 100 --val-max 500 --eval-batch-size 128 --exclude pooler --no-progress --ranks 4"
sdslora compare $C --methods lora_ga --lr-sweep lora_ga=3e-4,1e-3,3e-3,1e-2 --evidence docs/evidence/minilm-sst2 \\
  -o runs/claim5-lora-ga
for opt in lora_pro scaled_adamw altlora; do
  sdslora compare $C --methods lora --optimizer $opt --lr-sweep lora=3e-4,1e-3,3e-3,1e-2 \\
    --evidence docs/reproduction/claim5-$opt -o runs/claim5-$opt
done
python benchmarks/reproduce_claims.py"""


def _groups_if(folder: Path) -> dict[tuple[str, int | None], dict[str, Any]]:
    """The groups of a study folder, or none while the study has not recorded a run."""
    return _groups(folder)[0] if (folder / "setting.json").exists() else {}


def _lr_cell(g: dict[str, Any]) -> str:
    return f"{g['lr']:g}" + ("" if g.get("bracketed", True) else f" (best on the {g['edge']} edge)")


def _closed(lora: dict[str, Any] | None, g: dict[str, Any], full: dict[str, Any] | None) -> str:
    if lora is None or full is None or g is lora:
        return "–"
    gc = gap_closed(lora["values"], g["values"], full["values"])
    if gc["point"] is None:
        return "no gap to close"
    if gc["lo"] is None:
        return f"{gc['point']:+.0%} (no interval)"
    return f"{gc['point']:+.0%} [{gc['lo']:+.0%}, {gc['hi']:+.0%}]"


def claim5(evidence: Path, root: Path, out_dir: Path) -> list[str]:
    r = CLAIM5_RANK
    ev = _groups_if(evidence)
    lora, sds, full = ev.get(("lora", r)), ev.get(("sds", r)), ev.get(("full", None))
    neighbour = _groups_if(evidence.parent / f"{evidence.name}-lr-sensitivity").get(("lora", r))
    rows: list[tuple[str, dict[str, Any] | None]] = [
        ("LoRA (AdamW)", lora),
        ("LoRA (AdamW) at its neighbouring rate", neighbour),
        ("SDS-LoRA", sds),
        ("LoRA-GA (gradient-SVD initialisation)", ev.get(("lora_ga", r))),
    ]
    rows += [(what, _groups_if(root / f"claim5-{opt}").get(("lora", r))) for opt, what in CLAIM5_OPTIMIZERS]
    rows.append(("full fine-tuning", full))
    lines = [
        f"Setting: the SST-2 evidence study at rank {r}, where full fine-tuning beats LoRA at both of LoRA's best "
        "rates and LoRA's factors are already anisotropic (MiniLM-L6, 300 steps × 32, 5 seeds, eval on the 872-row "
        "GLUE dev set); every method at the rate chosen on the validation split over its own grid (LoRA also at "
        "the neighbouring rate, which the validation loss prefers). Gap closed: (method − LoRA) / (full − LoRA) "
        "against LoRA at its chosen rate, with a 95 % bootstrap interval; Δ: t-interval of the per-seed difference "
        "(the seeds share their data order).",
        "",
        "| method | lr (chosen) | eval accuracy | gap closed | Δ vs LoRA (paired 95 %) | Δ vs SDS-LoRA (paired 95 %) |",
        "|---|---|---|---|---|---|",
    ]
    done = []
    for what, g in rows:
        if g is None:
            lines.append(f"| {what} | pending | | | | |")
            continue
        closed = "–" if g is full else _closed(lora, g, full)
        lr = f"{g['lr']:g} (set, not swept)" if g is neighbour else _lr_cell(g)
        lines.append(f"| {what} | {lr} | {_pm(g)} | {closed} | {_interval(lora, g)} | {_interval(sds, g)} |")
        done.append((what.split(" (")[0], g))
    if len(done) > 1:
        png = _bars(done, out_dir / f"claim5-sst2-r{r}.png",
                    f"Gradient-approximation methods (claim 5): SST-2, rank {r}", lora["mean"] if lora else None)
        lines += ["", f"![claim 5](reproduction/{png.name})"]
    lines += ["", "```bash", CLAIM5_CMD, "```"]
    return lines


def _params_plot(series: dict[str, list[tuple[int, dict[str, Any]]]], full: dict[str, Any] | None,
                 path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (name, pts) in enumerate(series.items()):
        pts = sorted(pts, key=lambda p: p[1]["trainable_parameters"])
        xs = [g["trainable_parameters"] for _, g in pts]
        ax.errorbar(xs, [g["mean"] for _, g in pts], yerr=[g.get("ci95") or 0.0 for _, g in pts], fmt="o-",
                    capsize=3, color=f"C{i}", label=name)
        for r, g in pts:
            ax.annotate(f"r={r}", (g["trainable_parameters"], g["mean"]), textcoords="offset points",
                        xytext=(4, -10), fontsize=7, color=f"C{i}")
    if full is not None:
        ax.axhline(full["mean"], color="0.3", ls="--", lw=0.8, label="full fine-tuning")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale; the classifier head included)")
    ax.set_ylabel("SST-2 eval accuracy (mean ± 95 % CI)")
    ax.set_title("LoRA-SB, LoRA-XS and LoRA by trainable parameters (claim 4)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def claim4(evidence: Path, root: Path, out_dir: Path) -> list[str]:
    ev = _groups_if(evidence)
    lines = [
        "Setting: the SST-2 evidence study's data, steps and seeds (3), LoRA-SB and LoRA-XS at the authors' s = 1 "
        "(`--scaling standard --alpha r`), each with its own grid at r = 32 and that rate reused at r = 8 and 64 "
        "(no re-tuning: the claim is that LoRA-SB needs none). Δ: t-interval of the per-seed difference LoRA-SB − "
        "LoRA-XS. LoRA (rsLoRA scaling, its own grid) from the evidence study for the parameter comparison.",
        "",
        "| rank | method | lr | eval accuracy | trainable parameters | LoRA-SB − LoRA-XS (paired 95 %) |",
        "|---|---|---|---|---|---|",
    ]
    series: dict[str, list[tuple[int, dict[str, Any]]]] = {"LoRA-SB": [], "LoRA-XS": []}
    for r in CLAIM4_RANKS:
        gs = _groups_if(root / f"lora-sb-sst2-r{r}")
        sb, xs = gs.get(("lora_sb", r)), gs.get(("lora_xs", r))
        for name, g in (("LoRA-SB", sb), ("LoRA-XS", xs)):
            if g is None:
                lines.append(f"| {r} | {name} | pending | | | |")
                continue
            diff = _interval(xs, g) if name == "LoRA-SB" and xs is not None else "–"
            lines.append(f"| {r} | {name} | {_lr_cell(g)} | {_pm(g)} | {g['trainable_parameters']:,} | {diff} |")
            series[name].append((r, g))
    series["LoRA"] = sorted(((g["r"], g) for (label, r), g in ev.items() if label == "lora" and r is not None),
                            key=lambda p: p[0])
    for r, g in series["LoRA"]:
        lines.append(f"| {r} | LoRA (evidence study) | {_lr_cell(g)} | {_pm(g)} | {g['trainable_parameters']:,} | – |")
    series = {k: v for k, v in series.items() if v}
    if "LoRA-SB" in series:
        png = _params_plot(series, ev.get(("full", None)), out_dir / "claim4-params-sst2.png")
        lines += ["", f"![claim 4](reproduction/{png.name})"]
    lines += ["", "```bash", CLAIM4_CMD, "```"]
    return lines


def replace_section(text: str, key: str, body: list[str]) -> str:
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    block = "\n".join([begin, *body, end])
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"the document has no {begin} ... {end} section to rebuild")
    return pattern.sub(lambda _: block, text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--doc", default=str(ROOT / "docs" / "reproduction.md"))
    p.add_argument("--ablation", default=str(ROOT / "docs" / "evidence" / "minilm-sst2"))
    p.add_argument("--refresh", default=str(ROOT / "docs" / "reproduction" / "refresh-sst2"))
    args = p.parse_args(argv)
    doc = Path(args.doc)
    out_dir = doc.parent / "reproduction"
    text = doc.read_text()
    text = replace_section(text, "claim1", claim1(Path(args.ablation), out_dir))
    text = replace_section(text, "claim2", claim2(Path(args.refresh), out_dir))
    text = replace_section(text, "claim4", claim4(Path(args.ablation), Path(args.refresh).parent, out_dir))
    text = replace_section(text, "claim5", claim5(Path(args.ablation), Path(args.refresh).parent, out_dir))
    doc.write_text(text)
    print(f"{doc}: claims 1, 2, 4 and 5 rebuilt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
