"""The evidence report: rebuilt from the per-run summaries that ``sdslora compare --evidence DIR`` records.

    sdslora evidence docs/evidence -o docs/evidence.md

``<root>/findings.md`` (optional, written by hand) is placed after the headline table: the reading of the numbers.
``docs/evidence/<setting>/setting.json`` describes a study (model, task, data sizes, steps, grids, seeds, majority
or chance rate); ``docs/evidence/<setting>/runs/*.json`` holds one finished run each. For every setting this module
re-derives what the study runner decided (per method and rank, the learning rate whose first-seed run scored best
on the validation split: :func:`~sdslora.experiments.compare.select_lr`), gathers the seeds trained at that rate,
and reports the evaluation metrics as mean ± 95 % t-interval over seeds, the share of the LoRA -> full fine-tuning
gap each other method closes (bootstrap interval; only where full − LoRA exceeds its own interval), the validation
learning curves and an accuracy-vs-rank plot. A partial study (some runs missing) is reported as far as it goes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .compare import select_lr, selection_key
from .run_folder import write_json
from .stats import diff_interval, gap_closed, mean, paired_interval, t_interval

NAMES = {"lora": "LoRA", "sds": "SDS-LoRA", "sds:faithful": "SDS-LoRA (faithful)", "full": "full fine-tuning",
         "dora": "DoRA", "pissa": "PiSSA"}
DIAG = ("cos_g_geff", "cos_geff_gstar", "stable_rank_A", "stable_rank_B", "kappa_B", "erank_grad_B")
DIAG_TITLES = {"cos_g_geff": "cos(G, G̃)", "cos_geff_gstar": "cos(G̃, G*)", "stable_rank_A": "stable rank of A",
               "stable_rank_B": "stable rank of B", "kappa_B": "condition number of B",
               "erank_grad_B": "effective rank of ∇B"}


def _name(label: str) -> str:
    return NAMES.get(label, label)


def load_setting(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(setting.json, the run summaries) of one study folder; unreadable run files raise ValueError naming them."""
    setting = json.loads((folder / "setting.json").read_text())
    runs = []
    for f in sorted((folder / "runs").glob("*.json")):
        try:
            runs.append(json.loads(f.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"evidence file {f} is not valid JSON ({e}); delete it and re-run the study to redo it") \
                from e
    return setting, runs


def analyse(setting: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (method label, rank): the sweep, the chosen learning rate, the seeds at it and their statistics; then
    the gap closed by every method relative to LoRA and full fine-tuning at each rank."""
    primary = setting["primary_metric"]
    metric = primary if setting["kind"] == "classification" else None
    sweep_seed = setting["seeds"][0]
    groups: dict[tuple[str, int | None], list[dict[str, Any]]] = {}
    for run in runs:
        label = run["method"]
        r = None if label == "full" else int(run["r"])
        groups.setdefault((label, r), []).append(run)
    order = {m: i for i, m in enumerate(setting["methods"])}
    out_groups = []
    for (label, r), rs in sorted(groups.items(), key=lambda kv: (kv[0][1] is None, kv[0][1] or 0, order.get(kv[0][0], 99))):
        sweep = {float(x["lr"]): x for x in rs if x["seed"] == sweep_seed}
        if not sweep:
            continue
        best, edge = select_lr({lr: selection_key(x, metric) for lr, x in sweep.items()})
        at = sorted((x for x in rs if float(x["lr"]) == best), key=lambda x: x["seed"])
        ev = [x["eval"].get(primary) for x in at]
        m, h = t_interval(ev)
        other = {k: t_interval([x["eval"].get(k) for x in at]) for k in at[0]["eval"]
                 if k not in ("n", primary, "examples") and isinstance(at[0]["eval"].get(k), (int, float))}
        diag = {}
        for k in DIAG:
            last = [x["diagnostics"][k][-1][1] for x in at if (x.get("diagnostics") or {}).get(k)]
            if last:
                diag[k] = mean(last)
        out_groups.append({
            "label": label, "r": r, "lr": best, "bracketed": edge is None, "edge": edge,
            "grid": {f"{lr:g}": _val_score(x, metric) for lr, x in sorted(sweep.items())},
            "seeds": [x["seed"] for x in at], "values": ev, "mean": m, "ci95": h,
            "other": {k: {"mean": v[0], "ci95": v[1]} for k, v in other.items()},
            "val": mean([(x.get("val") or {}).get(primary if metric else "loss") for x in at]),
            "val_loss": mean([(x.get("val") or {}).get("loss") for x in at]),
            "final_train_loss": mean([x.get("final_train_loss") for x in at]),
            "trainable_parameters": at[0].get("trainable_parameters"), "steps": at[0].get("steps"),
            "diagnostics_last": diag, "runs": [x["run"] for x in at],
        })
    gaps = []
    full = next((g for g in out_groups if g["label"] == "full"), None)
    for g in out_groups:
        if g["label"] in ("lora", "full") or full is None:
            continue
        lora = next((x for x in out_groups if x["label"] == "lora" and x["r"] == g["r"]), None)
        if lora is None:
            continue
        gc = gap_closed(lora["values"], g["values"], full["values"])
        gc["method_minus_lora"] = diff_interval(lora["values"], g["values"])
        gc["method_minus_lora_paired"] = paired_interval(_by_seed(lora), _by_seed(g))
        gaps.append({"label": g["label"], "r": g["r"], **gc})
    lora_gaps = []
    if full is not None:
        for lora in (x for x in out_groups if x["label"] == "lora"):
            di = diff_interval(lora["values"], full["values"])
            lora_gaps.append({"r": lora["r"], "full_minus_lora": (full["mean"] or 0) - (lora["mean"] or 0),
                              "interval": di, "significant": di is not None and di[0] > 0,
                              "paired": paired_interval(_by_seed(lora), _by_seed(full))})
    wall = sum(x.get("train_wall_s") or 0.0 for x in runs)
    machines = sorted({f"{m.get('processor')}, {m.get('cpu_count')} CPUs, torch {m.get('torch')}"
                       + (f", GPU {m['gpu']}" if m.get("gpu") else "") for m in (x.get("machine") for x in runs) if m})
    by_run = {x["run"]: x for x in runs}
    key = primary if metric else "loss"
    convergence = {}
    for g in out_groups:
        c = mean_curve([by_run[n] for n in g["runs"]], key)
        if len(c) >= 3:
            last = c[-1]
            q = min(c, key=lambda p: abs(p[0] - 0.75 * last[0]))
            best = (max if metric else min)(c, key=lambda p: p[1])
            convergence[f"{g['label']}|{g['r']}"] = {"key": key, "at_three_quarters": q, "final": last, "best": best}
    return {"groups": out_groups, "gaps": gaps, "lora_gaps": lora_gaps, "n_runs": len(runs), "train_wall_s": wall,
            "convergence": convergence, "machines": machines}


def mean_curve(runs: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """The validation curve of ``key`` averaged over runs, on the steps all of them measured."""
    curves = [{p["step"]: p.get(key) for p in x.get("curve") or []} for x in runs]
    if not curves:
        return []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    out = []
    for s in steps:
        m = mean([c[s] for c in curves])
        if m is not None:
            out.append((s, m))
    return out


def _by_seed(g: dict[str, Any]) -> dict[int, float]:
    return dict(zip(g["seeds"], g["values"]))


def _val_score(run: dict[str, Any], metric: str | None) -> float | None:
    v = (run.get("val") or {}).get(metric if metric else "loss")
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


# ---- plots -------------------------------------------------------------------------------------------------------
def _plots(name: str, setting: dict[str, Any], runs: list[dict[str, Any]], an: dict[str, Any], out_dir: Path
           ) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    primary = setting["primary_metric"]
    key = primary if setting["kind"] == "classification" else "loss"
    by_run = {x["run"]: x for x in runs}
    files = []
    ranks = sorted({g["r"] for g in an["groups"] if g["r"] is not None})
    full = next((g for g in an["groups"] if g["label"] == "full"), None)
    if ranks:
        fig, axes = plt.subplots(1, len(ranks), figsize=(4.6 * len(ranks), 3.6), squeeze=False, sharey=True)
        for ax, r in zip(axes[0], ranks):
            for g in [x for x in an["groups"] if x["r"] == r] + ([full] if full else []):
                curves = [by_run[n]["curve"] for n in g["runs"] if by_run[n].get("curve")]
                if not curves:
                    continue
                n = min(len(c) for c in curves)
                steps = [c["step"] for c in curves[0][:n]]
                vals = [[c[i].get(key) for c in curves] for i in range(n)]
                ms = [mean(v) for v in vals]
                line, = ax.plot(steps, ms, marker="o", ms=3,
                                label=f"{_name(g['label'])} (lr {g['lr']:g}, {len(curves)} seed{'s' * (len(curves) > 1)})")
                if len(curves) > 1:
                    lo = [min(x for x in v if x is not None) for v in vals]
                    hi = [max(x for x in v if x is not None) for v in vals]
                    ax.fill_between(steps, lo, hi, alpha=0.2, color=line.get_color())
            vb = setting.get("val_baseline") or {}  # the curves are on the validation split: its own rate
            if vb.get("primary") is not None and key == primary:
                ax.axhline(vb["primary"], color="grey", ls="--", lw=1, label=f"{vb['kind']} rate (validation split)")
            ax.set_title(f"rank {r}")
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(f"validation {key} (mean, band = seed range)")
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(f"{name}: learning curves on the validation split", fontsize=10)
        fig.tight_layout()
        fig.savefig(out_dir / f"{name}_curves.png", dpi=110)
        plt.close(fig)
        files.append(f"{name}_curves.png")

        fig, ax = plt.subplots(figsize=(5.6, 3.8))
        labels = [m for m in setting["methods"] if m != "full"]
        for j, lab in enumerate(labels):
            gs = sorted((g for g in an["groups"] if g["label"] == lab and g["mean"] is not None), key=lambda g: g["r"])
            if not gs:
                continue
            xs = [g["r"] * (1 + 0.04 * (j - len(labels) / 2)) for g in gs]
            ax.errorbar(xs, [g["mean"] for g in gs], yerr=[g["ci95"] or 0 for g in gs], marker="o", capsize=4,
                        label=_name(lab))
        if full is not None and full["mean"] is not None:
            ax.axhline(full["mean"], color="black", lw=1.2, label=f"{_name('full')} (mean)")
            if full["ci95"]:
                ax.axhspan(full["mean"] - full["ci95"], full["mean"] + full["ci95"], color="black", alpha=0.1)
        base = (setting.get("baseline") or {}).get("primary")
        if base is not None:
            ax.axhline(base, color="grey", ls="--", lw=1, label=f"{setting['baseline']['kind']} rate")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("rank r")
        ax.set_ylabel(f"evaluation {primary} (mean ± 95 % CI)")
        ax.set_title(f"{name}: {primary} vs rank", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / f"{name}_rank.png", dpi=110)
        plt.close(fig)
        files.append(f"{name}_rank.png")

        # the mechanism over training: diagnostics of the chosen runs, mean over seeds, one line per method/rank
        keys = [k for k in DIAG if any((by_run[n].get("diagnostics") or {}).get(k) for g in an["groups"]
                                       for n in g["runs"])]
        if keys:
            cols = min(3, len(keys))
            rows_n = math.ceil(len(keys) / cols)
            fig, axes = plt.subplots(rows_n, cols, figsize=(3.6 * cols, 3.0 * rows_n), squeeze=False)
            for ax in axes.flat[len(keys):]:
                ax.set_visible(False)
            for ax, k in zip(axes.flat, keys):
                for g in an["groups"]:
                    cs = [by_run[n]["diagnostics"][k] for n in g["runs"] if (by_run[n].get("diagnostics") or {}).get(k)]
                    if not cs:
                        continue
                    n = min(len(c) for c in cs)
                    steps = [c[0] for c in cs[0][:n]]
                    line, = ax.plot(steps, [mean([c[i][1] for c in cs]) for i in range(n)], marker="o", ms=3,
                                    label=f"{_name(g['label'])} r={g['r']}")
                    if len(cs) > 1:  # the seed range
                        ax.fill_between(steps, [min(c[i][1] for c in cs) for i in range(n)],
                                        [max(c[i][1] for c in cs) for i in range(n)], alpha=0.2,
                                        color=line.get_color())
                ax.set_title(DIAG_TITLES[k], fontsize=9)
                ax.set_xlabel("optimizer step")
                if k.startswith("kappa"):
                    ax.set_yscale("log")
                ax.grid(alpha=0.3)
            for row in axes:
                row[0].set_ylabel("mean over layers, seeds (band: range)")
            axes.flat[len(keys) - 1].legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(out_dir / f"{name}_diagnostics.png", dpi=110)
            plt.close(fig)
            files.append(f"{name}_diagnostics.png")
    return files


# ---- markdown ----------------------------------------------------------------------------------------------------
def _f(x: float | None, d: int = 4) -> str:
    return "–" if x is None else f"{x:.{d}f}"


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
            "grid: validation score per lr", "final train loss", "trainable params"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for g in an["groups"]:
        grid = ", ".join(f"{lr}: {_f(v, 3)}" + (" ←" if float(lr) == g["lr"] else "") for lr, v in g["grid"].items())
        if not g["bracketed"]:
            grid += f" (best on the {g['edge']} edge)"
        other = "; ".join(f"{k} {_f(v['mean'])}" + (f" ± {v['ci95']:.4f}" if v["ci95"] is not None else "")
                          for k, v in g["other"].items())
        lines.append(f"| {g['r'] if g['r'] is not None else '–'} | {_name(g['label'])} | "
                     f"{_pm(g['mean'], g['ci95'], len(g['values']))} | {other or '–'} | {_f(g['val'])} | {g['lr']:g} | "
                     f"{grid} | {_f(g['final_train_loss'])} | {g['trainable_parameters']:,} |")
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
                lines.append(f"- {_name(x['label'])}, rank {x['r']}: {x['point']:+.2f} [{_f(x['lo'], 2)}, "
                             f"{_f(x['hi'], 2)}]; {diff}")
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
                            + "; ".join(f"{_name(g['label'])} {g['point']:+.2f} [{_f(g['lo'], 2)}, {_f(g['hi'], 2)}]"
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
