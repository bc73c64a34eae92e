"""Product aggregation maths: the QR route equals the dense sum and the dense SVD's truncation."""

import torch

from fedit import lowrank


def test_two_rank_one_products_by_hand():
    # 0.5 · 2 · [1,0]ᵀ[1,1] + 0.5 · 4 · [0,1]ᵀ[1,-1] = [[1, 1], [2, -2]]
    bs = [torch.tensor([[1.0], [0.0]]), torch.tensor([[0.0], [1.0]])]
    as_ = [torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, -1.0]])]
    w = [0.5 * 2, 0.5 * 4]
    expected = torch.tensor([[1.0, 1.0], [2.0, -2.0]], dtype=torch.float64)
    assert torch.equal(lowrank.dense_product(bs, as_, w), expected)
    u, s, vh = lowrank.product_svd(bs, as_, w)
    assert torch.allclose(u @ torch.diag(s) @ vh, expected, atol=1e-12)
    # its singular values by hand: rows are orthogonal, of norms √2 and √8
    assert torch.allclose(s, torch.tensor([8 ** 0.5, 2 ** 0.5], dtype=torch.float64))


def test_mixed_ranks_equal_the_dense_sum_and_its_truncation():
    g = torch.Generator().manual_seed(0)
    d, n, ranks = 40, 30, [2, 4, 8]
    bs = [torch.randn(d, r, generator=g) for r in ranks]
    as_ = [torch.randn(r, n, generator=g) for r in ranks]
    w = [0.2 * 16 / 2, 0.3 * 16 / 4, 0.5 * 16 / 8]  # p_k · s_k with alpha 16
    dense = lowrank.dense_product(bs, as_, w)
    u, s, vh = lowrank.product_svd(bs, as_, w)  # 14 < min(40, 30): the QR route
    assert u.shape == (d, 14) and vh.shape == (14, n)
    assert torch.allclose(u @ torch.diag(s) @ vh, dense, atol=1e-10)
    du, ds, dvh = torch.linalg.svd(dense)
    assert torch.allclose(s, ds[:14], atol=1e-10)
    for rank, scaling in [(4, 16 / 4), (8, 2.0), (16, 1.0)]:
        b, a = lowrank.truncate(u, s, vh, rank, scaling)
        k = min(rank, 14)
        best = du[:, :k] @ torch.diag(ds[:k]) @ dvh[:k]
        assert b.shape == (d, rank) and a.shape == (rank, n)
        assert torch.allclose(scaling * b @ a, best, atol=1e-9), rank
    # rank 16 > 14: the extra factor columns and rows are zero and the sum is reproduced exactly
    b, a = lowrank.truncate(u, s, vh, 16, 1.0)
    assert torch.equal(b[:, 14:], torch.zeros(d, 2, dtype=b.dtype)) and torch.allclose(b @ a, dense, atol=1e-10)


def test_the_dense_route_gives_the_same_truncation_once_the_stacked_rank_is_full():
    g = torch.Generator().manual_seed(1)
    bs = [torch.randn(12, 8, generator=g) for _ in range(3)]  # stacked rank 24 > min(12, 10)
    as_ = [torch.randn(8, 10, generator=g) for _ in range(3)]
    w = [0.5, 0.3, 0.2]
    auto = lowrank.product_svd(bs, as_, w)
    qr = lowrank.product_svd(bs, as_, w, route="qr")
    assert auto[0].shape == qr[0].shape == (12, 10)
    for r in (3, 10):
        b1, a1 = lowrank.truncate(*auto, r, 2.0)
        b2, a2 = lowrank.truncate(*qr, r, 2.0)
        assert torch.allclose(b1 @ a1, b2 @ a2, atol=1e-9)


def test_truncate_keeps_a_at_the_given_row_norm_by_hand():
    # ΔW / scaling has singular values 4 and 1 along the axes; scaling 2
    u, s, vh = torch.eye(3, 2, dtype=torch.float64), torch.tensor([4.0, 1.0], dtype=torch.float64), \
        torch.eye(2, 3, dtype=torch.float64)
    b, a = lowrank.truncate(u, s, vh, 2, 2.0, a_row_norm=0.5)
    # A = 0.5 · Vᵀ; B = U Σ / (2 · 0.5) = U Σ: the product 2 · B A = U Σ Vᵀ is unchanged
    assert torch.equal(a, 0.5 * vh) and torch.equal(b, u * torch.tensor([4.0, 1.0], dtype=torch.float64))
    # the balanced split puts √(σ / scaling) = √2 and √0.5 in both: A's rows at 1.41 and 0.71 instead of 0.5
    b0, a0 = lowrank.truncate(u, s, vh, 2, 2.0)
    assert torch.allclose(a0.norm(dim=1), torch.tensor([2 ** 0.5, 0.5 ** 0.5], dtype=torch.float64))
    assert torch.allclose(2 * b0 @ a0, 2 * b @ a)
    # rank 3 asked of a rank-2 sum: the extra row of A and column of B stay zero
    b3, a3 = lowrank.truncate(u, s, vh, 3, 2.0, a_row_norm=0.5)
    assert torch.equal(a3[2], torch.zeros(3, dtype=torch.float64)) and torch.equal(b3[:, 2], torch.zeros(3, dtype=torch.float64))


def test_rms_row_norm_by_hand():
    # rows [3, 4] and [0, 1] (the zero row is left out): √((25 + 1) / 2) = √13
    assert lowrank.rms_row_norm(torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 1.0]])) == 13 ** 0.5
    assert lowrank.rms_row_norm(torch.zeros(2, 3)) is None
