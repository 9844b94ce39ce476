"""Attention models: ``nn.MultiheadAttention``, ``F.scaled_dot_product_attention`` and ``vit_tiny`` under every
method; K-FAC of an attention projection against its definition in float64 (expand and reduce); matrix-free
products against ``torch.func``; ``unsupported=`` on every method."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torch.nn.attention import SDPBackend, sdpa_kernel

from quicktrain import models, precond
from quicktrain.precond.curvature import output_sqrt

METHODS = precond.list_methods()
KRONECKER = {"kfac", "kfac_soap", "ekfac", "skfac", "kbfgs"}
CE = nn.CrossEntropyLoss()


class MHANet(nn.Module):
    """Tokens -> Linear -> + positions (a root-level parameter) -> LayerNorm -> self-attention -> mean -> head."""

    def __init__(self, d: int = 6, e: int = 8, heads: int = 2, tokens: int = 5, classes: int = 3,
                 batch_first: bool = True) -> None:
        super().__init__()
        self.inp = nn.Linear(d, e)
        self.pos = nn.Parameter(torch.randn(1, tokens, e) * 0.3)
        self.norm = nn.LayerNorm(e)
        self.attn = nn.MultiheadAttention(e, heads, batch_first=batch_first)
        self.head = nn.Linear(e, classes)
        self.batch_first = batch_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.inp(x) + self.pos)
        if self.batch_first:
            o = self.attn(h, h, h, need_weights=False)[0]
        else:
            t = h.transpose(0, 1)
            o = self.attn(t, t, t, need_weights=False)[0].transpose(0, 1)
        return self.head((h + o).mean(1))


class SDPANet(nn.Module):
    """A user-defined attention block calling ``F.scaled_dot_product_attention``."""

    def __init__(self, d: int = 6, e: int = 8, heads: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.inp, self.qkv, self.proj, self.head = nn.Linear(d, e), nn.Linear(e, 3 * e), nn.Linear(e, e), \
            nn.Linear(e, classes)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        n, t, e = h.shape
        q, k, v = self.qkv(h).reshape(n, t, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, e)
        return self.head((h + self.proj(o)).mean(1))


def vit() -> nn.Module:
    return models.get_model("vit_tiny", num_classes=3, in_shape=(1, 8, 8))


MODELS = {"mha": MHANet, "mha_seq_first": lambda: MHANet(batch_first=False), "sdpa": SDPANet, "vit_tiny": vit}
# projections of each model, for the Kronecker family's "preconditioned, not the plain gradient" check
PROJECTIONS = {"mha": ["attn.in_proj_weight", "attn.out_proj.weight"],
               "mha_seq_first": ["attn.in_proj_weight", "attn.out_proj.weight"],
               "sdpa": ["qkv.weight", "proj.weight"],
               "vit_tiny": [f"blocks.{i}.attn.{p}.weight" for i in range(4) for p in ("qkv", "proj")]}
ROOT_LEVEL = {"mha": ["pos"], "mha_seq_first": ["pos"], "sdpa": [], "vit_tiny": ["cls_token", "pos_embed"]}
# dense matrices of every parameter (or of a 12 480-parameter layer) that these methods refuse by design
TOO_LARGE = {("vit_tiny", "full_ng"), ("vit_tiny", "layerwise_ng"), ("vit_tiny", "newton")}


def data(kind: str, n: int = 4, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 8, 8, generator=g) if kind == "vit_tiny" else torch.randn(n, 5, 6, generator=g)
    return x.to(dtype), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("method", METHODS)
def test_every_method_preconditions_attention_models_with_finite_gradients(kind, method):
    torch.manual_seed(0)
    model = MODELS[kind]()
    x, y = data(kind)
    if (kind, method) in TOO_LARGE:
        with pytest.raises(ValueError, match="too many|exceed"):
            precond.make(method, model, CE)
        return
    plain = copy.deepcopy(model)
    CE(plain(x), y).backward()
    maker = precond.make(method, model, CE)
    maker.forward_backward(x, y)
    grads = dict(model.named_parameters())
    for name, p in grads.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    ref = dict(plain.named_parameters())
    if method in KRONECKER:
        for name in PROJECTIONS[kind]:
            assert not torch.allclose(grads[name].grad, ref[name].grad, rtol=1e-3, atol=1e-6), name
    if isinstance(maker, precond.CurvatureGradients):  # container parameters keep the loss's gradient
        for name in ROOT_LEVEL[kind]:
            torch.testing.assert_close(grads[name].grad, ref[name].grad)
    model.zero_grad()
    maker.forward_backward(x, y)  # a second step (with state) stays finite
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def _reference_projections(model: MHANet, x: torch.Tensor, y: torch.Tensor):
    """The model written out from the definition of multi-head attention, with the projections' inputs and the
    gradients of every exact-Fisher backward vector at their outputs: ``{proj: (a [N, L, d_in], g [K, N, L,
    d_out])}``."""
    att = model.attn
    e, heads = att.embed_dim, att.num_heads
    h = model.norm(model.inp(x) + model.pos)
    n, t, _ = h.shape
    qkv = h @ att.in_proj_weight.T + att.in_proj_bias
    q, k, v = (z.reshape(n, t, heads, e // heads).transpose(1, 2) for z in qkv.split(e, dim=-1))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(e // heads), dim=-1)
    o = (weights @ v).transpose(1, 2).reshape(n, t, e)
    out = o @ att.out_proj.weight.T + att.out_proj.bias
    logits = model.head((h + out).mean(1))
    torch.testing.assert_close(logits, model(x))
    vectors = output_sqrt(CE, logits, y, "exact")
    g_in, g_out = zip(*(torch.autograd.grad(logits, [qkv, out], vk, retain_graph=True) for vk in vectors),
                      strict=True)
    return {"attn.in_proj": (h.detach(), torch.stack(g_in)), "attn.out_proj": (o.detach(), torch.stack(g_out))}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("setting", ["expand", "reduce"])
def test_kfac_of_attention_projections_matches_its_definition_in_float64(setting, batch_first):
    """Eschenhagen et al. (2023), eq. 9 (expand) and 12 (reduce), with the bias as a last input column."""
    torch.manual_seed(0)
    model = MHANet(batch_first=batch_first).double()
    x, y = data("mha", n=3, dtype=torch.float64)
    ref = _reference_projections(model, x, y)
    plain = copy.deepcopy(model)
    CE(plain(x), y).backward()
    maker = precond.make("kfac", model, CE, fisher_type="exact", ema_decay=0.0, weight_sharing=setting,
                         low_rank=False)  # dense factors to compare (the low-rank solve is tested on its own)
    maker.forward_backward(x, y)
    n = x.shape[0]
    for name, (a, g) in ref.items():
        a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)  # [N, L, d_in + 1]
        if setting == "expand":
            fa = torch.einsum("nli,nlj->ij", a, a) / n
            fg = torch.einsum("knli,knlj->ij", g, g) / a.shape[1]
        else:
            am, gs = a.mean(1), g.sum(2)
            fa = am.T @ am / n
            fg = torch.einsum("kni,knj->ij", gs, gs)
        rep = maker.reps[name]
        torch.testing.assert_close(rep.A[0], fa, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(rep.G[0], fg, rtol=1e-10, atol=1e-12)
    # and the preconditioned gradient of the packed input projection is G⁻¹ [∇W, ∇b] A⁻¹ of those factors
    rep = maker.reps["attn.in_proj"]
    grad = torch.cat([plain.attn.in_proj_weight.grad, plain.attn.in_proj_bias.grad[:, None]], dim=1)
    expected = rep.G_inv[0] @ grad @ rep.A_inv[0]
    torch.testing.assert_close(model.attn.in_proj_weight.grad, expected[:, :-1])
    torch.testing.assert_close(model.attn.in_proj_bias.grad, expected[:, -1])


@pytest.mark.parametrize("kind", ["mha", "sdpa"])
def test_matrix_free_products_on_attention_match_torch_func(kind, ref):
    torch.manual_seed(0)
    model = MODELS[kind]().double()
    x, y = data(kind, n=3, dtype=torch.float64)
    params = [p for p in model.parameters()]
    vec = torch.randn(sum(p.numel() for p in params), dtype=torch.float64)
    with sdpa_kernel([SDPBackend.MATH]):  # the reference's own double backward needs it too
        ggn, hess = ref.ggn(model, CE, x, y), ref.hessian(model, CE, x, y)
    torch.testing.assert_close(precond.ggn_vp(model, CE, x, y, vec), ggn @ vec)
    torch.testing.assert_close(precond.fisher_vp(model, CE, x, y, vec, fisher_type="exact"), ggn @ vec)
    torch.testing.assert_close(precond.hessian_vp(model, CE, x, y, vec), hess @ vec)
    # float32 on CPU would pick a fused attention kernel without double backward: the products choose the math one
    model32 = MODELS[kind]()
    x32, _ = data(kind, n=3)
    v32 = torch.randn(sum(p.numel() for p in model32.parameters()))
    assert torch.isfinite(precond.hessian_vp(model32, CE, x32, y, v32)).all()
    assert torch.isfinite(precond.top_eigenvalues(model32, CE, x32, y, k=1, max_iters=3)[0]).all()


class Scale(nn.Module):
    """A layer no method has a representation for (a learned per-feature scale)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s


@pytest.mark.parametrize("method", METHODS)
def test_unsupported_is_accepted_by_every_method(method):
    torch.manual_seed(0)
    model = nn.Sequential(Scale(4), nn.Linear(4, 3))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    with pytest.raises(ValueError, match="unsupported="):
        precond.make(method, model, CE, unsupported="skip")
    maker = precond.make(method, model, CE, unsupported="identity")
    plain = copy.deepcopy(model)
    CE(plain(x), y).backward()
    maker.forward_backward(x, y)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    if isinstance(maker, precond.CurvatureGradients):
        torch.testing.assert_close(model[0].s.grad, plain[0].s.grad)  # identity: the plain gradient
        with pytest.raises(ValueError, match=r"'0' \(Scale\).*unsupported='identity'"):
            precond.make(method, model, CE, unsupported="error")
    else:  # these precondition every parameter by its shape (or matrix-free): nothing is unsupported
        precond.make(method, model, CE, unsupported="error")


def test_cross_attention_is_refused_with_a_clear_error():
    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.head = nn.MultiheadAttention(6, 2, batch_first=True), nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.attn(x, x.flip(1), x.flip(1))[0].mean(1))

    x, y = data("mha")
    with pytest.raises(ValueError, match="self-attention.*ignore_modules"):
        precond.make("kfac", Cross(), CE).forward_backward(x, y)
    with pytest.raises(ValueError, match="kdim"):
        precond.make("kfac", nn.Sequential(nn.MultiheadAttention(6, 2, kdim=4)), CE)


@pytest.mark.slow
def test_kfac_takes_a_step_on_torchvision_vit_b_16():
    """torchvision's ViT-B/16 (86M parameters, nn.MultiheadAttention, a root-level class token), 32×32 inputs."""
    torch.manual_seed(0)
    model = models.get_model("tv:vit_b_16", num_classes=10, in_shape=(3, 32, 32))
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision starts the head at zero: no gradient below
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    plain = copy.deepcopy(model)
    CE(plain(x), y).backward()
    maker = precond.make("kfac", model, CE, ema_decay=0.0)  # the 3073-dim input factors by their 10 rows (SMW)
    maker.forward_backward(x, y)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    attn, ref = model.encoder.layers[0].self_attention, plain.encoder.layers[0].self_attention
    assert not torch.allclose(attn.in_proj_weight.grad, ref.in_proj_weight.grad, rtol=1e-3)
    torch.testing.assert_close(model.class_token.grad, plain.class_token.grad)  # container parameter: plain
    assert maker.reps["encoder.layers.encoder_layer_0.mlp.3"].UA is not None
