"""Sums of low-rank products without the dense matrix: the maths of product aggregation (FlexLoRA).

A client k of rank r_k with LoRA factors B_k (d × r_k), A_k (r_k × n) and scaling s_k changed a
weight by s_k · B_k A_k. The exact weighted mean of those changes, ΔW = Σ_k p_k s_k B_k A_k, has rank
at most R = Σ_k r_k, so its SVD comes from thin QR factorisations of the stacked factors:

    B = [p_1 s_1 B_1, ..., p_K s_K B_K]   (d × R)      A = [A_1; ...; A_K]   (R × n)
    B = Q_b R_b,  Aᵀ = Q_a R_a,  R_b R_aᵀ = U Σ Vᵀ   =>   ΔW = (Q_b U) Σ (Q_a V)ᵀ

at O((d + n) R²) instead of the O(d n min(d, n)) of a dense SVD, and without the d × n matrix (for a
4096 × 11008 module and five rank-16 clients: 80 columns instead of 45 M entries). Truncating to rank r
gives the rank-r product closest to ΔW in Frobenius norm (Eckart–Young), to be used with scaling s.

How it is split between the factors does not change the product but does change training from it:
an AdamW step moves every coordinate of A and B by about lr, so the next step changes s·B·A by about
s·(δB·A + B·δA), in proportion to the factors' sizes. The balanced split, B' = Q_b U_r √Σ_r / √s and
A' = √Σ_r (Q_a V_r)ᵀ / √s, gives A rows of norm √(σ/s), far below LoRA's init for the small ΔW of
a few rounds, and the next step's effect on ΔW shrinks with them: an effective learning-rate cut. In a
synthetic check (a 576 × 576 module at r = 8, alpha 16; four clients of three sign-like AdamW steps at
lr 5e-4 from the init; the next step on a fresh gradient) A's rows fell from 0.59 to 0.12 in RMS norm
and the next step changed ΔW 3.4 times less than from the averaged factors. ``a_row_norm = ρ`` keeps A
at a given scale instead: A' = ρ (Q_a V_r)ᵀ (orthonormal rows times ρ), B' = Q_b U_r Σ_r / (s ρ); with
ρ the clients' A scale the same check's next step is within 0.3% of the averaged factors'.
"""

from __future__ import annotations

import torch


def product_svd(bs: list[torch.Tensor], as_: list[torch.Tensor], weights: list[float],
                route: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of Σ_k weights[k] · bs[k] @ as_[k], in float64.

    ``qr``: from QR of the stacked factors; U is d × R, S has R values (descending), Vh is R × n,
    R = Σ_k rank_k, and nothing d × n is formed. ``dense``: the d × n sum and its thin SVD. ``auto``
    takes QR while R < min(d, n), where it is the cheaper one (a 4096 × 11008 module and five rank-16
    clients); once the stacked rank reaches min(d, n) (a hundred clients on a small model's modules)
    the sum has full rank anyway and the dense route costs less."""
    d, n = bs[0].shape[0], as_[0].shape[1]
    if route == "dense" or (route == "auto" and sum(bk.shape[1] for bk in bs) >= min(d, n)):
        return torch.linalg.svd(dense_product(bs, as_, weights), full_matrices=False)
    b = torch.cat([w * bk.double() for w, bk in zip(weights, bs)], dim=1)
    a = torch.cat([ak.double() for ak in as_], dim=0)
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    return qb @ u, s, vh @ qa.T


def truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, scaling: float,
             a_row_norm: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The LoRA pair (B, A) of rank ``rank`` with scaling · B @ A the best rank-``rank`` approximation.

    ``a_row_norm``: every row of A has that norm (A = ρ Vᵀ, B = U Σ / (scaling ρ)); None: √σ in both
    (the balanced split). When the sum has lower rank than asked, the extra columns of B and rows of A
    are zero."""
    k = min(rank, s.numel())
    b = torch.zeros(u.shape[0], rank, dtype=u.dtype)
    a = torch.zeros(rank, vh.shape[1], dtype=vh.dtype)
    sig = s[:k].clamp_min(0)
    if a_row_norm:
        a[:k] = a_row_norm * vh[:k]
        b[:, :k] = u[:, :k] * (sig / (scaling * a_row_norm))
    else:
        root = sig.sqrt() / scaling ** 0.5
        b[:, :k] = u[:, :k] * root
        a[:k] = root[:, None] * vh[:k]
    return b, a


def rms_row_norm(a: torch.Tensor) -> float | None:
    """√(mean ‖row‖²) over the rows of ``a`` that are not zero; None if all are."""
    sq = a.double().pow(2).sum(dim=1)
    sq = sq[sq > 0]
    return float(sq.mean().sqrt()) if sq.numel() else None


def dense_product(bs: list[torch.Tensor], as_: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ_k weights[k] · bs[k] @ as_[k] as a dense d × n matrix: for tests and the benchmark only."""
    return sum(w * bk.double() @ ak.double() for w, bk, ak in zip(weights, bs, as_))
