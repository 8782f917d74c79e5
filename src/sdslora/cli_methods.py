"""``sdslora methods``: list the registered methods with their options and citations.

The listing is a static copy of the registry (:data:`METHOD_TABLE`), so that the command answers without importing
torch (the registry imports every method's layer class). ``tests/test_readme.py`` checks that the copy equals what
the registry gives (:func:`registry_table`); after adding a method or changing an option's default, regenerate it with
``python -c "from sdslora.cli_methods import registry_table; print(registry_table())"``.
"""

from __future__ import annotations

import argparse

# (name, description, options with their resolved defaults, citation), in registry order
METHOD_TABLE: tuple[tuple[str, str, str, str], ...] = (
    (
        'lora',
        'LoRA, ΔW = s·B·A (rsLoRA or standard scaling)',
        '-',
        'Hu et al. 2021, arXiv 2106.09685; rsLoRA: Kalajdzievski 2023, arXiv 2312.03732',
    ),
    (
        'sds',
        'SDS-LoRA, ΔW = s(Q_B·A + B·Q_Aᵀ) with warm-up, re-parameterisation, refresh',
        "warmup_steps=10, refresh='decay', refresh_k=5, warmup_mode='reparam', init_phase_steps=50, "
        "guard_rtol=1e-06, faithful=False, refresh_align='preserve', reparam_state='reset', lr_scale=1.0",
        'Oh, Baik, Lee 2026, arXiv 2606.16454',
    ),
    (
        'orthogonal',
        'orthogonal-only ablation of SDS-LoRA (orthonormal B, A)',
        "warmup_steps=10, refresh='decay', refresh_k=5, warmup_mode='reparam', init_phase_steps=50, "
        "guard_rtol=1e-06, faithful=False, refresh_align='preserve', reparam_state='reset', lr_scale=1.0",
        'Oh, Baik, Lee 2026, arXiv 2606.16454 (Table 5)',
    ),
    (
        'lora_ga',
        'LoRA-GA, LoRA initialised from the SVD of the mean gradient, base shifted by −s·B0A0 (needs '
        'init_data)',
        "direction='ArB2r', scale='stable', stable_gamma=16.0, variant='authors'",
        'Wang, Yu, Li 2024, arXiv 2407.05000',
    ),
    (
        'lora_xs',
        'LoRA-XS, ΔW = s·B·R·A, frozen B, A from the SVD of W0, only R (r×r) trains',
        "init_std=1e-05, svd='exact', svd_niter=10",
        'Bałazy et al. 2024, arXiv 2405.17604',
    ),
    (
        'lora_sb',
        'LoRA-SB, ΔW = s·B·R·A initialised from the approximated first full-FT step, only R trains '
        '(needs init_data)',
        "lr_first_step=0.0001, svd='exact', svd_niter=10",
        'Ponkshe et al. 2024, arXiv 2411.19557',
    ),
    (
        'pissa',
        'PiSSA, LoRA initialised from the principal rank-r SVD part of W0, base re-based to W0 − s·B0A0',
        'pissa_niter=None',
        'Meng, Wang, Zhang 2024, arXiv 2404.02948',
    ),
    (
        'dora',
        "DoRA, W' = m ⊙ (W0 + s·B·A)/‖W0 + s·B·A‖_c (norm detached), trainable m",
        '-',
        'Liu et al. 2024, arXiv 2402.09353',
    ),
    (
        'relora',
        'ReLoRA over LoRA: every N steps merge ΔW into the frozen weight and restart the factors '
        '(high-rank total)',
        'restart_every=100, restart_warmup=10, prune=0.99',
        'Lialin et al. 2023, arXiv 2307.05695',
    ),
    (
        'relora_sds',
        'ReLoRA over SDS-LoRA: merge-and-restart every N steps, each cycle an SDS-LoRA run of N steps',
        "warmup_steps=10, refresh='decay', refresh_k=5, warmup_mode='reparam', init_phase_steps=50, "
        "guard_rtol=1e-06, faithful=False, refresh_align='preserve', reparam_state='reset', "
        'lr_scale=1.0, restart_every=100, restart_warmup=10, prune=0.99',
        'Lialin et al. 2023, arXiv 2307.05695; Oh, Baik, Lee 2026, arXiv 2606.16454',
    ),
    (
        'lotr',
        'LoTR, ΔW_l = s·U·C_l·Vᵀ, U and V shared across the depth (per module name or shape), Tucker-2 '
        'across layers',
        "core='full', orthonormal_init=True, share_by='name'",
        'Bershatsky et al. 2024, arXiv 2402.01376',
    ),
    (
        'vera',
        'VeRA, ΔW_l = s·diag(b_l)·B·diag(d_l)·A, frozen random A, B shared by every layer, only d_l and b_l train',
        'd_initial=0.1, projection_seed=0',
        'Kopiczko, Blankevoort, Asano 2024, arXiv 2310.11454',
    ),
    (
        'adalora',
        'AdaLoRA, ΔW = s·B·diag(E)·A, the rank budget pruned during training by importance (+ orthogonal penalty)',
        'target_r=None, tinit=0, tfinal=0, deltaT=1, beta1=0.85, beta2=0.85, orth_reg_weight=0.5',
        'Zhang et al. 2023, arXiv 2303.10512',
    ),
    (
        'lora_grow',
        "LoRA whose rank grows r -> grow_to during training along the unreachable gradient's top "
        'directions',
        "grow_to=None, grow_steps='0.5', directions='gradient', seed=0",
        'rank growth as in IncreLoRA, Zhang et al. 2023, arXiv 2308.12043',
    ),
    (
        'sds_grow',
        "SDS-LoRA whose rank grows r -> grow_to during training along the unreachable gradient's top "
        'directions',
        "warmup_steps=10, refresh='decay', refresh_k=5, warmup_mode='reparam', init_phase_steps=50, "
        "guard_rtol=1e-06, faithful=False, refresh_align='preserve', reparam_state='reset', "
        "lr_scale=1.0, grow_to=None, grow_steps='0.5', directions='gradient', seed=0",
        'Oh, Baik, Lee 2026, arXiv 2606.16454; rank growth as in IncreLoRA, Zhang et al. 2023, arXiv '
        '2308.12043',
    ),
    (
        'full',
        'full fine-tuning (reference)',
        '-',
        '-',
    ),
)


def registry_table() -> tuple[tuple[str, str, str, str], ...]:
    """:data:`METHOD_TABLE` as the registry gives it (imports torch)."""
    import dataclasses

    from .methods import METHODS

    rows = []
    for spec in METHODS.values():
        defaults = dataclasses.asdict(spec.options_cls())  # resolved defaults (e.g. SDS's refresh_align)
        rows.append((spec.name, spec.description, ", ".join(f"{k}={v!r}" for k, v in defaults.items()) or "-",
                     spec.citation))
    return tuple(rows)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list the available methods and their options")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for name, description, opts, citation in METHOD_TABLE:
        print(f"{name:12s} {description}")
        print(f"{'':12s} options: {opts}")
        print(f"{'':12s} cite: {citation}")
    return 0
