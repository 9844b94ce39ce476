"""Every registered method on an MLP, a CNN with BatchNorm and an Embedding+LayerNorm model: finite
gradients for every parameter at every step, exact resume, independence, configuration errors."""

import copy

import pytest
import torch
from torch import nn

from quicktrain import precond
from quicktrain.precond.methods.psgd import psgd_kron_update
from quicktrain.precond.representations import bfgs_inverse_update, damped_bfgs_update
from quicktrain.train.hooks import AutogradGradients

METHODS = precond.list_methods()
KINDS = ["cnn", "emb", "mlp"]
EXPECTED = {"sgd", "kfac", "kfac_soap", "ekfac", "skfac", "shampoo", "psgd", "kbfgs", "smw_ng", "seng", "full_ng",
            "layerwise_ng", "unitwise_ng", "diag_ng", "newton", "newton_cg", "curveball"}


def _config(name: str) -> dict:
    if name in ("newton_cg", "curveball"):
        return {"damping": 0.1}
    return {"damping": 0.1, "curvature_interval": 2, "inverse_interval": 3, "warmup": 1}


def _run(zoo, name, kind, state=None, batches=None, config=None):
    torch.manual_seed(0)
    model = zoo.models[kind]()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    maker = precond.make(name, model, nn.CrossEntropyLoss(), **(config or _config(name)))
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        maker.load_state_dict(state["maker"])
    for x, y in batches:
        opt.zero_grad()
        maker.forward_backward(x, y)
        opt.step()
    return model, opt, maker


def test_registry_lists_every_method_and_rejects_unknown_names():
    assert set(METHODS) == EXPECTED and METHODS == sorted(METHODS)
    with pytest.raises(ValueError, match=r"Unknown preconditioner 'adam'; choose from \['ddd'\]".replace(
            r"\['ddd'\]", r"\[")):
        precond.make("adam", nn.Linear(2, 2), nn.CrossEntropyLoss())


@pytest.mark.parametrize("name", METHODS)
def test_every_method_names_an_option_it_does_not_take(name):
    where = rf"the keyword arguments of quicktrain\.precond\.methods\.\w+\.{name} and \w+$"
    with pytest.raises(precond.UnknownOptionError,
                       match=rf"preconditioner '{name}' has no option 'dampnig'; its options are {where}") as e:
        precond.make(name, nn.Sequential(nn.Linear(2, 2)), nn.CrossEntropyLoss(), dampnig=0.1)
    assert e.value.option == "dampnig" and isinstance(e.value, ValueError)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", METHODS)
def test_every_method_gives_finite_gradients_to_every_parameter(name, kind, zoo):
    torch.manual_seed(0)
    model = zoo.models[kind]()
    maker = precond.make(name, model, nn.CrossEntropyLoss(), **_config(name))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    changed = False
    for step in range(4):
        x, y = zoo.batch(kind, 8, dtype=torch.float32)
        ref = copy.deepcopy(model)
        AutogradGradients(ref, nn.CrossEntropyLoss()).forward_backward(x, y)
        opt.zero_grad()
        loss, logits = maker.forward_backward(x, y)
        assert loss.shape == () and not loss.requires_grad and logits.shape == (8, 3)
        for (pname, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
            assert p.grad is not None, f"{name}: {pname} has no gradient at step {step}"
            assert p.grad.shape == p.shape and p.grad.dtype == p.dtype
            assert torch.isfinite(p.grad).all(), f"{name}: {pname} non-finite at step {step}"
            changed |= not torch.allclose(p.grad, q.grad)
        opt.step()
    assert changed == (name != "sgd")


DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EXACT_FISHER = {"kfac", "kfac_soap", "ekfac", "skfac", "full_ng", "smw_ng", "layerwise_ng", "seng", "unitwise_ng",
                "diag_ng", "kbfgs"}


@pytest.mark.parametrize("kind", ["cnn", "emb"])
@pytest.mark.parametrize("name", METHODS)
def test_every_method_on_the_default_device_matches_cpu_in_float64(name, kind, zoo):
    """On a CUDA machine this checks the GPU path against the CPU (three steps, float64; the exact Fisher, so
    that nothing is sampled); elsewhere it checks that two CPU runs agree. PSGD draws its probe vectors from
    the device's generator, so on another device it is checked for finite gradients there only."""
    config = {**_config(name), **({"fisher_type": "exact"} if name in EXACT_FISHER else {})}
    batches = [zoo.batch(kind, 6) for _ in range(3)]
    runs = []
    for device in ("cpu", DEFAULT_DEVICE):
        torch.manual_seed(0)
        model = zoo.models[kind]().double().to(device)
        maker = precond.make(name, model, nn.CrossEntropyLoss(), **config)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for x, y in batches:
            opt.zero_grad()
            maker.forward_backward(x.to(device), y.to(device))
            opt.step()
        grads = [p.grad for p in model.parameters()]
        assert {g.device.type for g in grads} == {device} and all(bool(torch.isfinite(g).all()) for g in grads)
        runs.append([g.cpu() for g in grads])
    if name != "psgd" or DEFAULT_DEVICE == "cpu":
        for a, b in zip(*runs, strict=True):
            torch.testing.assert_close(b, a)


@pytest.mark.parametrize("kind", ["cnn", "emb"])
@pytest.mark.parametrize("name", METHODS)
def test_state_dict_round_trip_resumes_to_identical_updates(name, kind, zoo):
    batches = [zoo.batch(kind, 6, dtype=torch.float32) for _ in range(6)]
    straight, _, _ = _run(zoo, name, kind, batches=batches)
    first, opt, maker = _run(zoo, name, kind, batches=batches[:3])
    state = copy.deepcopy({"model": first.state_dict(), "opt": opt.state_dict(), "maker": maker.state_dict()})
    assert maker.state_dict()["step"] == 3
    resumed, _, _ = _run(zoo, name, kind, state=state, batches=batches[3:])
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_two_makers_on_one_model_do_not_interfere(zoo):
    torch.manual_seed(0)
    model = zoo.models["cnn"]()
    x, y = zoo.batch("cnn", 6, dtype=torch.float32)
    a = precond.make("kfac", model, nn.CrossEntropyLoss(), seed=1)
    alone = precond.make("kfac", copy.deepcopy(model), nn.CrossEntropyLoss(), seed=1)
    b = precond.make("ekfac", model, nn.CrossEntropyLoss())
    b.forward_backward(x, y)
    model.zero_grad()
    a.forward_backward(x, y)
    grads = [p.grad.clone() for p in model.parameters()]
    alone.model.zero_grad()
    alone.forward_backward(x, y)
    for g, p in zip(grads, alone.model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed


def test_intervals_and_warmup_schedule_curvature_and_inverse_updates(zoo):
    torch.manual_seed(0)
    model = zoo.models["mlp"]()
    maker = precond.make("kfac", model, nn.CrossEntropyLoss(), curvature_interval=2, inverse_interval=4, warmup=2)
    seen = []
    for _ in range(9):
        before = (maker.reps["0"].A, maker.reps["0"].A_inv)
        maker.forward_backward(*zoo.batch("mlp", 4, dtype=torch.float32))
        seen.append((maker.reps["0"].A is not before[0], maker.reps["0"].A_inv is not before[1]))
    assert [c for c, _ in seen] == [True, True, True, False, True, False, True, False, True]
    assert [i for _, i in seen] == [True, True, False, False, True, False, False, False, True]


def test_ignored_modules_keep_the_plain_gradient_and_unsupported_modules_raise(zoo):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = zoo.batch("mlp", 4, dtype=torch.float32)
    ref = copy.deepcopy(model)
    nn.CrossEntropyLoss()(ref(x), y).backward()
    for name in ("kfac", "shampoo", "psgd", "diag_ng", "newton_cg"):
        model.zero_grad()
        precond.make(name, model, nn.CrossEntropyLoss(), ignore_modules=["2"]).forward_backward(x, y)
        torch.testing.assert_close(model[2].weight.grad, ref[2].weight.grad)
        assert not torch.allclose(model[0].weight.grad, ref[0].weight.grad)
    odd = nn.Sequential(nn.Conv1d(2, 3, 1), nn.Flatten(), nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"'0' \(Conv1d\).*ignore_modules"):
        precond.make("kfac", odd, nn.CrossEntropyLoss())
    maker = precond.make("kfac", odd, nn.CrossEntropyLoss(), unsupported="identity")
    maker.forward_backward(torch.randn(4, 2, 1), torch.randint(0, 3, (4,)))
    assert odd[0].weight.grad is not None


@pytest.mark.parametrize("bad", [{"damping": 0.0}, {"curvature_interval": 0}, {"inverse_interval": 1.5},
                                 {"warmup": -1}, {"ema_decay": 1.0}, {"fisher_type": "true"}])
def test_bad_configuration_raises_naming_the_option(bad, zoo):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key):
        precond.make("kfac", zoo.models["mlp"](), nn.CrossEntropyLoss(), **bad)


def test_unsupported_loss_and_non_finite_values_raise_clearly(zoo):
    with pytest.raises(ValueError, match="L1Loss"):
        precond.make("kfac", zoo.models["mlp"](), nn.L1Loss())
    model = zoo.models["mlp"]()
    x, y = zoo.batch("mlp", 4, dtype=torch.float32)
    with pytest.raises(FloatingPointError, match=r"layer '0' at step 0"):  # A = x x^T overflows float32
        precond.make("kfac", model, nn.CrossEntropyLoss()).forward_backward(x * 1e20, y)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 0"):
        precond.make("diag_ng", model, nn.CrossEntropyLoss()).forward_backward(x, y)


def test_sgd_equals_plain_autograd_and_kfac_with_mse_runs(zoo):
    torch.manual_seed(0)
    model = zoo.models["mlp"]()
    ref = copy.deepcopy(model)
    x, y = zoo.batch("mlp", 4, dtype=torch.float32)
    precond.make("sgd", model, nn.CrossEntropyLoss(), damping=1e-3).forward_backward(x, y)
    AutogradGradients(ref, nn.CrossEntropyLoss()).forward_backward(x, y)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
    maker = precond.make("kfac", model, nn.MSELoss(), fisher_type="exact")
    maker.forward_backward(x, torch.randn(4, 3))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_psgd_fit_converges_to_the_inverse_of_a_kronecker_hessian():
    torch.manual_seed(0)
    hl = torch.randn(3, 3, dtype=torch.float64)
    hl = hl @ hl.T + torch.eye(3, dtype=torch.float64)
    hr = torch.randn(2, 2, dtype=torch.float64)
    hr = hr @ hr.T + torch.eye(2, dtype=torch.float64)
    ql, qr = torch.eye(3, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    for i in range(3000):
        v = torch.randn(3, 2, dtype=torch.float64)
        ql, qr = psgd_kron_update(ql, qr, v, hl @ v @ hr, 0.1 if i < 2000 else 0.01)
    p = torch.kron(qr.T @ qr, ql.T @ ql)  # acts on vec (columns stacked) as G ↦ Pl G Pr
    torch.testing.assert_close(p @ torch.kron(hr, hl), torch.eye(6, dtype=torch.float64), atol=0.1, rtol=0)


def test_damped_bfgs_update_satisfies_the_secant_equation_and_stays_positive_definite():
    torch.manual_seed(0)
    h = torch.eye(4, dtype=torch.float64)[None]
    s = torch.randn(1, 4, dtype=torch.float64)
    y = 2 * s + 0.1 * torch.randn(1, 4, dtype=torch.float64)
    new = damped_bfgs_update(h, s, y, 0.1)  # Powell inactive here: the damped pair is (s, y + 0.1 s)
    torch.testing.assert_close((new @ (y + 0.1 * s)[..., None])[..., 0], s)
    bad = damped_bfgs_update(h, s, -y, 0.0)  # negative curvature pair: Powell damping keeps H PD
    assert torch.linalg.eigvalsh(bad[0]).min() > 0
    torch.testing.assert_close(damped_bfgs_update(h, 0 * s, 0 * y, 0.1), h)  # no movement: no update
    spd = torch.randn(2, 4, 4, dtype=torch.float64)
    spd = spd @ spd.transpose(1, 2) + torch.eye(4, dtype=torch.float64)
    s2, y2 = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    y2 = y2 * torch.sign((s2 * y2).sum(-1, keepdim=True))  # sᵀy > 0
    rho = 1 / (s2 * y2).sum(-1)
    left = torch.eye(4, dtype=torch.float64) - rho[:, None, None] * s2[:, :, None] * y2[:, None, :]
    product_form = left @ spd @ left.transpose(1, 2) + rho[:, None, None] * s2[:, :, None] * s2[:, None, :]
    torch.testing.assert_close(bfgs_inverse_update(spd, s2, y2), product_form)
    # a layer followed by BatchNorm: the batch-mean output gradient is ~0, so y is round-off (~1e-11) and the
    # Powell-damped pair is tiny; the float32 update must stay finite and positive definite (ρ ~ 1e22)
    h32 = spd[0].float()[None]
    tiny = damped_bfgs_update(h32, 1e-3 * s2[:1].float(), 1e-11 * y2[:1].float() * -1, 0.03)
    assert bool(torch.isfinite(tiny).all()) and torch.linalg.eigvalsh(tiny[0].double()).min() > 0


def test_kbfgs_bfgs_inverse_of_a_satisfies_the_secant_equation_along_the_mean_input(zoo):
    torch.manual_seed(0)
    model = zoo.models["mlp"]().double()
    maker = precond.make("kbfgs", model, nn.CrossEntropyLoss(), damping=0.1, a_inverse="bfgs")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lam = 0.1 ** 0.5
    for _ in range(3):
        x, y = zoo.batch("mlp", 8)
        rep = maker.reps["0"]
        before = None if rep.A_inv is None else rep.A_inv.clone()
        opt.zero_grad()
        maker.forward_backward(x, y)
        opt.step()
        if before is None:  # the first inverse is the damped Cholesky inverse
            eye = torch.eye(rep.A.shape[-1], dtype=torch.float64)
            torch.testing.assert_close(rep.A_inv, torch.linalg.inv(rep.A + lam * eye))
            continue
        s = (before @ rep.a_bar[..., None])[..., 0]
        y_vec = (rep.A @ s[..., None])[..., 0] + lam * s
        torch.testing.assert_close((rep.A_inv @ y_vec[..., None])[..., 0], s)
        assert torch.linalg.eigvalsh(rep.A_inv).min() > 0
    with pytest.raises(ValueError, match="a_inverse"):
        precond.make("kbfgs", model, nn.CrossEntropyLoss(), a_inverse="lbfgs")
