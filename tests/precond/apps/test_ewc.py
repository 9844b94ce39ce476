"""EWC penalty: value and gradient against ½(θ−θ*)ᵀF(θ−θ*) with F dense from torch.func (float64)."""

import copy

import pytest
import torch
from torch import nn

from quicktrain import precond
from quicktrain.curvature_apps.ewc import EWCPenalty, consolidated, consolidation_hooks, run_initializer
from quicktrain.curvature_apps.run_data import load_run, task_batches
from quicktrain.train import CheckpointError, Hooks, TrainConfig, fit

CE = nn.CrossEntropyLoss()


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _cnn() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.Conv2d(3, 4, 2, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(16, 3)).double()
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def _labels(model: nn.Module, unit: bool) -> torch.Tensor:
    """Block label of every flat parameter: its module (layer blocks) or its (module, output unit)."""
    out, block = [], 0
    for _, m in model.named_modules():
        own = list(m.parameters(recurse=False))
        if not own:
            continue
        for p in own:
            rows = torch.arange(p.shape[0]).repeat_interleave(p[0].numel()) if unit else torch.zeros(p.numel())
            out.append(block + rows)
        block += 10_000
    return torch.cat(out)


def _moved(model: nn.Module) -> tuple[nn.Module, torch.Tensor]:
    """A copy of ``model`` with perturbed parameters, and ``θ - θ*`` flattened."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.3 * torch.randn_like(p))
    delta = torch.cat([(p - q).detach().reshape(-1) for p, q in zip(other.parameters(), model.parameters(),
                                                                     strict=True)])
    return other, delta


def _check_penalty(model, estimate, dense_f, strength=2.5):
    penalty = EWCPenalty.from_model(model, estimate)
    other, delta = _moved(model)
    value = penalty(other, strength)
    torch.testing.assert_close(value, 0.5 * strength * delta @ dense_f @ delta)
    value.backward()
    grad = torch.cat([p.grad.reshape(-1) for p in other.parameters()])
    torch.testing.assert_close(grad, strength * dense_f @ delta)
    torch.testing.assert_close(penalty(model, strength), torch.zeros((), dtype=torch.float64))


def test_diag_penalty_equals_the_dense_empirical_fisher_diagonal(ref):
    model = _cnn()
    data = [(torch.randn(4, 2, 4, 4, dtype=torch.float64), torch.randint(0, 3, (4,))) for _ in range(3)]
    rows = torch.cat([ref.per_example_grads(model, CE, x, y) for x, y in data])  # [12, P]
    dense = rows.T @ rows / rows.shape[0]
    est = precond.compute_curvature(model, CE, data, representation="diag", fisher_type="emp")
    _check_penalty(model, est, torch.diag(torch.diagonal(dense)))


def test_unitwise_penalty_equals_unit_blocks_of_the_dense_ggn(ref):
    model = _mlp()
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    labels = _labels(model, unit=True)
    dense = ref.ggn(model, CE, x, y) * (labels[:, None] == labels[None, :])
    est = precond.compute_curvature(model, CE, [(x, y)], representation="unitwise", fisher_type="exact")
    _check_penalty(model, est, dense)


def test_kron_penalty_equals_layer_blocks_of_the_dense_fisher_for_one_example(ref):
    # with N = 1 and one position per layer, K-FAC's A ⊗ G is the exact Fisher block of each layer
    model = _mlp()
    x, y = torch.randn(1, 5, dtype=torch.float64), torch.randint(0, 3, (1,))
    labels = _labels(model, unit=False)
    dense = ref.ggn(model, CE, x, y) * (labels[:, None] == labels[None, :])
    est = precond.compute_curvature(model, CE, [(x, y)], representation="kron", fisher_type="exact")
    _check_penalty(model, est, dense)


def test_consolidated_maker_returns_the_task_loss_and_adds_the_penalty_gradient(ref):
    model = _mlp()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    est = precond.compute_curvature(model, CE, [(x, y)], representation="kron")
    penalty = EWCPenalty.from_model(model, est)
    other, delta = _moved(model)
    dense = torch.func.jacrev(lambda d: torch.func.grad(lambda e: 0.5 * est.quadratic(
        _unflat(model, e)))(d))(torch.zeros_like(delta))  # the representation's own dense matrix
    maker = consolidated(penalty, 3.0)(other, CE)
    loss, _ = maker.forward_backward(x, y)
    torch.testing.assert_close(loss, CE(other(x), y).detach())
    grad = torch.cat([p.grad.reshape(-1) for p in other.parameters()])
    torch.testing.assert_close(grad, ref.grad(other, CE, x, y) + 3.0 * dense @ delta)
    # state: a penalty computed elsewhere takes this one's anchor and curvature
    fresh = EWCPenalty.from_model(other, precond.compute_curvature(other, CE, [(x[:2], y[:2])],
                                                                  representation="kron"))
    fresh.load_state_dict(maker.state_dict()["penalty"])
    torch.testing.assert_close(fresh(other, 3.0), penalty(other, 3.0))
    with pytest.raises(TypeError, match="does not accumulate"):
        consolidated(penalty, 1.0, base=lambda m, f: precond.make("newton", m, f))(other, CE)


def _unflat(model: nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for n, p in model.named_parameters():
        out[n] = flat[i:i + p.numel()].view_as(p)
        i += p.numel()
    return out


@pytest.fixture(scope="module")
def task_a(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "a"
    fit(TrainConfig(dataset="digits", classes="0-4", model="mlp", epochs=1, max_steps_per_epoch=3, out=str(out),
                    progress=False))
    return out


def test_consolidation_hooks_continue_from_the_run_and_protect_it(task_a, tmp_path):
    assert set(task_batches(load_run(task_a), batches=3, batch_size=32)[0][1].tolist()) <= set(range(5))
    init, factory = consolidation_hooks(task_a, strength=50.0, representation="kron", model_name="mlp",
                                        dataset="digits", batches=2, batch_size=32)
    config = TrainConfig(dataset="digits", classes="5-9", model="mlp", epochs=1, max_steps_per_epoch=3,
                         out=str(tmp_path / "b"), progress=False)
    result = fit(config, Hooks(init=init, gradients=factory))
    anchor = load_run(task_a).model
    penalty = EWCPenalty.from_run(task_a, representation="diag", batches=2, batch_size=32)
    assert float(penalty(anchor).detach()) == 0.0
    assert 0.0 < float(penalty(result.model).detach()) < float("inf")


def test_run_initializer_refuses_another_model_or_dataset(task_a):
    with pytest.raises(CheckpointError, match="--model mlp"):
        run_initializer(task_a, model_name="cnn")
    with pytest.raises(CheckpointError, match="--dataset digits"):
        run_initializer(task_a, dataset="fashion-mnist")
    init = run_initializer(task_a)
    with pytest.raises(CheckpointError, match="--model mlp"):
        init(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), torch.zeros(2, 1, 8, 8))
    with pytest.raises(CheckpointError, match="--dataset digits"):
        init(nn.Linear(3, 3), torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match="Unknown EWC representation"):
        EWCPenalty.from_run(task_a, representation="layer")
