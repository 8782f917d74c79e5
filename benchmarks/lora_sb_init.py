"""LoRA-SB's claim that its initialisation alone already lowers the loss: at step 0 (no optimizer step taken) the
adapter's ΔW₀ is the rank-r truncation of the first AdamW step of full fine-tuning, −η₁·sign(G).

    SDSLORA_DATA_DIR=/path/to/glue python benchmarks/lora_sb_init.py [--task sst2] [--ranks 1,4,8] [--lrs 1e-3,1e-2]

all-MiniLM-L6-v2 with its (seeded) classification head, the 36 encoder linear layers adapted; G is the mean gradient
over the first 32 training examples (the batches LoRA-SB and LoRA-GA initialise from in ``sdslora train``). Prints,
per first-step learning rate η₁, the validation loss (500 rows carved from the training data as in the evidence
study) of: the base model (= LoRA, LoRA-XS and SDS-LoRA at step 0, whose ΔW₀ is 0 or ~0), the full-rank first AdamW
step −η₁·sign(G) on the adapted layers (what LoRA-SB approximates), and LoRA-SB's initialisation at each rank. Markdown table for docs/reproduction.md.
"""

from __future__ import annotations

import argparse
import copy

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--ranks", default="1,8")
    ap.add_argument("--lrs", default="1e-4,1e-3")
    a = ap.parse_args()

    import sdslora
    from sdslora.experiments.compare import split_validation
    from sdslora.experiments.data import Collator, encode, validation_scores
    from sdslora.experiments.models import load_model
    from sdslora.experiments.train import INIT_SAMPLES, RunConfig, prepare_data
    from sdslora.init import estimate_gradients

    cfg = RunConfig(model="minilm-l6", task=a.task, train_limit=20000, max_length=64)
    task = cfg.get_task()
    train, _ = prepare_data(cfg, task)
    train, val = split_validation(train, 0.1, 500)
    torch.manual_seed(0)
    base, tok, _ = load_model("minilm-l6", task.kind, 2, torch.float32)
    base.eval()
    enc = encode(task, tok, train[:INIT_SAMPLES], cfg.max_length)
    collate = Collator(tok.pad_token_id or 0)
    init = [collate(enc[i:i + 16]) for i in range(0, len(enc), 16)]

    def val_loss(model: torch.nn.Module) -> float:
        return float(validation_scores(model, tok, task, val, max_length=cfg.max_length, batch_size=128)["loss"])

    targets = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("bert.encoder")]
    grads = estimate_gradients(base, targets, init)
    base_loss = val_loss(base)
    ranks = [int(r) for r in a.ranks.split(",")]
    print("| η₁ | base (LoRA, LoRA-XS, SDS-LoRA at step 0) | full first AdamW step −η₁·sign(G) | "
          + " | ".join(f"LoRA-SB r={r}" for r in ranks) + " |")
    print("|---|---|---|" + "---|" * len(ranks))
    for lr in (float(x) for x in a.lrs.split(",")):
        stepped = copy.deepcopy(base)
        with torch.no_grad():
            for n in targets:
                w = stepped.get_submodule(n).weight
                w.sub_(lr * torch.sign(grads[n]).to(w.dtype))  # AdamW's first step (bias-corrected m/√v)
        full = val_loss(stepped)
        sb = []
        for r in ranks:
            model = sdslora.attach(copy.deepcopy(base), sdslora.AdapterConfig(
                method="lora_sb", r=r, target_modules=targets, options={"lr_first_step": lr}), init_data=init)
            model.eval()
            sb.append(val_loss(model))
        print(f"| {lr:g} | {base_loss:.4f} | {full:.4f} | " + " | ".join(f"{x:.4f}" for x in sb) + " |")


if __name__ == "__main__":
    main()
