"""PNG plots of diagnostics histories (recorder / callback JSONL), one line per run, in the spirit of the
SDS-LoRA paper's Figures 1, 3, 4 and 5: alignment and effective gradient rank over training, the stable rank of the
LoRA factors over training, and basis similarity across SDS-LoRA refreshes. matplotlib (Agg backend) is imported
only when a plot is drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PANELS: dict[str, list[tuple[str, str]]] = {
    # file stem: [(summary key, label)]
    "alignment": [
        ("cos_g_geff", "cos(G, G̃)"),
        ("cos_geff_gstar", "cos(G̃, G*)"),
        ("cos_g_geff_opt", "cos(G, G̃_opt)"),
    ],
    "effective_rank": [
        ("erank_grad_A", "erank ∇A"),
        ("erank_grad_B", "erank ∇B"),
        ("erank_scalefree_A", "erank U_BᵀG"),
        ("erank_scalefree_B", "erank G V_A"),
    ],
    "stable_rank": [("stable_rank_A", "stable rank A"), ("stable_rank_B", "stable rank B")],
}


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for rec in records:
        v = (rec.get("summary") or {}).get(key)
        if isinstance(v, (int, float)):
            xs.append(int(rec["step"]))
            ys.append(float(v))
    return xs, ys


def _refresh_series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for rec in records:
        for ev in rec.get("events") or []:
            v = ev.get(key)
            if ev.get("event") == "refresh" and isinstance(v, (int, float)):
                xs.append(int(ev["step"]))
                ys.append(float(v))
    return xs, ys


def history_labels(paths: list[str | Path]) -> list[str]:
    """Legend labels for diagnostics histories given as run folders or JSONL files: the run's folder name (a folder,
    or the folder holding a ``diagnostics.jsonl``), else the file's stem. Equal names get as many parent folders as
    tell them apart (``a/sds``, ``b/sds``); the same path given twice gets `` (2)``."""
    keys: list[tuple[str, ...]] = []
    for p in paths:
        q = Path(p).absolute()
        if Path(p).is_dir():
            parts = q.parts
        elif q.name == "diagnostics.jsonl":
            parts = q.parent.parts
        else:
            parts = (*q.parent.parts, q.stem)
        keys.append(tuple(x for x in parts if x != q.anchor) or (str(p),))
    labels = []
    for i, key in enumerate(keys):
        k = 1
        while k < len(key) and any(j != i and other != key and other[-k:] == key[-k:] for j, other in enumerate(keys)):
            k += 1
        labels.append("/".join(key[-k:]))
    out: list[str] = []
    for label in labels:
        n = out.count(label) + sum(1 for x in out if x.startswith(label + " ("))
        out.append(label if not n else f"{label} ({n + 1})")
    return out


def history_figures(records_by_run: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """``{file stem: matplotlib Figure}`` for ``{run label: records}`` (see :func:`plot_history`); the caller closes
    the figures. Every run that has data in a figure is in its legend, under its label.

    Raises ``ValueError`` when ``records_by_run`` is empty.
    """
    if not records_by_run:
        raise ValueError("plot_history() needs at least one run: {label: records}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, list[tuple[str, str, Any]]] = {
        stem: [(k, label, _series) for k, label in keys] for stem, keys in PANELS.items()
    }
    panels["basis_similarity"] = [
        ("sim_A_mean", "basis similarity A", _refresh_series),
        ("sim_B_mean", "basis similarity B", _refresh_series),
        ("jump_mean", "relative ΔW jump", _refresh_series),
    ]
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color") or [None]
    figures: dict[str, Any] = {}
    for stem, keys in panels.items():
        present = [
            (k, label, fn) for k, label, fn in keys if any(fn(recs, k)[0] for recs in records_by_run.values())
        ]
        if not present:
            continue
        fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.4), squeeze=False)
        handles: dict[str, Any] = {}
        for ax, (key, label, fn) in zip(axes[0], present):
            for i, (run, recs) in enumerate(records_by_run.items()):
                xs, ys = fn(recs, key)
                if xs:  # one colour per run in every subplot
                    (line,) = ax.plot(xs, ys, marker="." if len(xs) < 40 else None, label=run,
                                      color=colors[i % len(colors)])
                    handles.setdefault(run, line)
            ax.set_title(label)
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
        order = [run for run in records_by_run if run in handles]
        axes[0][0].legend([handles[r] for r in order], order, fontsize=8)
        fig.tight_layout()
        figures[stem] = fig
    return figures


def plot_history(records_by_run: dict[str, list[dict[str, Any]]], out_dir: str | Path) -> list[Path]:
    """Write the history plots for ``{run label: records}`` into ``out_dir`` (created) and return their paths.

    Files: ``alignment.png``, ``effective_rank.png``, ``stable_rank.png`` (one subplot per metric, one line per
    run, labelled with the run's label) and, when any run has SDS-LoRA refresh events, ``basis_similarity.png``
    (sim_A_mean, sim_B_mean and the relative ΔW jump at each refresh). A panel with no data in any run is not
    written. Labels for run folders / files: :func:`history_labels`.

    Raises ``ValueError`` when ``records_by_run`` is empty.
    """
    figures = history_figures(records_by_run)
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for stem, fig in figures.items():
        path = out / f"{stem}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
