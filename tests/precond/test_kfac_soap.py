"""``kfac_soap`` (Adam in the eigenbasis of the K-FAC factors) against a float64 reference written from its
definition: the factors from hooks on the layers (``F.unfold`` patches for a convolution), their eigenbases by
``torch.linalg.eigh``, Adam's second moment kept on the coordinates of the dense Kronecker basis ``Q_A ⊗ Q_G``
and carried into a refreshed basis as the diagonal of the rotated diagonal matrix, over four steps with two
basis refreshes, on an MLP, a CNN and a self-attention model (LayerNorm and a root-level parameter included)."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from quicktrain import precond

# ε above the round-off of the null directions of G (ĝ ≈ 1e-17 there): ĝ/ε stays below the tolerance
BETA2, EPS, LR = 0.9, 1e-6, 0.05


class Attn(nn.Module):
    """Tokens -> Linear -> + positions (root level) -> LayerNorm -> qkv -> SDPA -> proj -> mean -> head."""

    # classes > e: the gradient at proj's output, W_headᵀ ∂ℓ/∂logits (the same for every token), spans all e
    # dimensions, so that G has no repeated zero eigenvalue whose eigenvectors eigh could pick in any rotation
    def __init__(self, d: int = 3, e: int = 4, heads: int = 2, tokens: int = 5, classes: int = 5) -> None:
        super().__init__()
        self.inp, self.norm = nn.Linear(d, e), nn.LayerNorm(e)
        self.pos = nn.Parameter(torch.randn(1, tokens, e) * 0.3)
        self.qkv, self.proj, self.head = nn.Linear(e, 3 * e), nn.Linear(e, e), nn.Linear(e, classes)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.inp(x) + self.pos)
        n, t, e = h.shape
        q, k, v = self.qkv(h).reshape(n, t, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, e)
        return self.head((h + self.proj(o)).mean(1))


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    if kind == "cnn":
        return nn.Sequential(nn.Conv2d(2, 3, 2, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 3, stride=2),
                             nn.Flatten(), nn.Linear(2 * 2 * 2, 3)).double()
    return Attn().double()


def _batches(kind: str, n: int = 12) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    shape = {"mlp": (n, 4), "cnn": (n, 2, 5, 5), "attn": (n, 5, 3)}[kind]
    return [(torch.randn(*shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
            for _ in range(4)]


def _factor_rows(module: nn.Module, inp: torch.Tensor, out: torch.Tensor, separate: bool):
    """Inputs ``[N, L, d_in]`` (a 1 appended for the bias unless ``separate``), output gradients ``[N, L, d_out]``."""
    n = inp.shape[0]
    if isinstance(module, nn.Conv2d):
        a = F.unfold(inp, module.kernel_size, module.dilation, module.padding, module.stride).transpose(1, 2)
        g = out.grad.reshape(n, out.shape[1], -1).transpose(1, 2)
    else:
        a, g = inp.reshape(n, -1, inp.shape[-1]), out.grad.reshape(n, -1, out.shape[-1])
    if not separate:
        a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=a.dtype)], dim=-1)
    return a, g


def _eig_or_identity(m: torch.Tensor, max_dim: int) -> torch.Tensor:
    return torch.linalg.eigh(m).eigenvectors if m.shape[0] <= max_dim else torch.eye(m.shape[0], dtype=m.dtype)


def _adam(c: torch.Tensor, st: dict, t: int, beta1: float) -> torch.Tensor:
    """Adam (Kingma & Ba, Algorithm 1) on coordinates ``c`` with moments ``st["m"]``, ``st["v"]``; ``beta1 = 0``:
    no first moment (the numerator is ``c``)."""
    st["v"] = (1 - BETA2) * c**2 if "v" not in st else BETA2 * st["v"] + (1 - BETA2) * c**2
    if beta1:
        st["m"] = (1 - beta1) * c if "m" not in st else beta1 * st["m"] + (1 - beta1) * c
        c = st["m"] / (1 - beta1 ** (t + 1))
    return c / ((st["v"] / (1 - BETA2 ** (t + 1))).sqrt() + EPS)


def _reference(model: nn.Module, batches, *, inverse_interval: int, separate: bool, max_dim: int, beta1: float):
    """The updates ``Δθ`` of each step, from the definition (empirical Fisher factors of the current batch)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    norms = {n: m for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    state = {n: {} for n in layers} | {f"{n}.{pn}": {} for n, m in norms.items() for pn, _ in m.named_parameters()}
    steps = []
    for t, (x, y) in enumerate(batches):
        rec = {}

        def hook(mod, inp, out, name, rec=rec):
            out.retain_grad()
            rec[name] = (inp[0].detach(), out)

        handles = [m.register_forward_hook(lambda mod, i, o, name=n: hook(mod, i, o, name)) for n, m in layers.items()]
        model.zero_grad()
        nn.CrossEntropyLoss()(model(x), y).backward()
        for h in handles:
            h.remove()
        delta = {n: p.grad.clone() for n, p in model.named_parameters()}  # root-level: the plain gradient
        for name, m in layers.items():
            st = state[name]
            a, g = _factor_rows(m, *rec[name], separate)
            n, length = a.shape[:2]
            big_a = torch.einsum("nli,nlj->ij", a, a) / n
            big_g = torch.einsum("nlo,nlp->op", g, g) * (n / length)  # empirical Fisher: the mean loss times N
            if t % inverse_interval == 0:
                q_l, q_r = _eig_or_identity(big_g, max_dim), _eig_or_identity(big_a, max_dim)
                if separate and m.bias is not None:
                    q_r = torch.block_diag(q_r, torch.ones(1, 1, dtype=q_r.dtype))
                # vec(Q_Lᵀ M Q_R) = (Q_R ⊗ Q_L)ᵀ vec(M), columns stacked
                basis = torch.kron(q_r.contiguous(), q_l.contiguous())
                if "v" in st:  # the old diagonal second moment, expressed in the new basis; the first moment rotated
                    rot = basis.T @ st["basis"]
                    st["v"] = torch.diagonal(rot @ torch.diag(st["v"]) @ rot.T).clone()
                    if "m" in st:
                        st["m"] = rot @ st["m"]
                st["basis"] = basis
            w = m.weight.grad.reshape(m.weight.shape[0], -1)
            mat = w if m.bias is None else torch.cat([w, m.bias.grad[:, None]], dim=1)
            c = st["basis"].T @ mat.T.reshape(-1)
            d = (st["basis"] @ _adam(c, st, t, beta1)).reshape(mat.shape[1], -1).T
            delta[f"{name}.weight"] = d[:, : w.shape[1]].reshape(m.weight.shape)
            if m.bias is not None:
                delta[f"{name}.bias"] = d[:, -1]
        for name, m in norms.items():  # Adam in the parameter basis
            for pn, p in m.named_parameters():
                delta[f"{name}.{pn}"] = _adam(p.grad, state[f"{name}.{pn}"], t, beta1)
        with torch.no_grad():
            for pn, p in model.named_parameters():
                p -= LR * delta[pn]
        steps.append(delta)
    return steps


@pytest.mark.parametrize(("kind", "separate", "max_dim", "beta1"), [
    ("mlp", False, 2048, 0.0), ("mlp", True, 2048, 0.0), ("mlp", False, 5, 0.0), ("cnn", False, 2048, 0.0),
    ("attn", False, 2048, 0.0), ("cnn", False, 2048, 0.8), ("attn", False, 2048, 0.8)])
def test_kfac_soap_is_adam_in_the_eigenbasis_of_the_kfac_factors(kind, separate, max_dim, beta1):
    """Four steps, bases refreshed at steps 0 and 2 (``inverse_interval=2``): every parameter's update equals
    the reference's. ``max_dim=5`` leaves the second MLP layer's 6-dimensional input side unrotated;
    ``beta1 > 0`` keeps Adam's first moment in the basis (rotated with it at the refresh)."""
    model = _model(kind)
    ref_model = copy.deepcopy(model)
    batches = _batches(kind)
    maker = precond.make("kfac_soap", model, nn.CrossEntropyLoss(), fisher_type="emp", ema_decay=0.0,
                         curvature_interval=1, inverse_interval=2, beta1=beta1, beta2=BETA2, eps=EPS,
                         max_dim=max_dim, bias="separate" if separate else "augment")
    expected = _reference(ref_model, batches, inverse_interval=2, separate=separate, max_dim=max_dim, beta1=beta1)
    for t, ((x, y), delta) in enumerate(zip(batches, expected, strict=True)):
        model.zero_grad()
        maker.forward_backward(x, y)
        for pn, p in model.named_parameters():
            torch.testing.assert_close(p.grad, delta[pn], rtol=1e-7, atol=1e-9, msg=f"{pn} at step {t}")
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
    if max_dim == 5:
        rep = maker.reps["2"]
        assert rep.QR is None and rep.A is None and rep.QL is not None


def test_kfac_soap_state_dict_round_trip_resumes_identically():
    """The bases, the second moments and their step counts are in ``state_dict()``: a maker restored after two
    steps gives the same updates as the one that ran on (refreshes at steps 0 and 2, a moving average)."""
    batches = _batches("attn")
    config = {"curvature_interval": 1, "inverse_interval": 2, "beta1": 0.9}
    model = _model("attn")
    resumed_model = copy.deepcopy(model)
    straight = precond.make("kfac_soap", model, nn.CrossEntropyLoss(), **config)
    for x, y in batches[:2]:
        model.zero_grad()
        straight.forward_backward(x, y)
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
    state = copy.deepcopy(straight.state_dict())
    assert set(state["layers"]["qkv"]) == {"A", "G", "QL", "QR", "M", "V", "adam_step"}
    assert state["layers"]["qkv"]["adam_step"] == 2 and set(state["layers"]["norm"]["V"]) == {"weight", "bias"}
    resumed_model.load_state_dict(model.state_dict())
    resumed = precond.make("kfac_soap", resumed_model, nn.CrossEntropyLoss(), **config)
    resumed.load_state_dict(state)
    for x, y in batches[2:]:
        for m, mk in ((model, straight), (resumed_model, resumed)):
            m.zero_grad()
            mk.forward_backward(x, y)
        for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad)


def test_kfac_soap_refuses_bad_options():
    model = _model("mlp")
    for key, value in (("beta1", -0.1), ("beta2", 1.0), ("eps", 0.0), ("max_dim", 0)):
        with pytest.raises(ValueError, match=key):
            precond.make("kfac_soap", model, nn.CrossEntropyLoss(), **{key: value})
