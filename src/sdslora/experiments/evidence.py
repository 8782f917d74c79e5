"""The evidence report: rebuilt from the per-run summaries that ``sdslora compare --evidence DIR`` records.

    sdslora evidence docs/evidence -o docs/evidence.md

``<root>/findings.md`` (optional, written by hand) is placed after the headline table: the reading of the numbers.
``docs/evidence/<setting>/setting.json`` describes a study (model, task, data sizes, steps, grids, seeds, majority
or chance rate); ``docs/evidence/<setting>/runs/*.json`` holds one finished run each. For every setting this module
re-derives what the study runner decided (per method and rank, the learning rate whose first-seed run scored best
on the validation split: :func:`~sdslora.experiments.lr_sweep.select_lr`), gathers the seeds trained at that rate,
and reports the evaluation metrics as mean ± 95 % t-interval over seeds, the share of the LoRA -> full fine-tuning
gap each other method closes (bootstrap interval; only where full − LoRA exceeds its own interval), the validation
learning curves and an accuracy-vs-rank plot. A partial study (some runs missing) is reported as far as it goes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .evidence_analysis import (  # noqa: F401  (NAMES, mean_curve, ...: importable from here)
    DIAG,
    DIAG_TITLES,
    NAMES,
    _by_seed,
    _name,
    _val_score,
    analyse,
    load_setting,
    mean_curve,
)
from .evidence_plots import _plots
from .lr_sweep import select_lr, selection_key  # noqa: F401  (importable from here as before)
from .run_folder import write_json
from .stats import diff_interval, gap_closed, mean, paired_interval, t_interval  # noqa: F401  (as before)


def _f(x: float | None, d: int = 4) -> str:
    return "–" if x is None else f"{x:.{d}f}"


def _lr_by_loss(g: dict[str, Any]) -> str:
    """The rate the validation loss would have chosen; marked when it is not the one the metric chose."""
    lr = g.get("lr_by_loss")
    if lr is None or len(g["grid"]) < 2:
        return "–"
    return f"{lr:g}" + ("" if lr == g["lr"] else " (differs)")


def _share(g: dict[str, Any]) -> str:
    """A share of the gap closed with its bootstrap interval (a method with one seed so far has none)."""
    if g["lo"] is None:
        return f"{g['point']:+.2f} (one seed: no interval)"
    return f"{g['point']:+.2f} [{_f(g['lo'], 2)}, {_f(g['hi'], 2)}]"


def _pm(m: float | None, h: float | None, n: int, d: int = 4) -> str:
    if m is None:
        return "–"
    return f"{m:.{d}f} ± {h:.{d}f} (n={n})" if h is not None else f"{m:.{d}f} (n={n})"


def planned_runs(setting: dict[str, Any]) -> set[tuple[str, int | None]]:
    """The (method label, rank) pairs the study's commands asked for: each command's methods × its ranks (a study
    grown by several commands asks for the union, not for every method at every rank); full fine-tuning has no
    rank. Falls back to all methods × all ranks when a command cannot be read."""
    import shlex

    from ..cli import build_parser
    from ..cli_train import _csv

    every = {(m, None if m == "full" else r) for m in setting["methods"] for r in setting["ranks"]}
    commands = setting.get("commands") or [setting.get("command")]
    want: set[tuple[str, int | None]] = set()
    parser = build_parser()
    for command in commands:
        try:
            argv = shlex.split(command or "")
            args = parser.parse_args(argv[argv.index("compare"):])
        except (ValueError, SystemExit):
            return every
        methods = _csv(args.methods) or ["lora", "sds", "full"]
        ranks = [int(x) for x in _csv(args.ranks) or []] or [int(setting["base"]["r"])]
        want |= {(m, None if m == "full" else r) for m in methods for r in ranks}
    return want


def _setting_md(name: str, setting: dict[str, Any], an: dict[str, Any], plots: list[str], rel: str) -> list[str]:
    b = setting["base"]
    primary = setting["primary_metric"]
    base = setting.get("baseline") or {}
    lines = [f"## {name}: {b['model']} on {setting['task']}", ""]
    done = {(g["label"], g["r"]) for g in an["groups"] if len(g["values"]) >= len(setting["seeds"])}
    want = planned_runs(setting)
    if want - done:
        missing = ", ".join(f"{_name(m)}" + (f" r={r}" if r is not None else "") for m, r in sorted(
            want - done, key=lambda x: (x[1] or 0, x[0])))
        lines += [f"**In progress** ({an['n_runs']} runs recorded): not yet complete for {missing}. Rows below are "
                  "what the records hold so far (a sweep still running may not have bracketed its best rate); the "
                  "study resumes with the same command.", ""]
    bl = ""
    if base.get("kind") == "majority":
        bl = (f" Majority class {base['class']} = {base['value']:.4f} accuracy on the evaluation split"
              + (" (Matthews correlation 0)." if primary == "matthews" else "."))
    elif base.get("kind") == "chance":
        bl = f" Chance (uniform guess among the options) = {base['value']:.4f} accuracy."
    lines += [f"Training on {setting['n_train']:,} rows, validation split {setting['n_val']:,} rows carved from the "
              f"training data (seed {setting['val_seed']}), evaluation on {setting['n_eval']:,} rows (the task's "
              f"evaluation split, never used for a choice).{bl} {b['steps']} optimizer steps of batch "
              f"{b['batch_size']}×{b['grad_accum']} (max length {b['max_length']}), AdamW, {b['scheduler']} schedule, "
              f"targets {b['targets']} (excluding {b['exclude']}), α = {b['alpha']} ({b['scaling']}); learning "
              f"curve every {b['eval_every']} steps; seeds {setting['seeds']} (the first one also runs the sweep). "
              f"{an['n_runs']} runs, {an['train_wall_s'] / 3600:.2f} h of training"
              + (f" ({'; '.join(an['machines'])})" if an.get("machines") else "") + ".", ""]
    lines += ["Commands that recorded runs into this study (in order; a study resumes, so later ones skip recorded runs):",
              "", "```bash", *setting.get("commands", [setting.get("command", "")]), "```", ""]
    cols = ["rank", "method", f"eval {primary} (mean ± 95 % CI)", "other eval metrics",
            f"val {primary if setting['kind'] == 'classification' else 'loss'}", "lr (chosen)",
            "grid: validation score per lr", "lr by val loss", "final train loss", "trainable params"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for g in an["groups"]:
        grid = ", ".join(f"{lr}: {_f(v, 3)}" + (" ←" if float(lr) == g["lr"] else "") for lr, v in g["grid"].items())
        if not g["bracketed"]:
            grid += f" (best on the {g['edge']} edge)"
        other = "; ".join(f"{k} {_f(v['mean'])}" + (f" ± {v['ci95']:.4f}" if v["ci95"] is not None else "")
                          for k, v in g["other"].items())
        lines.append(f"| {g['r'] if g['r'] is not None else '–'} | {_name(g['label'])} | "
                     f"{_pm(g['mean'], g['ci95'], len(g['values']))} | {other or '–'} | {_f(g['val'])} | {g['lr']:g} | "
                     f"{grid} | {_lr_by_loss(g)} | {_f(g['final_train_loss'])} | {g['trainable_parameters']:,} |")
    lines.append("")
    conv = an.get("convergence", {}).get("full|None")
    if conv:
        q, f, b = conv["at_three_quarters"], conv["final"], conv["best"]
        lines += [f"Has full fine-tuning converged? Its validation {conv['key']} (mean over seeds) was {q[1]:.4f} at "
                  f"step {q[0]} and {f[1]:.4f} at the end (step {f[0]}); best {b[1]:.4f} at step {b[0]}.", ""]
    if an["lora_gaps"]:
        lines += ["**Does full fine-tuning beat LoRA here?** (Welch 95 % interval of mean(full) − mean(LoRA))", ""]
        for x in an["lora_gaps"]:
            iv = x["interval"]
            lines.append(f"- rank {x['r']}: {x['full_minus_lora']:+.4f}"
                         + (f" [{iv[0]:+.4f}, {iv[1]:+.4f}]" if iv else " (needs ≥ 2 seeds each)")
                         + (" — **a gap**" if x["significant"] else " — not a gap beyond the interval")
                         + (f"; paired by seed (same data order): [{x['paired'][0]:+.4f}, {x['paired'][1]:+.4f}]"
                            if x.get("paired") else ""))
        lines.append("")
    if an["gaps"]:
        lines += ["**Share of the LoRA → full gap closed**, (method − LoRA) / (full − LoRA), 95 % bootstrap interval "
                  "over seeds (only where the gap exceeds its own interval), and the Welch interval of method − LoRA:",
                  ""]
        for x in an["gaps"]:
            mi = x.get("method_minus_lora")
            diff = f"method − LoRA [{mi[0]:+.4f}, {mi[1]:+.4f}]" if mi else "method − LoRA: needs ≥ 2 seeds"
            pi = x.get("method_minus_lora_paired")
            if pi:
                diff += f", paired by seed [{pi[0]:+.4f}, {pi[1]:+.4f}]"
            if x["point"] is None:
                lines.append(f"- {_name(x['label'])}, rank {x['r']}: no significant gap to close; {diff}")
            else:
                lines.append(f"- {_name(x['label'])}, rank {x['r']}: {_share(x)}; {diff}")
        lines.append("")
    diag_rows = [g for g in an["groups"] if g["diagnostics_last"]]
    if diag_rows:
        lines += ["Diagnostics at the last probe (mean over seeds; cos(G, G̃): the method's effective gradient vs the "
                  "full gradient; cos(G̃, G*): vs the best update its subspaces allow; stable rank and condition "
                  "number of the factors; effective rank of ∇B; averaged over the adapted layers):", "",
                  "| rank | method | " + " | ".join(DIAG_TITLES[k] for k in DIAG) + " |",
                  "|---|---|" + "---|" * len(DIAG)]
        for g in diag_rows:
            lines.append(f"| {g['r']} | {_name(g['label'])} | "
                         + " | ".join(_f(g["diagnostics_last"].get(k), 3) for k in DIAG) + " |")
        lines.append("")
    for p in plots:
        lines += [f"![{p}]({rel}/{p})", ""]
    return lines


def build_report(root: str | Path, out_md: str | Path) -> dict[str, Any]:
    """Rebuild the evidence report (Markdown + PNGs beside the runs + ``summary.json``) from ``root``; returns the
    summary. Raises ValueError when ``root`` holds no study."""
    root, out_md = Path(root), Path(out_md)
    folders = sorted(p.parent for p in root.glob("*/setting.json"))
    if not folders:
        raise ValueError(f"{root} holds no study (no */setting.json); record one with sdslora compare --lr-sweep ... "
                         "--evidence DIR/<setting>")
    try:
        rel = root.resolve().relative_to(out_md.resolve().parent).as_posix()
    except ValueError:
        rel = root.resolve().as_posix()
    summary: dict[str, Any] = {"settings": {}}
    body: list[str] = []
    headline: list[str] = []
    for folder in folders:
        name = folder.name
        setting, runs = load_setting(folder)
        an = analyse(setting, runs)
        plots = _plots(name, setting, runs, an, root) if runs else []
        summary["settings"][name] = {"setting": setting, **an, "plots": plots}
        body += _setting_md(name, setting, an, plots, rel)
        for x in an["lora_gaps"]:
            iv = x["interval"]
            headline.append(f"| {name} | {x['r']} | {x['full_minus_lora']:+.4f}"
                            + (f" [{iv[0]:+.4f}, {iv[1]:+.4f}]" if iv else "") + f" | {'yes' if x['significant'] else 'no'} | "
                            + "; ".join(f"{_name(g['label'])} {_share(g)}"
                                        if g["point"] is not None else f"{_name(g['label'])} –"
                                        for g in an["gaps"] if g["r"] == x["r"]) + " |")
    total = sum(s["train_wall_s"] for s in summary["settings"].values())
    lines = ["# Evidence: where LoRA falls short of full fine-tuning, and how much SDS-LoRA closes", "",
             f"Rebuilt by `sdslora evidence {root.as_posix()} -o {out_md.as_posix()}` from the run records in "
             f"`{rel}/` ({sum(s['n_runs'] for s in summary['settings'].values())} runs, {total / 3600:.2f} h of "
             "training). Protocol: learning rate chosen per method and rank on a validation split carved from the "
             "training data (a grid widened past an edge that holds the best value), then that rate on every seed; "
             "intervals are 95 % t-intervals over seeds; the evaluation split is used only for the numbers reported.",
             ""]
    if headline:
        lines += ["| setting | rank | full − LoRA [95 % CI] | a gap? | gap closed [95 % bootstrap] |",
                  "|---|---|---|---|---|", *headline, ""]
    findings = root / "findings.md"  # the written reading of these numbers, kept beside the records
    if findings.is_file():
        lines += [findings.read_text().strip(), ""]
    lines += body
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(lines) + "\n")
    write_json(root / "summary.json", summary)
    return summary
