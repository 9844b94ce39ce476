"""Layout, vec convention and the Gram / pre-activation identities against dense torch.kron."""

import pytest
import torch

from quicktrain.kron._math import gram_matrix, kron_rows, preactivations, shifted_relu

DIMS = [(3,), (3, 4), (2, 3, 4), (5, 1, 2)]


def _factors(dims, n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, k, generator=g, dtype=torch.float64) for k in dims]


@pytest.mark.parametrize("dims", DIMS, ids=str)
def test_kron_rows_match_torch_kron(dims):
    fs = _factors(dims)
    x = kron_rows(fs)
    for i in range(fs[0].shape[0]):
        ref = fs[0][i]
        for f in fs[1:]:
            ref = torch.kron(ref, f[i])
        torch.testing.assert_close(x[i], ref, rtol=0, atol=0)


def test_vec_convention():
    """(A⊗B) vec(V) = vec(B V Aᵀ) with column-major vec, and ⟨w, u⊗v⟩ = uᵀ W v with W = w.reshape(d1, d2)."""
    g = torch.Generator().manual_seed(1)
    a, b = (
        torch.randn(3, 4, generator=g, dtype=torch.float64),
        torch.randn(5, 2, generator=g, dtype=torch.float64),
    )
    v = torch.randn(2, 4, generator=g, dtype=torch.float64)

    def vec(mat):
        return mat.T.reshape(-1)

    torch.testing.assert_close(torch.kron(a, b) @ vec(v), vec(b @ v @ a.T))
    u, vv = torch.randn(4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    w = torch.randn(24, dtype=torch.float64)
    torch.testing.assert_close(w @ torch.kron(u, vv), u @ w.reshape(4, 6) @ vv)
    # torch.kron(u, v) is the row-major flattening of u vᵀ, i.e. column-major vec(v uᵀ)
    torch.testing.assert_close(torch.kron(u, vv), torch.outer(u, vv).reshape(-1))
    torch.testing.assert_close(torch.kron(u, vv), vec(torch.outer(vv, u)))


@pytest.mark.parametrize("dims", DIMS, ids=str)
def test_gram_matches_dense(dims):
    fs = _factors(dims)
    x = kron_rows(fs)
    torch.testing.assert_close(gram_matrix(fs), x @ x.T, rtol=1e-12, atol=1e-12)
    rows = torch.tensor([4, 0, 4])
    torch.testing.assert_close(gram_matrix(fs, rows), (x @ x.T)[rows], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dims", DIMS, ids=str)
def test_preactivations_match_dense(dims):
    fs = _factors(dims)
    x = kron_rows(fs)
    w = torch.randn(6, x.shape[1], dtype=torch.float64)
    torch.testing.assert_close(preactivations(w, fs), w @ x.T, rtol=1e-12, atol=1e-12)


def test_shifted_relu():
    z = torch.tensor([-1.0, 0.5, 1.0, 3.0])
    torch.testing.assert_close(shifted_relu(z, 1.0), torch.tensor([0.0, 0.0, 0.0, 2.0]))
