"""Matrix-free curvature products and queries against dense ``torch.func`` references (float64)."""

import pytest
import torch
from torch import nn

from quicktrain import precond
from quicktrain.precond.curvature import output_sqrt


@pytest.mark.parametrize("loss", ["ce", "ce_ignore", "mse"])
def test_output_sqrt_exact_factorises_the_loss_hessian(loss, ref):
    logits = torch.randn(4, 3, dtype=torch.float64)
    if loss == "mse":
        fn, y = nn.MSELoss(), torch.randn(4, 3, dtype=torch.float64)
    else:
        fn = nn.CrossEntropyLoss(ignore_index=1 if loss == "ce_ignore" else -100)
        y = torch.tensor([0, 1, 2, 1])
    v = output_sqrt(fn, logits, y, "exact")  # [K, N, C]
    h = ref.loss_hessian(fn, logits, y)  # [N, C, N, C]
    for n in range(4):
        torch.testing.assert_close(v[:, n].T @ v[:, n], h[n, :, n, :])


def test_output_sqrt_mc_converges_to_exact():
    logits = torch.randn(2, 3, dtype=torch.float64)
    y = torch.tensor([0, 2])
    fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    mc = output_sqrt(fn, logits, y, "mc", n_samples=20000, generator=gen)
    ex = output_sqrt(fn, logits, y, "exact")
    for n in range(2):
        torch.testing.assert_close(mc[:, n].T @ mc[:, n], ex[:, n].T @ ex[:, n], atol=0.01, rtol=0.05)


def test_matvecs_equal_dense_references(case, ref):
    model, x, y = case["model"], case["x"], case["y"]
    fn = nn.CrossEntropyLoss()
    n = sum(p.numel() for p in model.parameters())
    v = torch.randn(n, dtype=torch.float64)
    if case["kind"] == "emb":  # the padding row is a constant for autograd (zero gradient), not for jacfwd
        v[: model.emb.embedding_dim] = 0
    ggn = ref.ggn(model, fn, x, y)
    torch.testing.assert_close(precond.ggn_vp(model, fn, x, y, v), ggn @ v)
    torch.testing.assert_close(precond.fisher_vp(model, fn, x, y, v, fisher_type="exact"), ggn @ v)
    torch.testing.assert_close(precond.hessian_vp(model, fn, x, y, v), ref.hessian(model, fn, x, y) @ v)


def test_ggn_vp_mse_and_ignore_index(ref):
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    for fn, y in ((nn.MSELoss(), torch.randn(4, 3, dtype=torch.float64)),
                  (nn.CrossEntropyLoss(ignore_index=2), torch.tensor([0, 2, 1, 2]))):
        torch.testing.assert_close(precond.ggn_vp(model, fn, x, y, v), ref.ggn(model, fn, x, y) @ v)


def test_empirical_fisher_vp_equals_per_example_outer_products(ref):
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    fn = nn.CrossEntropyLoss()
    pe = ref.per_example_grads(model, fn, x, y)  # [N, P]
    v = torch.randn(pe.shape[1], dtype=torch.float64)
    torch.testing.assert_close(precond.fisher_vp(model, fn, x, y, v, fisher_type="emp"), pe.T @ (pe @ v) / 4)


def test_batchnorm_buffers_unchanged_by_queries():
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    before = model[1].running_mean.clone()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    precond.hessian_vp(model, nn.CrossEntropyLoss(), x, y, torch.randn(55, dtype=torch.float64))
    torch.testing.assert_close(model[1].running_mean, before)


def test_top_eigenvalues_and_trace(ref):
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    fn = nn.CrossEntropyLoss()
    h = ref.hessian(model, fn, x, y)
    ev = torch.linalg.eigvalsh(h)
    top = ev[ev.abs().argsort(descending=True)[:2]]
    vals, vecs = precond.top_eigenvalues(model, fn, x, y, k=2, max_iters=500, tol=1e-10,
                                         generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(vals, top, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close((h @ vecs[:, 0]).abs(), (top[0] * vecs[:, 0]).abs(), rtol=1e-3, atol=1e-5)
    g = ref.ggn(model, fn, x, y)
    tr = precond.hutchinson_trace(model, fn, x, y, n_samples=400, curvature="ggn",
                                  generator=torch.Generator().manual_seed(0))
    assert abs(tr - torch.trace(g)) < 0.1 * torch.trace(g)


def test_unsupported_loss_and_fisher_type_raise():
    model = nn.Linear(3, 2)
    x, y = torch.randn(2, 3), torch.randn(2, 2)
    with pytest.raises(ValueError, match="not supported"):
        precond.ggn_vp(model, nn.L1Loss(), x, y, torch.zeros(8))
    with pytest.raises(ValueError, match="Unknown fisher_type"):
        precond.fisher_vp(model, nn.MSELoss(), x, y, torch.zeros(8), fisher_type="true")
