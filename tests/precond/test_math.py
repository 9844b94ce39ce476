"""Pure tensor functions of ``_math`` against dense float64 definitions."""

import torch

from quicktrain.precond import _math


def _spd(d: int, batch: tuple = ()) -> torch.Tensor:
    m = torch.randn(*batch, d, d + 2, dtype=torch.float64)
    return m @ m.transpose(-1, -2) / d


def test_kron_matmul_matches_dense_kron_with_column_major_vec():
    a, g, v = _spd(3), _spd(4), torch.randn(4, 3, dtype=torch.float64)
    dense = torch.kron(a, g) @ v.T.reshape(-1)  # vec stacks columns
    out = _math.kron_matmul(a[None], g[None], v[None])[0]
    torch.testing.assert_close(out.T.reshape(-1), dense)


def test_damped_inverses_equal_dense_inverse():
    m = _spd(5, (2,))
    ref = torch.linalg.inv(m + 0.3 * torch.eye(5, dtype=torch.float64))
    torch.testing.assert_close(_math.damped_cholesky_inverse(m, 0.3), ref)
    torch.testing.assert_close(_math.damped_eigh_inverse(m, 0.3), ref)


def test_float32_cholesky_inverse_with_per_group_damping_matches_float64():
    m = _spd(40, (3,))
    lam = torch.tensor([0.1, 0.01, 0.001], dtype=torch.float64).view(3, 1, 1)
    ref = torch.linalg.inv(m + lam * torch.eye(40, dtype=torch.float64))
    out = _math.damped_cholesky_inverse(m.float(), lam.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def _indefinite(d: int, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A matrix whose smallest eigenvalue is ``-2λ`` (round-off beyond the damping) and the inverse the
    clamped eigendecomposition defines: ``U diag(1/max(s + λ, λ)) U^T``."""
    u, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    s = torch.linspace(1.0, 2.0, d, dtype=torch.float64)
    s[0] = -2 * lam
    m = (u * s) @ u.T
    return m, (u / torch.clamp_min(s + lam, lam)) @ u.T


def test_cholesky_inverse_falls_back_to_clamped_eigh_only_where_it_fails():
    lam = 1e-3
    bad, bad_ref = _indefinite(6, lam)
    good = _spd(6)
    m = torch.stack([good, bad]).float()
    out = _math.damped_cholesky_inverse(m, lam)
    torch.testing.assert_close(out[1].double(), bad_ref, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(out[0].double(), torch.linalg.inv(good + lam * torch.eye(6, dtype=torch.float64)),
                               rtol=1e-4, atol=1e-4)
    chol = _math.damped_cholesky(bad.float(), lam).double()
    torch.testing.assert_close(torch.cholesky_inverse(chol), bad_ref, rtol=1e-4, atol=1e-3)


def test_matrix_power_is_inverse_fourth_root():
    m = _spd(4)
    root = _math.matrix_power(m, -0.25, 1e-3)
    damped = m + 1e-3 * torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(torch.linalg.matrix_power(root, 4) @ damped, torch.eye(4, dtype=torch.float64))


def test_smw_solve_equals_dense_solve():
    u = torch.randn(3, 7, dtype=torch.float64)
    v = torch.randn(7, 2, dtype=torch.float64)
    ref = torch.linalg.solve(u.T @ u + 0.1 * torch.eye(7, dtype=torch.float64), v)
    torch.testing.assert_close(_math.smw_solve(u, v, 0.1), ref)


def test_cg_solve_equals_dense_solve_and_rejects_indefinite():
    m = _spd(6) + 0.1 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    x, it = _math.cg_solve(lambda v: m @ v, b, max_iters=50, tol=1e-12)
    torch.testing.assert_close(x, torch.linalg.solve(m, b))
    assert it <= 7
    try:
        _math.cg_solve(lambda v: -v, b, max_iters=5, tol=1e-12)
    except ValueError as e:
        assert "damping" in str(e)
    else:
        raise AssertionError("indefinite matrix accepted")


def test_kfac_factors_match_loops():
    a = torch.randn(3, 2, 1, 4, dtype=torch.float64)
    g = torch.randn(6, 2, 1, 5, dtype=torch.float64)
    fa, fg = _math.kfac_factors(a, g, 3)
    ra = sum(torch.outer(a[n, j, 0], a[n, j, 0]) for n in range(3) for j in range(2)) / 3
    rg = sum(torch.outer(g[n, j, 0], g[n, j, 0]) for n in range(6) for j in range(2)) / 2
    torch.testing.assert_close(fa[0], ra)
    torch.testing.assert_close(fg[0], rg)


def test_kron_sandwich_grad_equals_the_product_with_the_concatenated_gradient():
    from torch import nn

    from quicktrain.precond.representations import kron_grad_matrix, kron_sandwich_grad

    torch.manual_seed(0)
    for layer in (nn.Linear(5, 3), nn.Conv2d(4, 6, 3, groups=2), nn.Linear(5, 3, bias=False)):
        layer = layer.double()
        for p in layer.parameters():
            p.grad = torch.randn_like(p)
        groups = getattr(layer, "groups", 1)
        mat = kron_grad_matrix(layer, layer.weight.grad, layer.bias.grad if layer.bias is not None else None)
        left, right = _spd(mat.shape[1], (groups,)), _spd(mat.shape[2], (groups,))
        expected = left @ mat @ right
        kron_sandwich_grad(layer, left, right)
        out = kron_grad_matrix(layer, layer.weight.grad, layer.bias.grad if layer.bias is not None else None)
        torch.testing.assert_close(out, expected)
        if layer.bias is not None:  # separate: the weight block of right only, the bias by left alone
            d = right.shape[-1] - 1
            w, b = expected[..., :-1].clone(), expected[..., -1:].clone()
            layer.weight.grad, layer.bias.grad = w.reshape(layer.weight.shape), b.reshape(layer.bias.shape)
            kron_sandwich_grad(layer, left, right[:, :d, :d], "separate")
            torch.testing.assert_close(kron_grad_matrix(layer, layer.weight.grad, layer.bias.grad),
                                       torch.cat([left @ w @ right[:, :d, :d], left @ b], dim=-1))
