"""Diversity measures and post-processing of predicted weights, against independent references."""

import math

import pytest
import torch

from quicktrain.ghn.postprocess import distinct_filters, effective_rank, flatten_spectrum, orthogonalize


def test_effective_rank_matches_the_entropy_of_known_singular_values():
    assert effective_rank(torch.eye(6)) == pytest.approx(6.0, rel=1e-5)
    assert effective_rank(torch.outer(torch.arange(1.0, 5), torch.ones(7))) == pytest.approx(1.0, rel=1e-4)
    # singular values 3, 1 (orthogonal rows): p = (3/4, 1/4)
    w = torch.tensor([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    p = torch.tensor([0.75, 0.25])
    assert effective_rank(w) == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-5)
    # a conv weight counts its filters as rows of [out, in * kh * kw]
    assert effective_rank(torch.eye(4).reshape(4, 1, 2, 2)) == pytest.approx(4.0, rel=1e-5)


def test_distinct_filters_counts_near_copies_after_centring():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=g)
    assert distinct_filters(w) == 1.0
    w[3] = 2 * w[5] + 0.7  # a scaled copy with an offset: still a copy after centring
    assert distinct_filters(w) == pytest.approx(1 - 2 / 8)


def _gram_schmidt(m: torch.Tensor) -> torch.Tensor:
    """Classical Gram-Schmidt on the columns, float64: the Q of the QR with a positive diagonal of R."""
    q = torch.zeros_like(m)
    for j in range(m.shape[1]):
        v = m[:, j] - q[:, :j] @ (q[:, :j].t() @ m[:, j])
        q[:, j] = v / v.norm()
    return q


@pytest.mark.parametrize("shape", [(6, 20), (20, 6), (8, 3, 3, 3)])
def test_orthogonalize_is_the_qr_factor_at_the_input_norm(shape):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    out = orthogonalize(w)
    assert out.shape == w.shape and out.dtype == w.dtype
    m = w.reshape(shape[0], -1)
    wide = m.shape[0] < m.shape[1]
    ref = _gram_schmidt(m.t() if wide else m)
    ref = (ref.t() if wide else ref) * m.norm() / math.sqrt(min(m.shape))
    torch.testing.assert_close(out.reshape(m.shape), ref, rtol=1e-6, atol=1e-8)
    assert float(out.norm()) == pytest.approx(float(w.norm()), rel=1e-9)
    assert effective_rank(out) == pytest.approx(min(m.shape), rel=1e-6)


def test_flatten_spectrum_interpolates_toward_the_polar_factor():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(5, 12, generator=g, dtype=torch.float64) * torch.tensor([4.0, 2, 1, 0.5, 0.1]).double()[:, None]
    torch.testing.assert_close(flatten_spectrum(w, 0.0), w)
    # alpha = 1: the polar factor (W W^T)^(-1/2) W, scaled to ||W||_F
    e, v = torch.linalg.eigh(w @ w.t())
    polar = (v * e.rsqrt()) @ v.t() @ w
    torch.testing.assert_close(flatten_spectrum(w, 1.0), polar * w.norm() / polar.norm())
    # in between: singular values (1 - a) s + a ||s|| / sqrt(k), rescaled to ||s||; vectors kept (W'W^T symmetric)
    s = torch.linalg.svdvals(w)
    s_ref = 0.5 * s + 0.5 * s.norm() / math.sqrt(5)
    s_ref = s_ref * s.norm() / s_ref.norm()
    out = flatten_spectrum(w, 0.5)
    torch.testing.assert_close(torch.linalg.svdvals(out), s_ref)
    torch.testing.assert_close(out @ w.t(), (out @ w.t()).t())
    assert effective_rank(w) < effective_rank(out) < effective_rank(flatten_spectrum(w, 1.0))
    with pytest.raises(ValueError, match="alpha must be in"):
        flatten_spectrum(w, 1.5)
