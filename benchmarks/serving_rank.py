"""Serving at a lower rank: accuracy and ΔW error of ``export_peft(max_rank=k)`` for a trained run.

    python benchmarks/serving_rank.py RUN_DIR [--ranks 16,8,4] [--eval-limit 400]

RUN_DIR is a run folder of ``sdslora train`` / ``compare`` (run.json + adapter/). For each k the adapter is exported
to PEFT at rank ≤ k, loaded with ``peft.PeftModel.from_pretrained`` on a fresh base, and evaluated on the first
``--eval-limit`` rows of the task's evaluation split; the native adapter is evaluated first. Prints a Markdown table
(docs/integrations.md, "Serving"). Needs the run's data (``SDSLORA_DATA_DIR``) and peft.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--ranks", default="16,8,4")
    ap.add_argument("--eval-limit", type=int, default=400)
    a = ap.parse_args()

    import peft

    import sdslora
    from sdslora.experiments.data import evaluate
    from sdslora.experiments.models import load_model
    from sdslora.experiments.train import RunConfig, prepare_data

    cfg = RunConfig.from_dict(json.loads((a.run / "run.json").read_text())["config"])
    task = cfg.get_task()
    evals = prepare_data(cfg, task)[1][: a.eval_limit]

    def fresh() -> tuple[torch.nn.Module, object]:
        model, tok, _ = load_model(cfg.model, task.kind, max(task.num_labels, 2), torch.float32)
        return model, tok

    base, tok = fresh()
    adapted = sdslora.load_adapter(base, a.run / "adapter")
    metric = task.primary_metric
    native = evaluate(adapted, tok, task, evals, max_length=cfg.max_length, batch_size=64)
    print(f"| export | rank | mean relative error of ΔW (max over layers) | {metric} |")
    print("|---|---|---|---|")
    print(f"| native | - | 0 | {native[metric]:.4f} |")
    for k in (int(x) for x in a.ranks.split(",")):
        with tempfile.TemporaryDirectory() as d:
            adapted.export_peft(d, max_rank=k)
            cfg_peft = json.loads((Path(d) / "adapter_config.json").read_text())
            report = Path(d) / "export_report.json"
            errs = list(json.loads(report.read_text())["relative_error"].values()) if report.is_file() else []
            loaded = peft.PeftModel.from_pretrained(fresh()[0], d).eval()
            ev = evaluate(loaded, tok, task, evals, max_length=cfg.max_length, batch_size=64)
        err = f"{sum(errs) / len(errs):.3f} ({max(errs):.3f})" if errs else "0 (exact)"
        print(f"| max_rank={k} | {cfg_peft['r']} | {err} | {ev[metric]:.4f} |")


if __name__ == "__main__":
    main()
