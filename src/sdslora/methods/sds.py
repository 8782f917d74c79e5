"""SDS-LoRA (Oh, Baik, Lee, 2026, arXiv 2606.16454) and its orthogonal-only ablation.

SDS-LoRA:  ΔW = s (Q_B A + B Q_Aᵀ), Q_A ∈ R^{in×r}, Q_B ∈ R^{out×r} orthonormal bases of row(A) and col(B), held
constant in backward, so ∇_A = s Q_BᵀG and ∇_B = s G Q_A and the effective full-space gradient is the isotropic
projection s²(G Q_A Q_Aᵀ + Q_B Q_Bᵀ G) (LoRA's is s²(G AᵀA + BBᵀ G), reweighted by the factors' squared singular
values). Forward as a rank-2r LoRA with fixed halves: y = W0 x + s [Q_B | B] [A ; Q_Aᵀ] x.

Base layers as LoRA's (nn.Linear, transformers Conv1D, nn.Embedding, nn.Conv1d/2d/3d; see ``methods.base``): all
of the above acts on the [out, in] matrix view; for an embedding the decoupled path looks the input up in the rows of
[A ; Q_Aᵀ]ᵀ, for a convolution it convolves with [A ; Q_Aᵀ] reshaped to a [2r, in_ch, k...] kernel, and applies
[Q_B | B] (a 1×1 convolution): exactly the rank-2r PEFT export.

Schedule (docs/algorithm.md, counted in optimizer steps t = 1..T):
* t ≤ ``warmup_steps`` (10): plain LoRA (ΔW = s B A).
* t = ``warmup_steps``: rank-r SVD B A = U Σ Vᵀ (exact, via QR of both factors and an SVD of the r×r core);
  Q_B = U, Q_A = V, A = ½ Σ Vᵀ, B = ½ U Σ (ΔW unchanged); the optimizer state of A and B is cleared.
* later: refresh Q_A = signfix(QR(Aᵀ)), Q_B = signfix(QR(B)) when ``t mod (⌊t/⌊T/k⌋⌋ + 1) = 0`` (``refresh="decay"``,
  k = ``refresh_k`` = 5), every N steps (``"every:N"``) or never. A layer is skipped when a factor is numerically
  rank deficient: min diag|R| ≤ ``guard_rtol`` · max diag|R| (relative guard; the authors' code uses 1e-2 absolute).
  That is the paper's refresh (``faithful=True``). The default (``refresh_align="preserve"``, docs/sds_stability.md)
  rotates each new basis to the one of the same span closest to the old basis and re-expresses A and B in the new
  bases, so that ΔW does not change at a refresh.
* ``warmup_mode="init_phase"`` (docs/algorithm.md): the first ``init_phase_steps`` steps form a separate phase in which every
  ``warmup_steps`` steps the bases are set from the SVD, A and B are reset to 0 and the optimizer state is cleared;
  the schedule above then runs on the remaining steps (step counter and T shifted by ``init_phase_steps``).

Orthogonal-only ablation (docs/algorithm.md, the paper's Table 5 "s Q_B Q_Aᵀ with trainable bases"): plain LoRA forward in
which, after the same warm-up, B = U and A = Vᵀ are orthonormal and are retracted to orthonormal (sign-fixed QR) at
every scheduled refresh. [design] The warm-up update is kept, as in SDS's "reparam" mode, through a frozen offset
U(Σ − I)Vᵀ, so ΔW = s (B A + O_B O_A) and ΔW is unchanged by the re-parameterisation.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..linalg import lowrank_fro2, polar_factor, qr_signfixed, svd_of_product
from ..nonfinite import NONFINITE_CAUSES, require_finite
from .base import AdapterLayer, sync_state_after_load
from .lora import lora_init
from .sds_schedule import (  # noqa: F401  (importable from here: the method's options and schedule)
    FAITHFUL,
    REFRESH_ALIGNS,
    WARMUP_MODES,
    SDSOptions,
    SDSPlan,
    refresh_due,
    refresh_steps,
)


class _TwoBlockLinear(torch.autograd.Function):
    """``y = s · [u1 | u2] ([d1 ; d2] x)``: a rank-2r LoRA path whose backward keeps only x, the 2r-wide
    intermediate and references to the four blocks (autograd through ``torch.cat`` would also save the m×2r and
    2r×n concatenated copies every step). Gradients are computed only for the blocks that require them (A and B).
    Under autocast the backward computes in the forward's compute dtype (that of the intermediate)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, u1: torch.Tensor, u2: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor,
                scale: float) -> torch.Tensor:
        h = F.linear(x, torch.cat([d1, d2], 0))  # [..., 2r]
        y = F.linear(h, torch.cat([u1, u2], 1))  # [..., out]
        ctx.save_for_backward(x, h, u1, u2, d1, d2)
        ctx.scale = scale
        return y * scale

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, h, u1, u2, d1, d2 = ctx.saved_tensors
        need_x, need_u1, need_u2, need_d1, need_d2 = ctx.needs_input_grad[:5]
        dt, r1 = h.dtype, d1.shape[0]
        g = (gy * ctx.scale).to(dt)
        g2, h2 = g.reshape(-1, g.shape[-1]), h.reshape(-1, h.shape[-1])
        gx = gu1 = gu2 = gd1 = gd2 = None
        if need_u1:
            gu1 = (g2.T @ h2[:, :r1]).to(u1.dtype)
        if need_u2:
            gu2 = (g2.T @ h2[:, r1:]).to(u2.dtype)
        if need_x or need_d1 or need_d2:
            gh = g @ torch.cat([u1, u2], 1).to(dt)  # [..., 2r]
            gh2, x2 = gh.reshape(-1, gh.shape[-1]), x.reshape(-1, x.shape[-1]).to(dt)
            if need_d1:
                gd1 = (gh2[:, :r1].T @ x2).to(d1.dtype)
            if need_d2:
                gd2 = (gh2[:, r1:].T @ x2).to(d2.dtype)
            if need_x:
                gx = (gh @ torch.cat([d1, d2], 0).to(dt)).to(x.dtype)
        return gx, gu1, gu2, gd1, gd2, None


class _TwoPhase(AdapterLayer):
    """Shared state of SDS and orthogonal: a LoRA warm-up phase, then a 'decoupled' phase with extra buffers."""

    layer_kinds = ("linear", "embedding", "conv")

    def __init__(self, base_layer: nn.Module, r: int, scale: float, dropout: float, dtype: str, options: Any,
                 *, deferred: bool = False):
        super().__init__(base_layer, r, scale, dropout, dtype, options, deferred=deferred)
        a, b = lora_init(self)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(b)
        # 0 = LoRA warm-up, 1 = decoupled; a buffer so that any state_dict (HF Trainer checkpoints, DDP) carries it
        self.register_buffer("lora_phase", torch.zeros((), dtype=torch.uint8))
        self.decoupled = False
        self.register_load_state_dict_post_hook(sync_state_after_load)

    def sync_state(self) -> None:
        self.decoupled = bool(self.lora_phase.item())

    def _set_decoupled(self) -> None:
        self.lora_phase.fill_(1)
        self.decoupled = True

    # the blocks of the decoupled forward: ΔW = s · [u1 | u2] @ [d1 ; d2]
    def _blocks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(u1, u2, d1, d2)``, each r wide, with ΔW = s [u1 | u2] [d1 ; d2]."""
        raise NotImplementedError

    def _halves(self) -> tuple[torch.Tensor, torch.Tensor]:
        u1, u2, d1, d2 = self._blocks()
        return torch.cat([u1, u2], dim=1), torch.cat([d1, d2], dim=0)

    def delta_weight(self) -> torch.Tensor:
        if not self.decoupled:
            return self.scale * (self.lora_B @ self.lora_A)
        up, down = self._halves()
        return self.scale * (up @ down)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.decoupled:
            return self._lowrank_forward(x, self.lora_B, self.lora_A)
        if self.view.kind != "linear":  # embedding / convolution: down = [d1 ; d2] (lookup or kernel), up = [u1 | u2]
            up, down = self._halves()
            return self._lowrank_forward(x, up, down)
        # [..., in] -> [..., 2r] -> [..., out], saving references to the blocks rather than concatenated copies
        return _TwoBlockLinear.apply(self._cast_in(x), *self._blocks(), self.scale)

    @torch.no_grad()
    def export_lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.decoupled:
            return self.scale * self.lora_B.detach().clone(), self.lora_A.detach().clone()
        up, down = self._halves()
        return self.scale * up.detach().clone(), down.detach().clone()

    @classmethod
    def refresh_batch(cls, layers: list[Any], rtol: float, align: str = "qr") -> torch.Tensor:
        """[L, 4] rows (jump, sim_A, sim_B, refreshed) from each layer's own ``refresh``."""
        rows = []
        for layer in layers:
            s = layer.refresh(rtol, align)
            nan = torch.full((), float("nan"))
            rows.append(torch.stack([*(v.float().cpu() for v in s), torch.ones(())]) if s is not None
                        else torch.stack([nan, nan, nan, torch.zeros(())]))
        return torch.stack(rows)


class SDSLayer(_TwoPhase):
    """SDS-LoRA layer. Buffers ``lora_QA`` [r, in] (= Q_Aᵀ) and ``lora_QB`` [out, r]."""

    method = "sds"
    atomic_refresh: ClassVar[bool] = True  # refresh_batch checks inputs and results, then writes once

    def __init__(self, base_layer: nn.Module, r: int, scale: float, dropout: float, dtype: str, options: Any,
                 *, deferred: bool = False):
        super().__init__(base_layer, r, scale, dropout, dtype, options, deferred=deferred)
        dev = self.base_weight.device
        self.register_buffer("lora_QA", torch.zeros(self.r, self.in_features, dtype=self.adapter_dtype, device=dev))
        self.register_buffer("lora_QB", torch.zeros(self.out_features, self.r, dtype=self.adapter_dtype, device=dev))

    def isotropic_gradient(self) -> bool:  # ∇A = s Q_BᵀG, ∇B = s G Q_A once decoupled: no factor spectra
        return self.decoupled

    def gradient_subspaces(self) -> tuple[torch.Tensor, torch.Tensor, str] | None:
        if self.decoupled:  # the bases its gradients are projected on (lora_QA stores Q_Aᵀ)
            return self.lora_QB.detach(), self.lora_QA.detach().T, "Q_B,Q_A"
        return super().gradient_subspaces()

    def activation_width(self) -> int:
        return 2 * self.r if self.decoupled else self.r

    def _blocks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # ΔW = s (Q_B A + B Q_Aᵀ) = s [Q_B | B] [A ; Q_Aᵀ]
        return self.lora_QB, self.lora_B, self.lora_A, self.lora_QA

    @torch.no_grad()
    def reparameterise(self, reset_to_zero: bool, carry: bool = False) -> list[Any] | None:
        """Warm-up re-parameterisation (docs/algorithm.md). With ``carry`` (from plain LoRA, A and B kept), returns the
        optimizer-state maps into the new coordinates: with Aᵀ = Q_a R_a, B = Q_b R_b, R_b R_aᵀ = U_c Σ V_cᵀ,
        SDS's gradients relate to LoRA's at the current point by ∇A' = U_cᵀ R_b⁻ᵀ ∇A and ∇B' = ∇B R_a⁻¹ V_c
        (exact for the same G). Returns None (reset the state) when not carrying, or a factor is numerically
        rank deficient (min diag|R| ≤ 1e-6 max diag|R|), or the bases already exist."""
        A, B = self.lora_A, self.lora_B
        maps: list[Any] | None = None
        if self.decoupled:  # M = B Q_Aᵀ + Q_B A = [B | Q_B] [Q_Aᵀ ; A]
            left, right = torch.cat([B, self.lora_QB], 1), torch.cat([self.lora_QA, A], 0).T
        else:  # M = B A
            left, right = B, A.T
        u, s, v = svd_of_product(left, right, self.r)
        if carry and not self.decoupled and not reset_to_zero:
            maps = self._carry_maps(u, v)
        self.lora_QB.copy_(u)
        self.lora_QA.copy_(v.T)
        if reset_to_zero:
            A.zero_()
            B.zero_()
        else:
            A.copy_(0.5 * s[:, None] * v.T)
            B.copy_(0.5 * u * s[None, :])
        self._set_decoupled()
        return maps

    def _carry_maps(self, u: torch.Tensor, v: torch.Tensor) -> list[Any] | None:
        # LoRA: ∇A = s Bᵀ G = s R_bᵀ Q_bᵀ G, ∇B = s G Aᵀ = s G Q_a R_a; SDS with Q_B = U = Q_b U_c, Q_A = V = Q_a V_c:
        # ∇A' = s Uᵀ G = (Uᵀ Q_b R_b⁻ᵀ) ∇A, ∇B' = s G V = ∇B (R_a⁻¹ Q_aᵀ V)
        with torch.autocast(device_type=self.lora_A.device.type, enabled=False):
            A, B = self.lora_A, self.lora_B
            ct = u.dtype
            qb, rb = torch.linalg.qr(B.to(ct), mode="reduced")
            qa, ra = torch.linalg.qr(A.T.to(ct), mode="reduced")
            db, da = torch.diagonal(rb).abs(), torch.diagonal(ra).abs()
            if bool((db.min() <= 1e-6 * db.max()) | (da.min() <= 1e-6 * da.max())):
                return None
            left_a = torch.linalg.solve_triangular(rb, qb.T @ u, upper=True).T  # (R_b⁻¹ Q_bᵀ U)ᵀ = Uᵀ Q_b R_b⁻ᵀ
            right_b = torch.linalg.solve_triangular(ra, qa.T @ v, upper=True)  # R_a⁻¹ Q_aᵀ V
            return [(self.lora_A, left_a, None), (self.lora_B, None, right_b)]

    def refresh(self, rtol: float, align: str = "qr") -> list[torch.Tensor] | None:
        """Refresh this layer alone (see :meth:`refresh_batch`): (jump, sim_A, sim_B), or None if skipped."""
        row = type(self).refresh_batch([self], rtol, align)[0]
        return None if not bool(row[3]) else [row[0], row[1], row[2]]

    @classmethod
    @torch.no_grad()
    def refresh_batch(cls, layers: list[Any], rtol: float, align: str = "qr") -> torch.Tensor:
        """Basis refresh (docs/algorithm.md) of layers of identical shape, batched (one QR call per factor for the whole
        group; host syncs only for the finiteness checks and to skip the selection of kept bases). ``align``: "qr"
        (the paper: sign-fixed QR bases, A and B kept); "procrustes": the orthonormal basis of the new span closest to the old basis, Q' = Q_qr·polar(Q_qrᵀ Q_old)
        (A and B kept; ΔW unchanged when the spans are); "preserve": the Procrustes bases and A, B re-expressed,
        A' = A − (Q_B'ᵀB)(Q_A' − Q_A)ᵀ, B' = B − (Q_B' − Q_B)(A Q_A'), so that ΔW is unchanged exactly. A layer whose
        factor is numerically rank deficient (min diag|R| ≤ rtol·max diag|R|) keeps its bases. Returns [L, 4]:
        relative ΔW jump, basis similarities ‖Q_Aᵀ Q_A'‖²/r and ‖Q_Bᵀ Q_B'‖²/r, and 1 if refreshed else 0."""
        # Every matrix is held wide, [L, r, dim] (A, Bᵀ, Q_Aᵀ, Q_Bᵀ): products of an r×r block with a wide matrix
        # run 2-3× faster on CPU than the same products with a tall [dim, r] one, and the QR's Q comes out that way.
        At = torch.stack([layer.lora_A for layer in layers])  # [L, r, n] = A
        Bt = torch.stack([layer.lora_B.mT for layer in layers])  # [L, r, m] = Bᵀ
        old_qa = torch.stack([layer.lora_QA for layer in layers])  # [L, r, n] = Q_Aᵀ
        old_qb = torch.stack([layer.lora_QB.mT for layer in layers])  # [L, r, m] = Q_Bᵀ
        # a refresh either completes or changes nothing: its inputs and results are checked before anything is written
        # (so the Controller takes no snapshot for it; see SDSPlan.atomic)
        require_finite([At, Bt, old_qa, old_qb],
                       f"an SDS-LoRA factor or basis holds NaN/Inf values before the basis refresh. {NONFINITE_CAUSES}")
        qb, db = qr_signfixed(Bt.mT)  # [L, m, r]
        qa, da = qr_signfixed(At.mT)  # [L, n, r]
        ok = (db.amin(-1) > rtol * db.amax(-1)) & (da.amin(-1) > rtol * da.amax(-1))  # [L]
        ct = qa.dtype  # computation dtype of the QR (float32, or float64 for float64 adapters)
        qat, qbt = qa.mT, qb.mT  # Q_qr,Aᵀ [L, r, n], Q_qr,Bᵀ [L, r, m]
        old_qa, old_qb = old_qa.to(ct), old_qb.to(ct)
        At, Bt = At.to(ct), Bt.to(ct)
        r = At.shape[-2]
        # the small products every variant needs, one batched product per factor: Q_qrᵀ [factor | old basis]
        pb = qbt @ torch.cat([Bt, old_qb], -2).mT  # [L, r, 2r]: (R_B | Q_qr,Bᵀ Q_B)
        pa = qat @ torch.cat([At, old_qa], -2).mT  # [L, r, 2r]: (R_A | Q_qr,Aᵀ Q_A)
        rb_, ra_ = pb[..., :r], pa[..., :r]
        mb, ma = pb[..., r:], pa[..., r:]
        # basis similarity ‖Q_oldᵀ Q_new‖²/r depends only on the new span: the same for every align
        sim_a, sim_b = ma.pow(2).sum((-2, -1)) / r, mb.pow(2).sum((-2, -1)) / r
        if align != "qr":  # Procrustes: Q' = Q_qr·polar(Q_qrᵀ Q_old), the basis of the new span closest to the old
            rot_a, rot_b = polar_factor(torch.cat([ma, mb])).chunk(2)  # one batched SVD for both factors
            qat, qbt = rot_a.mT @ qat, rot_b.mT @ qbt
        dqa, dqb = qat - old_qa, qbt - old_qb  # (Q_A' − Q_A)ᵀ, (Q_B' − Q_B)ᵀ
        if align == "preserve":
            qb_b = rot_b.mT @ rb_  # Q_B'ᵀ B
            a_qa = ra_.mT @ rot_a  # A Q_A'
            new_a = torch.baddbmm(At, qb_b, dqa, alpha=-1)  # A − (Q_B'ᵀB)(Q_A' − Q_A)ᵀ
            new_bt = torch.baddbmm(Bt, a_qa.mT, dqb, alpha=-1)  # (B − (Q_B' − Q_B)(A Q_A'))ᵀ
            # ΔW' − ΔW = s[(Q_B' − Q_B) A (I − P_A') + (I − P_B') B (Q_A' − Q_A)ᵀ] for any bases (substitute A', B'):
            # two rank-r terms whose factors (I − P)·(factor) are round-off sized, so no cancellation in ct
            left = torch.cat([dqb, torch.baddbmm(Bt, qb_b.mT, qbt, alpha=-1)], -2)  # [L, 2r, m]
            right = torch.cat([torch.baddbmm(At, a_qa, qat, alpha=-1), dqa], -2)  # [L, 2r, n]
        else:  # ΔW' − ΔW = s[(Q_B' − Q_B)A + B(Q_A' − Q_A)ᵀ]
            left, right = torch.cat([dqb, Bt], -2), torch.cat([At, dqa], -2)
        jump2 = lowrank_fro2(left.mT, right.mT)
        # ‖ΔW/s‖² = ‖Q_B A + B Q_Aᵀ‖² = ‖A‖² + ‖B‖² + 2⟨Q_BᵀB, A Q_A⟩ (orthonormal old bases), from r×r blocks only:
        # B = Q_qr,B R_B and Aᵀ = Q_qr,A R_A, so ‖B‖ = ‖R_B‖, Q_BᵀB = (Q_qr,Bᵀ Q_B)ᵀ R_B, A Q_A = R_Aᵀ (Q_qr,Aᵀ Q_A)
        cross = ((mb.mT @ rb_) * (ra_.mT @ ma)).sum((-2, -1))
        norm2 = ra_.pow(2).sum((-2, -1)) + rb_.pow(2).sum((-2, -1)) + 2 * cross
        jump = (jump2.clamp_min(0) / norm2.clamp_min(1e-30)).sqrt().to(ct)
        keep = ok[:, None, None]
        # a rank-deficient layer keeps its bases; on the usual refresh every layer is fine and no selection is needed
        # (one host sync, which the Controller's finiteness check makes anyway)
        every = bool(ok.all())
        new_qa = qat if every else torch.where(keep, qat, old_qa)
        new_qb = qbt if every else torch.where(keep, qbt, old_qb)
        dst: list[torch.Tensor] = []
        src: list[torch.Tensor] = []
        results = [new_qa, new_qb]
        for layer in layers:
            dst += [layer.lora_QA, layer.lora_QB]
        src += [x for pair in zip(new_qa.unbind(0), new_qb.mT.unbind(0), strict=True) for x in pair]
        if align == "preserve":
            fa = new_a if every else torch.where(keep, new_a, At)
            fb = new_bt if every else torch.where(keep, new_bt, Bt)
            results += [fa, fb]
            for layer in layers:
                dst += [layer.lora_A, layer.lora_B]
            src += [x for pair in zip(fa.unbind(0), fb.mT.unbind(0), strict=True) for x in pair]
        require_finite(results, "an SDS-LoRA factor or basis would hold NaN/Inf values after the basis refresh "
                       f"(nothing was written). {NONFINITE_CAUSES}")
        torch._foreach_copy_(dst, src)  # one call for every layer (casts to each destination's dtype)
        return torch.stack([jump, sim_a, sim_b, ok.to(ct)], -1)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", decoupled={self.decoupled}"


class OrthogonalLayer(_TwoPhase):
    """Orthogonal-only ablation: ΔW = s (B A + O_B O_A) with B, A retracted to orthonormal at each refresh."""

    method = "orthogonal"

    def __init__(self, base_layer: nn.Module, r: int, scale: float, dropout: float, dtype: str, options: Any,
                 *, deferred: bool = False):
        super().__init__(base_layer, r, scale, dropout, dtype, options, deferred=deferred)
        dev = self.base_weight.device
        self.register_buffer(
            "lora_offset_A", torch.zeros(self.r, self.in_features, dtype=self.adapter_dtype, device=dev)
        )
        self.register_buffer(
            "lora_offset_B", torch.zeros(self.out_features, self.r, dtype=self.adapter_dtype, device=dev)
        )

    def _blocks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # ΔW = s (B A + O_B O_A) = s [B | O_B] [A ; O_A]
        return self.lora_B, self.lora_offset_B, self.lora_A, self.lora_offset_A

    @torch.no_grad()
    def reparameterise(self, reset_to_zero: bool, carry: bool = False) -> None:
        """Warm-up re-parameterisation; the optimizer state is always reset (``carry`` is SDS-only)."""
        A, B = self.lora_A, self.lora_B
        if self.decoupled:
            up, down = self._halves()
            left, right = up, down.T
        else:
            left, right = B, A.T
        u, s, v = svd_of_product(left, right, self.r)
        B.copy_(u)
        A.copy_(v.T)
        if reset_to_zero:  # ΔW back to 0: the offset cancels U Vᵀ
            self.lora_offset_B.copy_(-u)
        else:  # ΔW preserved: U Vᵀ + U (Σ − I) Vᵀ = U Σ Vᵀ
            self.lora_offset_B.copy_(u * (s - 1.0)[None, :])
        self.lora_offset_A.copy_(v.T)
        self._set_decoupled()

    @torch.no_grad()
    def refresh(self, rtol: float, align: str = "qr") -> list[torch.Tensor] | None:
        """QR retraction (``align`` is SDS-only: the retraction keeps the span)."""
        qb, db = qr_signfixed(self.lora_B)
        qa, da = qr_signfixed(self.lora_A.T)
        if bool((db.min() <= rtol * db.max()) | (da.min() <= rtol * da.max())):
            return None
        ct = qa.dtype
        A, B = self.lora_A.to(ct), self.lora_B.to(ct)
        up, down = self._halves()
        norm2 = lowrank_fro2(up.to(ct), down.to(ct).T)
        # jump = s (Q_B Q_Aᵀ − B A)
        jump2 = lowrank_fro2(torch.cat([qb, B], 1), torch.cat([qa.T, -A], 0).T)
        jump = (jump2.clamp_min(0) / norm2.clamp_min(1e-30)).sqrt()
        nan = torch.full((), float("nan"), device=jump.device)  # the retraction keeps the span: no basis drift
        sim_a, sim_b = nan, nan
        self.lora_A.copy_(qa.T)
        self.lora_B.copy_(qb)
        return [jump, sim_a, sim_b]
