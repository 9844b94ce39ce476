"""Tiny models and batches for the preconditioning tests (float64 where they are references)."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class EmbNet(nn.Module):
    """Embedding + LayerNorm + Linear over a short token sequence."""

    def __init__(self, vocab: int = 7, dim: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, classes)
        with torch.no_grad():  # a non-zero padding row keeps LayerNorm well conditioned
            self.emb.weight[0].normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.norm(self.emb(x))).mean(1))


def mlp(classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, classes))


def cnn(classes: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(inplace=True),
        nn.Conv2d(3, 4, 2, stride=2, groups=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 2 * 2, classes))


def embnet(classes: int = 3) -> nn.Module:
    return EmbNet(classes=classes)


def batch(kind: str, n: int, classes: int = 3, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "mlp":
        x = torch.randn(n, 5, dtype=dtype)
    elif kind == "cnn":
        x = torch.randn(n, 2, 4, 4, dtype=dtype)
    else:
        x = torch.randint(0, 7, (n, 3))
    return x, torch.randint(0, classes, (n,))


MODELS = {"mlp": mlp, "cnn": cnn, "emb": embnet}


@pytest.fixture(params=sorted(MODELS))
def case(request) -> dict:
    """A float64 model in the mode its exactness tests need (BatchNorm in eval mode) and a batch."""
    kind = request.param
    model = MODELS[kind]().double()
    if kind == "cnn":
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
        model.eval()
    x, y = batch(kind, 4)
    return {"kind": kind, "model": model, "x": x, "y": y}


# ------------------------------------------------------------------------ dense torch.func references
def _flat_call(model: nn.Module):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in model.named_parameters() if p.requires_grad]
    flat0 = torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters() if p.requires_grad])

    def unflat(flat):
        out, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            k = int(torch.tensor(s).prod()) if len(s) else 1
            out[n] = flat[i:i + k].view(s)
            i += k
        return out

    return flat0, unflat


class Reference:
    """Dense float64 curvature by ``torch.func`` (independent of the package's hooks and matvecs)."""

    @staticmethod
    def jacobian(model, x):
        flat0, unflat = _flat_call(model)
        f = lambda flat: torch.func.functional_call(model, unflat(flat), (x,))  # noqa: E731
        j = torch.func.jacrev(f)(flat0)  # [N, C, P]
        return j, f(flat0)

    @staticmethod
    def loss_hessian(loss_fn, logits, y):
        return torch.func.hessian(lambda z: loss_fn(z, y))(logits.detach())

    @classmethod
    def ggn(cls, model, loss_fn, x, y):
        j, logits = cls.jacobian(model, x)
        h = cls.loss_hessian(loss_fn, logits, y)
        jf = j.reshape(-1, j.shape[-1])
        return jf.T @ h.reshape(jf.shape[0], jf.shape[0]) @ jf

    @staticmethod
    def hessian(model, loss_fn, x, y):
        flat0, unflat = _flat_call(model)
        # reverse-over-reverse: torch.func.hessian (forward-over-reverse) is not symmetric through
        # Embedding+LayerNorm in torch 2.14, finite differences agree with this one
        return torch.func.jacrev(torch.func.grad(
            lambda flat: loss_fn(torch.func.functional_call(model, unflat(flat), (x,)), y)))(flat0)

    @staticmethod
    def grad(model, loss_fn, x, y):
        flat0, unflat = _flat_call(model)
        return torch.func.grad(lambda flat: loss_fn(torch.func.functional_call(model, unflat(flat), (x,)),
                                                    y))(flat0)

    @staticmethod
    def per_example_grads(model, loss_fn, x, y):
        flat0, unflat = _flat_call(model)

        def one(xi, yi):
            return torch.func.grad(lambda flat: loss_fn(
                torch.func.functional_call(model, unflat(flat), (xi[None],)), yi[None]))(flat0)

        return torch.func.vmap(one)(x, y)


@pytest.fixture
def ref() -> type[Reference]:
    return Reference


def flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])


@pytest.fixture
def zoo():
    """``zoo.models[kind]()`` and ``zoo.batch(kind, n, dtype=...)`` for tests parametrised by kind."""
    from types import SimpleNamespace

    return SimpleNamespace(models=MODELS, batch=batch)
