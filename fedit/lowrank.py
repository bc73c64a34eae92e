"""Sums of low-rank products without the dense matrix: the maths of product aggregation (FlexLoRA).

A client k of rank r_k with LoRA factors B_k (d × r_k), A_k (r_k × n) and scaling s_k changed a
weight by s_k · B_k A_k. The exact weighted mean of those changes, ΔW = Σ_k p_k s_k B_k A_k, has rank
at most R = Σ_k r_k, so its SVD comes from thin QR factorisations of the stacked factors:

    B = [p_1 s_1 B_1, ..., p_K s_K B_K]   (d × R)      A = [A_1; ...; A_K]   (R × n)
    B = Q_b R_b,  Aᵀ = Q_a R_a,  R_b R_aᵀ = U Σ Vᵀ   =>   ΔW = (Q_b U) Σ (Q_a V)ᵀ

at O((d + n) R²) instead of the O(d n min(d, n)) of a dense SVD, and without the d × n matrix (for a
4096 × 11008 module and five rank-16 clients: 80 columns instead of 45 M entries). Truncating to rank r
and splitting √Σ between the factors gives the rank-r LoRA pair closest to ΔW in Frobenius norm
(Eckart–Young), to be used with scaling s: B' = Q_b U_r √Σ_r / √s, A' = √Σ_r (Q_a V_r)ᵀ / √s.
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


def truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The LoRA pair (B, A) of rank ``rank`` with scaling · B @ A the best rank-``rank`` approximation.

    When the sum has lower rank than asked, the extra columns of B and rows of A are zero."""
    k = min(rank, s.numel())
    root = s[:k].clamp_min(0).sqrt() / scaling ** 0.5
    b = torch.zeros(u.shape[0], rank, dtype=u.dtype)
    a = torch.zeros(rank, vh.shape[1], dtype=vh.dtype)
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vh[:k]
    return b, a


def dense_product(bs: list[torch.Tensor], as_: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ_k weights[k] · bs[k] @ as_[k] as a dense d × n matrix: for tests and the benchmark only."""
    return sum(w * bk.double() @ ak.double() for w, bk, ak in zip(weights, bs, as_))
