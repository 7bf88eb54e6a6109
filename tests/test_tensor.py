"""Tensor core: oracles (tensorly, numpy SVD), closed-form error, properties, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorly as tl
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensorly.decomposition import partial_tucker, tensor_ring, tensor_train

from tdcompress.tensor import (
    balanced_factorization,
    factorizations,
    lowrank_project,
    lowrank_svd,
    tr_clip_ranks,
    tr_project,
    tr_svd,
    tr_to_tensor,
    tt_clip_ranks,
    tt_max_ranks,
    tt_project,
    tt_ranks,
    tt_svd,
    tt_to_tensor,
    tucker,
    tucker_project,
    tucker_to_tensor,
)

tl.set_backend("pytorch")
METHODS = ["gram", "svd"]


def rand(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def random_tt(shape, ranks, seed=0):
    r = [1, *ranks, 1]
    return [rand(r[k], n, r[k + 1], seed=seed + k) for k, n in enumerate(shape)]


def numpy_tt_svd_discarded(x: np.ndarray, ranks: list[int]) -> float:
    """Independent oracle: TT-SVD in numpy, returns sqrt(sum of discarded sigma^2)."""
    shape, t, r_prev, disc = x.shape, x, 1, 0.0
    for k in range(len(shape) - 1):
        t = t.reshape(r_prev * shape[k], -1)
        u, s, vt = np.linalg.svd(t, full_matrices=False)
        r = min(ranks[k], len(s))
        disc += float((s[r:] ** 2).sum())
        t = s[:r, None] * vt[:r]
        r_prev = r
    return math.sqrt(disc)


# ---------------------------------------------------------------- TT
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape,rank", [((4, 5, 6, 7), 3), ((3, 8, 2, 5, 4), 2), ((9, 10), 4)])
def test_tt_matches_tensorly(shape, rank, method):
    x = rand(*shape)
    ours = tt_project(x, rank, method=method)
    tl_ranks = [1, *tt_clip_ranks(shape, rank), 1]
    theirs = tl.tt_to_tensor(tensor_train(x, tl_ranks))
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_tt_error_equals_discarded_singular_values(method):
    x = rand(6, 5, 7, 4, seed=3)
    ranks = [3, 6, 2]
    err = torch.linalg.vector_norm(x - tt_project(x, ranks, method=method)).item()
    assert err == pytest.approx(numpy_tt_svd_discarded(x.numpy(), ranks), rel=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", METHODS)
def test_tt_exact_for_low_rank_and_full_rank(dtype, method):
    shape, ranks = (5, 6, 7, 4), [2, 3, 2]
    x = tt_to_tensor(random_tt(shape, ranks)).to(dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    y = tt_project(x, ranks, method=method)
    assert torch.linalg.vector_norm(x - y) <= tol * torch.linalg.vector_norm(x)
    z = rand(*shape, dtype=dtype)
    assert torch.linalg.vector_norm(z - tt_project(z, None)) <= tol * torch.linalg.vector_norm(z)
    assert torch.linalg.vector_norm(z - tt_project(z, 10**6)) <= tol * torch.linalg.vector_norm(z)


def test_tt_projection_idempotent_and_ranks_bounded():
    x = rand(4, 6, 5, 3, seed=7)
    p = tt_project(x, [2, 4, 3])
    torch.testing.assert_close(tt_project(p, [2, 4, 3]), p, rtol=1e-9, atol=1e-10)
    assert all(a <= b for a, b in zip(tt_ranks(tt_svd(x, [2, 4, 3]))[1:-1], [2, 4, 3]))


def test_tt_rel_tol_meets_tolerance_with_small_ranks():
    x = tt_to_tensor(random_tt((6, 7, 8, 5), [3, 4, 2], seed=1))
    x = x + 1e-3 * rand(6, 7, 8, 5, seed=9) * x.norm() / math.sqrt(x.numel())
    for tol in (1e-1, 1e-2):
        cores = tt_svd(x, rel_tol=tol)
        err = torch.linalg.vector_norm(x - tt_to_tensor(cores)) / torch.linalg.vector_norm(x)
        assert err <= tol
    assert tt_ranks(tt_svd(x, rel_tol=1e-2)) == [1, 3, 4, 2, 1]


def test_gram_falls_back_to_svd_on_ill_conditioned_kept_spectrum():
    # singular values spanning 1 .. 1e-7 at float32: the Gram matrix cannot resolve them
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(50, 12, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(60, 12, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -7, 12, dtype=torch.float64)
    m = ((u * s) @ v.T).float()
    ref = lowrank_project(m, 10, method="svd")
    got = lowrank_project(m, 10, method="gram")
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_input_not_mutated_and_half_precision():
    x = rand(4, 5, 6, dtype=torch.float32)
    before = x.clone()
    tt_project(x, 2)
    tr_project(x, 2)
    tucker_project(x, 2)
    assert torch.equal(x, before)
    h = x.to(torch.bfloat16)
    p = tt_project(h, 100)
    assert p.dtype == torch.bfloat16
    torch.testing.assert_close(p.float(), h.float(), rtol=2e-2, atol=2e-2)


def test_shape_tensorizes_and_projection_keeps_input_shape():
    w = rand(12, 20)
    cores = tt_svd(w, 3, shape=(3, 4, 4, 5))
    assert [c.shape[1] for c in cores] == [3, 4, 4, 5]
    p = tt_project(w, 3, shape=(3, 4, 4, 5))
    assert p.shape == w.shape
    torch.testing.assert_close(p, tt_to_tensor(cores).reshape(12, 20))
    torch.testing.assert_close(tt_project(w, 100, shape=(3, 4, 4, 5)), w)
    assert tr_project(w, 2, shape=(12, 20)).shape == (12, 20)


def test_max_ranks_and_clip():
    assert tt_max_ranks((4, 5, 6)) == [4, 6]
    assert tt_clip_ranks((4, 5, 6), 100) == [4, 6]
    assert tt_clip_ranks((2, 3, 4, 5), [10, 1, 10]) == [2, 1, 4]


# ---------------------------------------------------------------- TR
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ranks", [[2, 2, 10, 7], [2, 2, 3, 3], [1, 3, 4, 2]])
def test_tr_matches_tensorly(ranks, method):
    x = rand(4, 5, 6, 7, seed=2)
    ours = tr_project(x, ranks, method=method)
    theirs = tl.tr_to_tensor(tensor_ring(x, [*tr_clip_ranks(x.shape, ranks), ranks[0]]))
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)


def test_tr_properties():
    # TR-SVD is not idempotent for r_0 > 1 (the r_0 x r_1 split of the first factor is a
    # gauge choice), but with r_0 = 1 the ring is a train and must equal TT-SVD exactly.
    shape = (6, 5, 6, 5)
    x = rand(*shape, seed=11)
    torch.testing.assert_close(tr_project(x, [1, 3, 4, 2]), tt_project(x, [3, 4, 2]))
    low = tt_to_tensor(random_tt(shape, [3, 4, 2]))
    torch.testing.assert_close(tr_project(low, [1, 3, 4, 2]), low, rtol=1e-9, atol=1e-9)
    # full ranks reproduce the tensor; the ring closes with the requested r_0
    torch.testing.assert_close(tr_project(x, [2, 3, 15, 10]), x, rtol=1e-9, atol=1e-9)
    got = tr_svd(x, [2, 3, 2, 2])
    assert [c.shape[0] for c in got] == [2, 3, 2, 2] and got[-1].shape[2] == 2


@pytest.mark.parametrize("method", METHODS)
def test_tr_of_a_tall_float32_unfolding_is_exact_at_full_rank(method):
    # a first unfolding (300 x 9) taller than wide takes the Gram path that needs singular
    # vectors (U = M V / s); with a spectrum spanning 1e6 the float64 eigenvectors must not
    # be rounded to float32 before that product (the error was 5e-3 when they were)
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(300, 9, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(9, 9, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -6, 9, dtype=torch.float64)
    x = ((u * s) @ v.T).float().reshape(300, 3, 3)
    cores = tr_svd(x, [3, 3, 9], method=method)  # r0 * r1 = 9: full rank, exact
    err = (tr_to_tensor(cores).double() - x.double()).norm() / x.double().norm()
    assert err < 1e-6


# ---------------------------------------------------------------- Tucker
def test_tucker_hooi_matches_tensorly_partial_tucker():
    w = rand(8, 6, 3, 3, seed=4)
    (core, f), _ = partial_tucker(w, [3, 2], modes=[0, 1], n_iter_max=300, tol=1e-15)
    theirs = tl.tenalg.multi_mode_dot(core, f, modes=[0, 1])
    ours = tucker_project(w, [3, 2], modes=(0, 1), n_iter=300)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    err = torch.linalg.vector_norm(w - ours)
    assert err.item() == pytest.approx(torch.linalg.vector_norm(w - theirs).item(), rel=1e-9)


def test_tucker_properties():
    w = rand(8, 6, 3, 3, seed=5)
    core, factors = tucker(w, [3, 2], modes=(0, 1))
    assert core.shape == (3, 2, 3, 3)
    for f in factors:
        torch.testing.assert_close(f.T @ f, torch.eye(f.shape[1], dtype=f.dtype))
    # HOOI never increases the error of HOSVD
    e0 = torch.linalg.vector_norm(w - tucker_to_tensor(core, factors, (0, 1)))
    e1 = torch.linalg.vector_norm(w - tucker_project(w, [3, 2], (0, 1), n_iter=5))
    assert e1 <= e0 + 1e-12
    # exact on multilinear-rank (3, 2) data; full rank is exact
    x = tucker_to_tensor(rand(3, 2, 3, 3, seed=1), [rand(8, 3, seed=2), rand(6, 2, seed=3)], (0, 1))
    torch.testing.assert_close(tucker_project(x, [3, 2], (0, 1)), x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(tucker_project(w, [8, 6], (0, 1)), w, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- low rank
@pytest.mark.parametrize("shape", [(7, 12), (12, 7), (3, 9, 5)])
def test_lowrank_eckart_young(shape):
    x = rand(*shape, seed=8)
    r = 3
    p = lowrank_project(x, r)
    s = torch.linalg.svdvals(x)
    err = torch.linalg.matrix_norm(x - p)
    torch.testing.assert_close(err, s[..., r:].square().sum(-1).sqrt())
    assert (torch.linalg.matrix_rank(p) <= r).all()
    a, b = lowrank_svd(x, r, balanced=True)
    torch.testing.assert_close(a @ b, p)
    torch.testing.assert_close(torch.linalg.matrix_norm(a), torch.linalg.matrix_norm(b))


# ---------------------------------------------------------------- factorize
def test_factorizations():
    assert factorizations(12, 2) == [(1, 12), (2, 6), (3, 4)]
    assert all(math.prod(t) == 360 for t in factorizations(360, 3))
    assert len(set(factorizations(360, 3))) == len(factorizations(360, 3))
    assert balanced_factorization(800, 3) == (8, 10, 10)
    assert balanced_factorization(64, 3) == (4, 4, 4)
    assert balanced_factorization(13, 2) == (1, 13)
    with pytest.raises(ValueError, match="n must be a positive int"):
        factorizations(0, 2)


# ---------------------------------------------------------------- hypothesis
@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=2, max_size=6),
    rank=st.integers(1, 6),
    seed=st.integers(0, 1000),
)
def test_tt_properties_random(shape, rank, seed):
    x = rand(*shape, seed=seed)
    cores = tt_svd(x, rank)
    p = tt_to_tensor(cores)
    ranks = tt_clip_ranks(shape, rank)
    assert tt_ranks(cores) == [1, *ranks, 1]
    assert all(r <= rank for r in ranks)
    err = torch.linalg.vector_norm(x - p).item()
    assert err == pytest.approx(numpy_tt_svd_discarded(x.numpy(), ranks), rel=1e-7, abs=1e-9)
    # quasi-optimality bound and idempotence
    assert err <= math.sqrt(len(shape) - 1) * torch.linalg.vector_norm(x).item() + 1e-9
    torch.testing.assert_close(tt_project(p, rank), p, rtol=1e-7, atol=1e-8)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(2, 5), min_size=2, max_size=5),
    rank=st.integers(1, 3),
    seed=st.integers(0, 1000),
)
def test_tr_and_tucker_properties_random(shape, rank, seed):
    x = rand(*shape, seed=seed)
    p = tr_project(x, rank)
    assert torch.linalg.vector_norm(x - p) <= torch.linalg.vector_norm(x) + 1e-9
    q = tucker_project(x, rank)
    torch.testing.assert_close(tucker_project(q, rank), q, rtol=1e-7, atol=1e-8)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "call,exc,msg",
    [
        (lambda x: tt_svd(x, 0), ValueError, "ranks must be an integer >= 1"),
        (lambda x: tt_svd(x, 2.5), TypeError, "ranks must be an integer"),
        (lambda x: tt_svd(x, [2, 2]), ValueError, "ranks must have 3 entries"),
        (lambda x: tt_svd(x, [2, 0, 2]), ValueError, r"ranks\[1\]"),
        (lambda x: tt_svd(x.int(), 2), TypeError, "real floating dtype"),
        (lambda x: tt_svd(x.to(torch.complex64), 2), TypeError, "real floating dtype"),
        (lambda x: tt_svd(x.clone().fill_(float("nan")), 2), ValueError, "NaN or Inf"),
        (lambda x: tt_project(x, 2, rel_tol=2.0), ValueError, "rel_tol"),
        (lambda x: tt_svd(x, 2, method="qr"), ValueError, "method must be one of"),
        (lambda x: tt_svd(x.numpy(), 2), TypeError, "x must be a torch.Tensor"),
        (lambda x: tr_svd(x, [1, 2]), ValueError, "ranks must have 4 entries"),
        (lambda x: tucker(x, 2, modes=(0, 7)), ValueError, "modes must be ints"),
        (lambda x: tt_svd(x, 2, shape=(5, 5)), ValueError, r"shape \[5, 5\] has 25 entries"),
        (lambda x: tr_project(x, 2, shape=(4, 4, 7)), ValueError, "product of shape"),
        (lambda x: lowrank_svd(x, True), TypeError, "rank must be an integer"),
    ],
)
def test_bad_input(call, exc, msg):
    x = rand(3, 4, 5, 2)
    with pytest.raises(exc, match=msg):
        call(x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_finite_half_precision_values_are_accepted(dtype):
    # 16 x 16 entries of 300 sum to 76,800: beyond float16's range (65,504), yet finite
    x = torch.full((16, 16), 300.0, dtype=dtype)
    A, B = lowrank_svd(x, 1)
    torch.testing.assert_close((A.float() @ B.float()), x.float(), rtol=1e-2, atol=0)
    assert len(tt_svd(x, 1)) == 2
    with pytest.raises(ValueError, match="NaN or Inf"):
        lowrank_svd(x.clone().fill_(float("inf")), 1)


def test_factors_never_share_memory_with_the_input():
    # steps that truncate nothing return their input matrix as a factor: it must be a copy
    for fn in (lambda x: tt_svd(x, 5), lambda x: lowrank_svd(x, 3)):
        x = rand(3, 5)
        before = x.clone()
        for f in fn(x):
            f.mul_(0)
        assert torch.equal(x, before)


def test_cores_must_chain():
    with pytest.raises(ValueError, match="left rank"):
        tt_to_tensor([rand(1, 2, 3), rand(2, 2, 1)])
    with pytest.raises(ValueError, match="must close"):
        tr_to_tensor([rand(2, 2, 3), rand(3, 2, 1)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = rand(6, 7, 8, dtype=torch.float32)
    torch.testing.assert_close(
        tt_project(x.cuda(), 3).cpu(), tt_project(x, 3), rtol=1e-4, atol=1e-4
    )
