"""Each representation and solver against a dense float64 solve of the same damped matrix.

References come from ``torch.func`` (Jacobians, Hessians) and explicit loops, never from the package's hooks.
"""

import copy
import math

import pytest
import scipy.linalg
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from quicktrain import precond
from quicktrain.precond.curvature import output_sqrt
from quicktrain.precond.representations import EigenCorrectedKron

LAM = 0.1


def _step(name, model, x, y, **config):
    maker = precond.make(name, model, nn.CrossEntropyLoss(), damping=LAM, **config)
    model.zero_grad()
    maker.forward_backward(x, y)
    return maker, torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _offsets(model):
    out, i = {}, 0
    for n, p in model.named_parameters():
        out[n] = i
        i += p.numel()
    return out


def _blocks(model, kind):
    """Index sets of the blocks each representation keeps, from the dense layout of model.parameters()."""
    off, blocks = _offsets(model), []
    for mname, m in model.named_modules():
        own = dict(m.named_parameters(recurse=False))
        if not own:
            continue
        idx = {n: off[f"{mname}.{n}"] + torch.arange(p.numel()).view(p.shape) for n, p in own.items()}
        if kind == "layer":
            blocks.append(torch.cat([t.reshape(-1) for t in idx.values()]))
        elif kind == "diag":
            blocks += [t.reshape(1) for v in idx.values() for t in v.reshape(-1)]
        elif isinstance(m, (nn.Linear, nn.Conv2d)):  # unit = one output unit's weights and bias
            w = idx["weight"].reshape(idx["weight"].shape[0], -1)
            for o in range(w.shape[0]):
                blocks.append(torch.cat([w[o], idx["bias"][o:o + 1]]) if "bias" in idx else w[o])
        elif isinstance(m, nn.Embedding):  # unit = one token's row
            blocks += list(idx["weight"])
        else:  # norm layers: (weight, bias) of each unit
            blocks += [torch.stack([idx["weight"].reshape(-1)[u], idx["bias"].reshape(-1)[u]])
                       for u in range(idx["weight"].numel())]
    return blocks


def _block_solve(mat, g, blocks):
    out = torch.zeros_like(g)
    for b in blocks:
        sub = mat[b][:, b] + LAM * torch.eye(len(b), dtype=mat.dtype)
        out[b] = torch.linalg.solve(sub, g[b])
    return out


@pytest.mark.parametrize(("method", "kind"), [("full_ng", "full"), ("smw_ng", "full"), ("layerwise_ng", "layer"),
                                              ("unitwise_ng", "unit"), ("diag_ng", "diag")])
def test_natural_gradients_equal_dense_block_solves(method, kind, case, ref):
    model, x, y = case["model"], case["x"], case["y"]
    fn = nn.CrossEntropyLoss()
    ggn = ref.ggn(model, fn, x, y)  # exact Fisher = GGN for cross-entropy
    g = ref.grad(model, fn, x, y)
    _, out = _step(method, model, x, y, fisher_type="exact")
    n = g.numel()
    blocks = [torch.arange(n)] if kind == "full" else _blocks(model, kind)
    torch.testing.assert_close(out, _block_solve(ggn, g, blocks))


@pytest.mark.parametrize(("method", "kind"), [("layerwise_ng", "layer"), ("unitwise_ng", "unit"),
                                              ("diag_ng", "diag")])
def test_empirical_fisher_from_the_loss_backward_equals_dense_per_example_blocks(method, kind, case, ref):
    """The loss backward's gradients stand for √N times themselves; the scale is folded into the statistics."""
    model, x, y = case["model"], case["x"], case["y"]
    fn = nn.CrossEntropyLoss()
    rows = ref.per_example_grads(model, fn, x, y)  # ∇ℓ_n, [N, P]
    emp = rows.T @ rows / rows.shape[0]
    g = ref.grad(model, fn, x, y)
    _, out = _step(method, model, x, y, fisher_type="emp")
    torch.testing.assert_close(out, _block_solve(emp, g, _blocks(model, kind)))


def test_kfac_empirical_fisher_factors_of_a_linear_layer_equal_their_definition():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    h = torch.tanh(model[0](x)).detach().requires_grad_()
    out = model[2](h)
    per_example = torch.stack([torch.autograd.grad(nn.functional.cross_entropy(out[i:i + 1], y[i:i + 1]), out,
                                                   retain_graph=True)[0][i] for i in range(6)])  # ∂ℓ_n/∂out_n
    maker, _ = _step("kfac", model, x, y, fisher_type="emp", ema_decay=0.0)
    a = torch.cat([h.detach(), torch.ones(6, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(maker.reps["2"].A[0], a.T @ a / 6)
    torch.testing.assert_close(maker.reps["2"].G[0], per_example.T @ per_example / 6)


def test_smw_ng_empirical_equals_dense_per_example_solve(ref):
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    pe = ref.per_example_grads(model, nn.CrossEntropyLoss(), x, y)
    _, out = _step("smw_ng", model, x, y)
    f = pe.T @ pe / 4
    torch.testing.assert_close(out, torch.linalg.solve(f + LAM * torch.eye(f.shape[0], dtype=f.dtype),
                                                       pe.mean(0)))


@pytest.mark.parametrize("method", ["smw_ng", "seng"])
def test_smw_solves_with_the_current_rows_when_the_inverse_is_not_due(method, ref):
    """SMW keeps the rows, not an inverse: a curvature step between inverse steps must solve with the new rows
    (its cached factor belongs to them), and a plain step after it with the same rows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    fn = nn.CrossEntropyLoss()
    maker = precond.make(method, model, fn, damping=LAM, curvature_interval=2, inverse_interval=5)
    for step in range(4):
        x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
        if step % 2 == 0:
            rows = ref.per_example_grads(model, fn, x, y)
            blocks = _blocks(model, "layer") if method == "seng" else [torch.arange(rows.shape[1])]
        model.zero_grad()
        maker.forward_backward(x, y)
        out = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        f = rows.T @ rows / 4
        torch.testing.assert_close(out, _block_solve(f, ref.grad(model, fn, x, y), blocks))
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad


@pytest.mark.parametrize("layer", [0, 2])
def test_kfac_equals_exact_fisher_block_of_linear_layer_for_one_example(layer, ref):
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(1, 4, dtype=torch.float64), torch.randint(0, 3, (1,))
    maker, _ = _step("kfac", model, x, y, fisher_type="exact")
    rep = maker.reps[str(layer)]
    ggn = ref.ggn(model, nn.CrossEntropyLoss(), x, y)
    off, lin = _offsets(model), model[layer]
    o, i = lin.weight.shape
    # vec([W | b]) stacks columns: entry (r, c) sits at c * o + r
    idx = torch.cat([off[f"{layer}.weight"] + torch.arange(o * i).view(o, i), off[f"{layer}.bias"]
                     + torch.arange(o).view(o, 1)], dim=1).T.reshape(-1)
    torch.testing.assert_close(torch.kron(rep.A[0], rep.G[0]), ggn[idx][:, idx])


def test_kfac_update_equals_dense_kronecker_solve():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    model.zero_grad()
    nn.CrossEntropyLoss()(model(x), y).backward()
    g = [torch.cat([m.weight.grad, m.bias.grad[:, None]], 1) for m in (model[0], model[2])]
    for solver, pi in (("cholesky", False), ("eigen", False), ("cholesky", True)):
        maker, _ = _step("kfac", model, x, y, solver=solver, pi_damping=pi)
        for m, gm in zip((model[0], model[2]), g, strict=True):
            rep = maker.reps["0" if m is model[0] else "2"]
            eye = lambda d: torch.eye(d, dtype=torch.float64)  # noqa: E731
            a, gg = rep.A[0], rep.G[0]
            p = math.sqrt((torch.trace(a) / len(a)) / (torch.trace(gg) / len(gg))) if pi else 1.0
            damped = torch.kron(a + p * math.sqrt(LAM) * eye(gm.shape[1]), gg + math.sqrt(LAM) / p * eye(gm.shape[0]))
            ref = torch.linalg.solve(damped, gm.T.reshape(-1)).reshape(gm.shape[1], gm.shape[0]).T
            torch.testing.assert_close(torch.cat([m.weight.grad, m.bias.grad[:, None]], 1), ref)


@pytest.mark.parametrize("conv", [
    dict(kernel_size=3, stride=2, padding=1, dilation=2, groups=1),
    dict(kernel_size=3, stride=1, padding="same", dilation=2, groups=4),
    dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 0), dilation=1, groups=4),
    dict(kernel_size=3, stride=1, padding=0, dilation=(2, 1), groups=2),
])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_patches_equal_unfold_for_any_stride_dilation_padding_and_groups(conv, bias):
    from quicktrain.precond.capture import _conv_patch_mean, _kron_input

    layer = nn.Conv2d(4, 8, bias=bias, **conv).double()
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    padding = 2 if conv["padding"] == "same" else conv["padding"]  # dilation 2, kernel 3: 2 on each side
    cols = F.unfold(x, layer.kernel_size, layer.dilation, padding, layer.stride)  # [N, C*kh*kw, L]
    g = layer.groups
    ref = cols.view(2, g, -1, cols.shape[-1]).permute(0, 3, 1, 2)
    if bias:
        ref = torch.cat([ref, torch.ones(*ref.shape[:-1], 1, dtype=torch.float64)], dim=-1)
    torch.testing.assert_close(_kron_input(layer, x), ref)
    mean, positions = _conv_patch_mean(layer, x, bias)  # reduce's means, without the patches
    torch.testing.assert_close(mean, ref.mean(1, keepdim=True))
    assert positions == ref.shape[1]
    out = layer(x)  # the patches reproduce the convolution
    w = layer.weight.reshape(g, layer.out_channels // g, -1)
    if bias:
        w = torch.cat([w, layer.bias.reshape(g, -1, 1)], dim=-1)
    torch.testing.assert_close(torch.einsum("nlgi,goi->ngol", ref, w).reshape(out.shape), out)


@pytest.mark.parametrize("groups", [1, 2])  # one group: A from im2col columns, G from the gradients as recorded
@pytest.mark.parametrize("setting", ["expand", "reduce"])
@pytest.mark.parametrize("bias", [True, False])  # without bias, grouped patches take the im2col layout
def test_conv_kronecker_factors_equal_explicit_patches_and_output_gradients(bias, setting, groups):
    """KFC, and K-FAC-reduce for convolutions (Eschenhagen et al. 2023, eq. 12: mean patch, summed gradient)."""
    cin, cout = 4 // groups, 6 // groups  # per group
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=groups, bias=bias).double()
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(6 * 3 * 3, 3)).double()
    x, y = torch.randn(3, 4, 5, 5, dtype=torch.float64), torch.randint(0, 3, (3,))
    maker, _ = _step("kfac", model, x, y, fisher_type="exact", weight_sharing=setting, low_rank=False)
    rep = maker.reps["0"]
    # A: explicit patches per example, group and output location (channel-major, then kh, kw; then a 1)
    xp = F.pad(x, (1, 1, 1, 1))
    for grp in range(groups):
        rows = [torch.cat([xp[n, cin * grp:cin * (grp + 1), 2 * i:2 * i + 3, 2 * j:2 * j + 3].reshape(-1),
                           torch.ones(int(bias), dtype=torch.float64)])
                for n in range(3) for i in range(3) for j in range(3)]
        a = torch.stack(rows)
        if setting == "reduce":
            a = a.reshape(3, 9, -1).mean(1)
        torch.testing.assert_close(rep.A[grp], a.T @ a / 3)
    # G: output gradients of the exact Fisher's backward vectors, by torch.func.vjp on the conv output
    out = conv(x)
    head = lambda o: model[3](torch.tanh(o).flatten(1))  # noqa: E731
    logits, vjp = torch.func.vjp(head, out)
    vecs = output_sqrt(nn.CrossEntropyLoss(), logits, y, "exact")
    gs = torch.stack([vjp(v)[0] for v in vecs])  # [K, N, C, H, W]
    for grp in range(groups):
        gg = gs[:, :, cout * grp:cout * (grp + 1)].permute(0, 1, 3, 4, 2)  # [K, N, H, W, C/groups]
        if setting == "reduce":
            gg = gg.sum((2, 3)).reshape(-1, cout)
            torch.testing.assert_close(rep.G[grp], gg.T @ gg)
        else:
            gg = gg.reshape(-1, cout)
            torch.testing.assert_close(rep.G[grp], gg.T @ gg / 9)


def test_ekfac_scales_equal_their_definition_and_update_is_eigenbasis_solve(ref):
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    fn = nn.CrossEntropyLoss()
    model.zero_grad()
    fn(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    maker, _ = _step("ekfac", model, x, y, fisher_type="exact")
    j, logits = ref.jacobian(model, x)  # [N, C, P]
    vecs = output_sqrt(fn, logits, y, "exact")  # [K, N, C]
    pe = torch.einsum("knc,ncp->knp", vecs, j).reshape(-1, j.shape[-1])  # scaled per-example gradients
    off = _offsets(model)
    for layer in ("0", "2"):
        rep: EigenCorrectedKron = maker.reps[layer]
        w = model.get_submodule(layer).weight
        o, i = w.shape
        pw = pe[:, off[f"{layer}.weight"]:off[f"{layer}.weight"] + o * i].reshape(-1, o, i)
        pb = pe[:, off[f"{layer}.bias"]:off[f"{layer}.bias"] + o].reshape(-1, o, 1)
        mats = torch.cat([pw, pb], dim=2)
        ua, ug = rep.UA[0], rep.UG[0]
        torch.testing.assert_close(rep.S[0], ((ug.T @ mats @ ua) ** 2).sum(0))
        # eigenvectors are those of the K-FAC factors
        torch.testing.assert_close(ua @ torch.diag(torch.diagonal(ua.T @ rep.A[0] @ ua)) @ ua.T, rep.A[0])
        gm = torch.cat([grads[f"{layer}.weight"], grads[f"{layer}.bias"][:, None]], 1)
        basis = torch.kron(ua, ug)
        dense = basis @ torch.diag(rep.S[0].T.reshape(-1) + LAM) @ basis.T
        expect = torch.linalg.solve(dense, gm.T.reshape(-1)).reshape(i + 1, o).T
        got = torch.cat([model.get_submodule(layer).weight.grad, model.get_submodule(layer).bias.grad[:, None]], 1)
        torch.testing.assert_close(got, expect)


def test_skfac_equals_kfac_without_moving_average_on_linear_layers():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 3, (3,))
    _, a = _step("skfac", model, x, y, seed=3)
    _, b = _step("kfac", model, x, y, seed=3, ema_decay=0.0, pi_damping=False)
    torch.testing.assert_close(a, b)


def test_shampoo_two_steps_equal_fractional_powers():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    fn = nn.CrossEntropyLoss()
    maker = precond.make("shampoo", model, fn, damping=LAM)
    stats = {}
    for _ in range(2):
        x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
        model.zero_grad()
        fn(model(x), y).backward()
        plain = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        maker.forward_backward(x, y)
        for n, p in model.named_parameters():
            g = plain[n].reshape(plain[n].shape[0], -1)
            st = stats.setdefault(n, [0, 0])
            st[0] = st[0] + g @ g.T
            st[1] = st[1] + g.T @ g
            power = -0.25 if g.shape[1] > 1 else -0.5
            left = scipy.linalg.fractional_matrix_power((st[0] + LAM * torch.eye(g.shape[0])).numpy(), power)
            expect = torch.as_tensor(left.real) @ g
            if g.shape[1] > 1:
                right = scipy.linalg.fractional_matrix_power((st[1] + LAM * torch.eye(g.shape[1])).numpy(), power)
                expect = expect @ torch.as_tensor(right.real)
            torch.testing.assert_close(p.grad.reshape(g.shape), expect)
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad


def test_newton_equals_damped_hessian_solve_on_convex_model(ref):
    model = nn.Linear(4, 3).double()  # softmax regression: the Hessian is PSD
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    fn = nn.CrossEntropyLoss()
    h, g = ref.hessian(model, fn, x, y), ref.grad(model, fn, x, y)
    _, out = _step("newton", model, x, y)
    torch.testing.assert_close(out, torch.linalg.solve(h + LAM * torch.eye(h.shape[0], dtype=h.dtype), g))
    _, out = _step("newton_cg", model, x, y, curvature="hessian", cg_max_iters=200, cg_tol=1e-12)
    torch.testing.assert_close(out, torch.linalg.solve(h + LAM * torch.eye(h.shape[0], dtype=h.dtype), g))


def test_newton_cg_ggn_equals_damped_ggn_solve(case, ref):
    model, x, y = case["model"], case["x"], case["y"]
    fn = nn.CrossEntropyLoss()
    ggn, g = ref.ggn(model, fn, x, y), ref.grad(model, fn, x, y)
    _, out = _step("newton_cg", model, x, y, cg_max_iters=500, cg_tol=1e-13)
    torch.testing.assert_close(out, torch.linalg.solve(ggn + LAM * torch.eye(g.numel(), dtype=g.dtype), g))


def _curveball_reference(ggn, g, z):
    """``(Δz, z_new)`` of one CurveBall step from the dense damped GGN: minimise the quadratic model over
    ``span{z, Δz}`` by solving the 2×2 system of its coefficients (least-norm when ``z = 0``)."""
    a = ggn + LAM * torch.eye(g.numel(), dtype=g.dtype)
    dz = a @ z + g
    basis = torch.stack([z, dz], dim=1)  # [P, 2]
    coef = torch.linalg.lstsq(basis.T @ a @ basis, -(basis.T @ g)).solution
    return dz, basis @ coef


def test_curveball_steps_minimise_the_damped_ggn_model_over_momentum_and_step(case, ref):
    model, x, y = case["model"], case["x"], case["y"]
    fn = nn.CrossEntropyLoss()
    maker = precond.make("curveball", model, fn, damping=LAM)
    z = torch.zeros(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    for _ in range(3):  # the first step has z = 0; later ones use the momentum at the moved parameters
        ggn, g = ref.ggn(model, fn, x, y), ref.grad(model, fn, x, y)
        _, z = _curveball_reference(ggn, g, z)
        model.zero_grad()
        maker.forward_backward(x, y)
        out = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(out, -z)
        with torch.no_grad():
            for p in model.parameters():
                p -= p.grad  # SGD with lr=1 applies CurveBall's θ ← θ + z


def test_curveball_solves_least_squares():
    """On linear least squares the GGN is the exact Hessian and CurveBall, a tuned heavy ball on the true
    quadratic, reaches the damped minimiser."""
    torch.manual_seed(0)
    model = nn.Linear(5, 2).double()
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randn(40, 2, dtype=torch.float64)
    maker = precond.make("curveball", model, nn.MSELoss(), damping=1e-6)
    for _ in range(60):
        model.zero_grad()
        maker.forward_backward(x, y)
        with torch.no_grad():
            for p in model.parameters():
                p -= p.grad
    xa = torch.cat([x, torch.ones(40, 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(xa, y).solution  # [6, 2]
    torch.testing.assert_close(torch.cat([model.weight.T, model.bias[None]]), solution, atol=1e-5, rtol=1e-5)


def test_embedding_kronecker_factors_equal_token_counts_and_output_gradients():
    torch.manual_seed(0)
    emb = nn.Embedding(7, 4, padding_idx=0).double()
    head = nn.Sequential(nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)).double()
    model = nn.Sequential(emb, head)
    x, y = torch.randint(0, 7, (5, 3)), torch.randint(0, 3, (5,))
    maker, _ = _step("kfac", model, x, y, fisher_type="exact")
    rep = maker.reps["0"]
    counts = torch.stack([(x == v).sum() for v in range(7)]).double() / 5
    counts[0] = 0  # the padding row gets no gradient
    torch.testing.assert_close(rep.A, counts)
    out = emb(x)
    logits, vjp = torch.func.vjp(head, out)
    gs = torch.stack([vjp(v)[0] for v in output_sqrt(nn.CrossEntropyLoss(), logits, y, "exact")])  # [K, N, L, D]
    flat = gs.reshape(-1, 4)
    torch.testing.assert_close(rep.G, flat.T @ flat / 3)


def test_shampoo_on_a_conv_weight_contracts_every_axis_with_its_eighth_root():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), nn.Flatten(), nn.Linear(12, 2)).double()
    x, y = torch.randn(4, 2, 4, 4, dtype=torch.float64), torch.randint(0, 2, (4,))
    model.zero_grad()
    nn.CrossEntropyLoss()(model(x), y).backward()
    g = model[0].weight.grad.clone()
    model.zero_grad()
    precond.make("shampoo", model, nn.CrossEntropyLoss(), damping=LAM).forward_backward(x, y)
    expect = g
    for i in range(4):
        other = [j for j in range(4) if j != i]
        stat = torch.tensordot(g, g, dims=(other, other))
        root = scipy.linalg.fractional_matrix_power((stat + LAM * torch.eye(len(stat))).numpy(), -1 / 8)
        expect = torch.tensordot(expect, torch.as_tensor(root.real), dims=([0], [0]))
    torch.testing.assert_close(model[0].weight.grad, expect)


def test_kfac_separate_bias_is_preconditioned_by_the_output_factor_only():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    model.zero_grad()
    nn.CrossEntropyLoss()(model(x), y).backward()
    gw, gb = model[2].weight.grad.clone(), model[2].bias.grad.clone()
    maker, _ = _step("kfac", model, x, y, bias="separate", pi_damping=False)
    rep = maker.reps["2"]
    assert rep.A.shape == (1, 5, 5)
    eye = lambda d: torch.eye(d, dtype=torch.float64)  # noqa: E731
    a_inv = torch.linalg.inv(rep.A[0] + math.sqrt(LAM) * eye(5))
    g_inv = torch.linalg.inv(rep.G[0] + math.sqrt(LAM) * eye(3))
    torch.testing.assert_close(model[2].weight.grad, g_inv @ gw @ a_inv)
    torch.testing.assert_close(model[2].bias.grad, g_inv @ gb)


@pytest.mark.parametrize("loss", ["ce_ignore_index", "mse"])
def test_full_ng_honours_ignore_index_and_mse(loss, ref):
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    if loss == "mse":
        fn, y = nn.MSELoss(), torch.randn(4, 3, dtype=torch.float64)
    else:
        fn, y = nn.CrossEntropyLoss(ignore_index=2), torch.tensor([0, 2, 1, 2])
    ggn, g = ref.ggn(model, fn, x, y), ref.grad(model, fn, x, y)
    maker = precond.make("full_ng", model, fn, damping=LAM, fisher_type="exact")
    model.zero_grad()
    maker.forward_backward(x, y)
    out = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(out, torch.linalg.solve(ggn + LAM * torch.eye(g.numel(), dtype=g.dtype), g))


def _shampoo_block(gb, order):
    """Shampoo's first step on one block: each axis longer than 1 contracted with ``(G G^T + εI)^{-1/2k}``."""
    out = gb
    for i in range(gb.dim()):
        if gb.shape[i] == 1:
            out = out.movedim(0, -1)
            continue
        other = [j for j in range(gb.dim()) if j != i]
        stat = torch.tensordot(gb, gb, dims=(other, other))
        root = scipy.linalg.fractional_matrix_power((stat + LAM * torch.eye(len(stat))).numpy(), -1 / (2 * order))
        out = torch.tensordot(out, torch.as_tensor(root.real), dims=([0], [0]))
    return out


@pytest.mark.parametrize("grafting", ["none", "sgd", "adam"])
def test_shampoo_blocks_are_parameters_of_their_own_and_grafting_sets_their_norms(grafting):
    """Distributed Shampoo's blocking (a [5, 6] weight in blocks of at most 4 × 4) and grafting."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(7, 6, dtype=torch.float64), torch.randint(0, 2, (7,))
    nn.CrossEntropyLoss()(model(x), y).backward()
    g = model[0].weight.grad.clone()
    model.zero_grad()
    precond.make("shampoo", model, nn.CrossEntropyLoss(), damping=LAM, block_size=4,
                 grafting=grafting).forward_backward(x, y)
    out = model[0].weight.grad
    for rows in (slice(0, 4), slice(4, 5)):
        for cols in (slice(0, 4), slice(4, 6)):
            gb = g[rows, cols]
            expect = _shampoo_block(gb, order=2)
            if grafting == "sgd":
                expect = expect * gb.norm() / expect.norm()
            elif grafting == "adam":  # first step: v̂ = g², D = g / (|g| + 1e-8)
                expect = expect * (gb / (gb.abs() + 1e-8)).norm() / expect.norm()
            torch.testing.assert_close(out[rows, cols], expect)
    with pytest.raises(ValueError, match="grafting"):
        precond.make("shampoo", model, nn.CrossEntropyLoss(), grafting="adagrad")
    with pytest.raises(ValueError, match="block_size"):
        precond.make("shampoo", model, nn.CrossEntropyLoss(), block_size=0)


@pytest.mark.parametrize("bias", ["augment", "separate"])
@pytest.mark.parametrize("conv", [False, True])
def test_kfac_low_rank_input_factor_solve_equals_the_dense_solve(bias, conv):
    """A = U_Aᵀ U_A with fewer rows than its dimension: the SMW solve gives the dense Cholesky one's step."""
    torch.manual_seed(0)
    if conv:  # 2×2 positions of a 3×3 kernel over 4 channels: A is 37 × 37 from 3·4 = 12 rows
        model = nn.Sequential(nn.Conv2d(4, 5, 3), nn.Flatten(), nn.Linear(20, 3)).double()
        batches = [(torch.randn(3, 4, 4, 4, dtype=torch.float64), torch.randint(0, 3, (3,))) for _ in range(3)]
    else:  # A is 41 × 41 from 6 rows
        model = nn.Sequential(nn.Linear(40, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        batches = [(torch.randn(6, 40, dtype=torch.float64), torch.randint(0, 3, (6,))) for _ in range(3)]
    twin = copy.deepcopy(model)
    cfg = {"fisher_type": "exact", "ema_decay": 0.0, "bias": bias, "damping": LAM}
    low = precond.make("kfac", model, nn.CrossEntropyLoss(), low_rank=True, **cfg)
    dense = precond.make("kfac", twin, nn.CrossEntropyLoss(), low_rank=False, **cfg)
    for x, y in batches:
        for mk, m in ((low, model), (dense, twin)):
            m.zero_grad()
            mk.forward_backward(x, y)
        assert low.reps["0"].A is None and low.reps["0"].UA is not None  # the low-rank path ran
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad)
        with torch.no_grad():
            for p, q in zip(model.parameters(), twin.parameters(), strict=True):
                p -= 0.1 * p.grad
                q -= 0.1 * q.grad


@pytest.mark.parametrize("conv", [
    dict(kernel_size=3, padding=1),  # row stride 1: row-shifted products of the width im2col
    dict(kernel_size=3, padding=0),  # windows that leave out input rows at both ends
    dict(kernel_size=(3, 2), padding=(2, 0), dilation=(2, 1), stride=(1, 2)),
    dict(kernel_size=5, padding="same"),
    dict(kernel_size=3, padding=3),  # windows beyond the input rows
    dict(kernel_size=1, padding=0),
    dict(kernel_size=3, padding=1, stride=2),  # row stride 2: im2col columns
])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("max_elements", [1 << 22, 1])  # the whole batch at once, or one example per chunk
def test_one_group_conv_input_factor_equals_the_gram_of_unfold_patches(conv, bias, max_elements):
    """``A = (1/N) Σ_{n,l} a_{nl} a_{nl}ᵀ`` over two calls of different sizes, against ``F.unfold``'s patches."""
    from quicktrain.precond.capture import LayerCapture

    layer = nn.Conv2d(3, 4, bias=bias, **conv).double()
    xs = [torch.randn(5, 3, 7, 6, dtype=torch.float64), torch.randn(5, 3, 6, 9, dtype=torch.float64)]
    with LayerCapture({"c": layer}) as cap:
        sum(layer(x).sum() for x in xs).backward()
    padding = 2 if conv["padding"] == "same" else conv["padding"]
    cols = torch.cat([F.unfold(x, layer.kernel_size, layer.dilation, padding, layer.stride) for x in xs], -1)
    if bias:
        cols = torch.cat([cols, torch.ones(5, 1, cols.shape[-1], dtype=torch.float64)], 1)
    ref = torch.einsum("ndl,nel->de", cols, cols) / 5
    got = cap.batch("c", 5).kron_input_factor(max_elements=max_elements)
    assert got.shape == (1, *ref.shape)
    torch.testing.assert_close(got[0], ref)


@pytest.mark.parametrize("fisher", ["emp", "exact"])
def test_kfac_sub_batch_statistics_are_the_factors_of_the_first_examples(fisher):
    """``statistics_fraction=f``: A and G of the first ``M = ⌈f·N⌉`` examples with ``1/M`` (built here from
    explicit patches and per-example output gradients by ``torch.func``); ``f = 1`` is bit-identical."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).double()
    x, y = torch.randn(7, 2, 4, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    cfg = dict(fisher_type=fisher, ema_decay=0.0, low_rank=False)
    whole, _ = _step("kfac", copy.deepcopy(model), x, y, **cfg)
    same, _ = _step("kfac", copy.deepcopy(model), x, y, statistics_fraction=1.0, **cfg)
    for name in ("0", "3"):
        for key in ("A", "G"):
            torch.testing.assert_close(getattr(same.reps[name], key), getattr(whole.reps[name], key), rtol=0, atol=0)
    sub, _ = _step("kfac", model, x, y, statistics_fraction=0.4, **cfg)  # M = ⌈2.8⌉ = 3 of 7
    m = 3
    patches = F.unfold(x[:m], 3, padding=1)  # [M, 18, 16]
    patches = torch.cat([patches, torch.ones(m, 1, 16, dtype=torch.float64)], 1)
    torch.testing.assert_close(sub.reps["0"].A[0], torch.einsum("ndl,nel->de", patches, patches) / m)
    hidden = torch.tanh(conv(x[:m])).flatten(1)
    a = torch.cat([hidden, torch.ones(m, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(sub.reps["3"].A[0], a.T @ a / m)
    # G: the Fisher's output vectors of the M examples' mean loss (1/√M in each), pulled back to each layer
    logits, vjp_conv = torch.func.vjp(lambda o: model[3](torch.tanh(o).flatten(1)), conv(x[:m]))
    vecs = output_sqrt(nn.CrossEntropyLoss(), logits, y[:m], fisher)
    g_conv = torch.stack([vjp_conv(v)[0] for v in vecs]).permute(0, 1, 3, 4, 2).reshape(-1, 3)
    torch.testing.assert_close(sub.reps["0"].G[0], g_conv.T @ g_conv / 16)  # 16 positions
    g_lin = vecs.reshape(-1, 3)
    torch.testing.assert_close(sub.reps["3"].G[0], g_lin.T @ g_lin)
    with pytest.raises(ValueError, match=r"statistics_fraction must be in \(0, 1\], got 0"):
        precond.make("kfac", model, nn.CrossEntropyLoss(), statistics_fraction=0)


@pytest.mark.parametrize("bias", [True, False])
def test_kron_input_chunks_cover_the_batch_in_order(bias):
    from quicktrain.precond.capture import LayerCapture

    conv = nn.Conv2d(3, 4, 3, padding=1, bias=bias).double()
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    with LayerCapture({"c": conv}) as cap:
        conv(x).sum().backward()
    batch = cap.batch("c", 5)
    chunks = list(batch.kron_input_chunks(max_elements=2 * 36 * (27 + bias)))  # two examples per chunk
    assert [c.shape[0] for c in chunks] == [2, 2, 1]
    torch.testing.assert_close(torch.cat(chunks), batch.kron_inputs())


class _RootScaled(nn.Module):
    """A Linear-LayerNorm-Linear net whose logits a root-level parameter scales, and an ignored last layer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 4))
        self.temperature = nn.Parameter(torch.ones(4))
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.body(x) * self.temperature)


@pytest.mark.parametrize("grafting", ["sgd", "adam"])
def test_kfac_grafting_gives_each_layer_the_grafted_norm_and_keeps_its_direction(grafting):
    """Layer-wise grafting for the curvature makers: each layer's K-FAC direction ``S_l`` (weight and bias
    together) takes the norm of ``D_l`` (``sgd``: the gradient; ``adam``: ``g/(√v̂+1e-8)`` with β₂ = 0.999,
    recomputed here from the plain autograd gradients of two steps); a root-level parameter takes ``‖D‖/‖g‖·g``;
    an ignored layer keeps the plain gradient."""
    torch.manual_seed(0)
    model = _RootScaled().double()
    batches = [(torch.randn(9, 6, dtype=torch.float64), torch.randint(0, 3, (9,))) for _ in range(2)]
    plain, ungrafted, grafted = model, copy.deepcopy(model), copy.deepcopy(model)
    config = {"damping": LAM, "ignore_modules": ["out"]}
    ref = precond.make("kfac", ungrafted, nn.CrossEntropyLoss(), **config)
    mk = precond.make("kfac", grafted, nn.CrossEntropyLoss(), grafting=grafting, **config)
    v = {}
    for t, (x, y) in enumerate(batches):  # no parameter update: both steps see the same weights
        for m in (plain, ungrafted, grafted):
            m.zero_grad()
        nn.CrossEntropyLoss()(plain(x), y).backward()
        ref.forward_backward(x, y)
        mk.forward_backward(x, y)
        d = {}
        for n, p in plain.named_parameters():
            g = p.grad
            v[n] = (1 - 0.999) * g**2 if t == 0 else 0.999 * v[n] + (1 - 0.999) * g**2
            d[n] = g if grafting == "sgd" else g / ((v[n] / (1 - 0.999 ** (t + 1))).sqrt() + 1e-8)
    s = dict(ungrafted.named_parameters())
    g = dict(plain.named_parameters())
    out = dict(grafted.named_parameters())
    for layer in ("body.0", "body.1", "body.3"):
        names = [f"{layer}.weight", f"{layer}.bias"]
        norm_d = math.sqrt(sum(float(d[n].square().sum()) for n in names))
        norm_s = math.sqrt(sum(float(s[n].grad.square().sum()) for n in names))
        for n in names:
            torch.testing.assert_close(out[n].grad, s[n].grad * (norm_d / norm_s))
            assert not torch.allclose(out[n].grad, d[n])  # the direction is K-FAC's, not the grafted method's
    n = "temperature"
    torch.testing.assert_close(out[n].grad, g[n].grad * (d[n].norm() / g[n].grad.norm()))
    for n in ("out.weight", "out.bias"):
        torch.testing.assert_close(out[n].grad, g[n].grad)
    state = mk.state_dict()
    assert set(state["grafting"]) == (set(g) - {"out.weight", "out.bias"} if grafting == "adam" else set())
    with pytest.raises(ValueError, match="grafting"):
        precond.make("kfac", model, nn.CrossEntropyLoss(), grafting="adagrad")
