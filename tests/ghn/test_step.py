"""The batched meta-training step computes what a per-tensor reference computes, and the shipped GHNs still
predict what they predicted.

The reference decodes every tile of every tensor on its own, from the definitions: the conv decoder with its
full-size weights, the tile cropped afterwards; assembly by repetition (beyond ``tile_limit`` tiles) and
centre zero-padding of kernels; :func:`normalize_param`, the residual depth scale and the type gain per tensor;
the regulariser as a sum of ``vector_norm`` s; the networks in NCHW.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from quicktrain import models
from quicktrain.ghn import GHN, DatasetInfo, ghn_config, model_to_graph
from quicktrain.ghn.meta import ArchPool, meta_loss
from quicktrain.ghn.model import normalize_param, tile_code
from quicktrain.ghn.predict import default_checkpoint, resolve_ghn


def _reference_params(ghn: GHN, graph) -> dict[str, torch.Tensor]:
    p = ghn.prepare(graph)
    h = ghn.embed([p])[0]
    dec, c = ghn.decoder, ghn.config
    co, ci, k, _ = c.chunk
    out = {}
    for job in p.jobs:
        ga, gb = ghn._grid(job)
        o, i, kh, kw = job.view

        def emb(a, b, job=job):
            return h[job.node] + ghn.tile_proj(tile_code(torch.tensor([[a, b]])).flatten(1).to(h.dtype))[0]

        if job.route == "cls_b":
            w = ghn.class_bias(h[job.node])
        elif job.route == "1d":
            w = torch.cat([ghn.decoder_1d(emb(a, 0)) for a in range(ga)])[: min(o, ga * c.chunk_1d)]
            w = w[torch.arange(o) % len(w)]
        else:
            kt = (1, 1) if job.route == "cls" else (min(kh, k), min(kw, k))
            y0, x0 = (k - kt[0]) // 2, (k - kt[1]) // 2
            rows = []
            for a in range(ga):
                row = []
                for b in range(gb):
                    z = torch.relu(dec.fc(emb(a, b))).view(dec.h0, k, k)[:, y0 : y0 + kt[0], x0 : x0 + kt[1]]
                    t = dec.out(torch.relu(dec.conv1(z.permute(1, 2, 0)))).view(*kt, co, ci).permute(2, 3, 0, 1)
                    if job.route == "cls":
                        t = dec.classifier(torch.relu(t[:, :, 0, 0]).t()).t()[:, :, None, None]
                    row.append(t)
                rows.append(torch.cat(row, 1))
            w = torch.cat(rows)
            w = w[: (len(w) if job.route == "cls" else min(o, ga * co)), : min(i, gb * ci)]
            w = w[torch.arange(o) % w.shape[0]][:, torch.arange(i) % w.shape[1]]
            ph, pw = kh - kt[0], kw - kt[1]
            w = F.pad(w, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        w = normalize_param(w.reshape(job.shape), job.ptype, is_last=job.is_last) * job.scale
        out[job.name] = w * ghn.log_gain[job.ptype.id].exp() if w.dim() >= 2 else w
    return out


def _reference_loss(ghn, nets, graphs, xs, ys, reg):
    params = [_reference_params(ghn, g) for g in graphs]
    ce = sum(F.cross_entropy(functional_call(m, p, (x,)), y) for m, p, x, y in zip(nets, params, xs, ys, strict=True))
    norms = torch.stack([sum(torch.linalg.vector_norm(w) for w in p.values()) for p in params])
    return ce / len(nets) + reg * norms.mean()


def test_meta_loss_and_gradients_equal_the_per_tensor_reference_in_float64():
    torch.manual_seed(0)
    shape = (1, 12, 12)
    cfg = ghn_config("T", hid=32, heads=4, layers=2, dec_hid=(16, 32), chunk=(16, 16, 3, 3), chunk_1d=16, tile_limit=2)
    ghn = GHN(cfg, DatasetInfo("x", shape, 5)).double()
    with torch.no_grad():  # no zero-initialised part (distance biases, gains, biases) may hide a difference
        for p in ghn.parameters():
            p.add_(0.1 * torch.randn_like(p))
    pool = ArchPool(ghn, 12, seed=1, in_shape=shape, num_classes=5, exclude=set())
    nets, graphs = map(list, zip(*(pool[j] for j in range(len(pool))), strict=True))
    for m in nets:
        m.double()
    jobs = [j for g in graphs for j in g.jobs]  # the pool exercises every route and every assembly case
    assert {j.route for j in jobs} == {"nd", "1d", "cls", "cls_b"}
    assert any(math.prod(ghn._grid(j)) > 1 for j in jobs)  # several tiles
    assert any(j.route == "nd" and j.view[0] > cfg.tile_limit * cfg.chunk[0] for j in jobs)  # repeated tiles
    assert any(j.view[2] > cfg.chunk[2] for j in jobs)  # zero-padded kernels
    assert any(j.squash == "sigmoid" for j in jobs) and any(j.scale < 1 for j in jobs)
    xs = [torch.randn(4, *shape, dtype=torch.float64) for _ in nets]
    ys = [torch.randint(5, (4,)) for _ in nets]

    total, _, _ = meta_loss(ghn, nets, xs, ys, reg=0.1, graphs=graphs)
    got = torch.autograd.grad(total, list(ghn.parameters()), allow_unused=True)
    want_total = _reference_loss(ghn, nets, graphs, xs, ys, reg=0.1)
    want = torch.autograd.grad(want_total, list(ghn.parameters()), allow_unused=True)
    torch.testing.assert_close(total, want_total, rtol=1e-12, atol=0)
    for (name, _), g, w in zip(ghn.named_parameters(), got, want, strict=True):
        assert (g is None) == (w is None), name
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12 * float(w.abs().max()), msg=name)


@pytest.mark.parametrize("dataset", ["digits", "fashion-mnist"])
def test_shipped_checkpoint_loads_and_predicts_as_the_reference(dataset):
    ghn = resolve_ghn(default_checkpoint(dataset))  # strict load: the parameter names are unchanged
    shape, classes = ghn.dataset.in_shape, ghn.dataset.num_classes
    nets = [models.get_model(n, num_classes=classes, in_shape=shape) for n in ("cnn", "resnet20", "vit_tiny")]
    graphs = [model_to_graph(m, torch.zeros(2, *shape)) for m in nets]
    pool = ArchPool(ghn, 3, seed=5, in_shape=shape, num_classes=classes, exclude=set())
    graphs += [pool[j][1] for j in range(len(pool))]
    with torch.no_grad():
        for graph, got in zip(graphs, ghn(graphs), strict=True):
            want = _reference_params(ghn, graph)
            assert got.keys() == want.keys()
            for name, w in want.items():
                torch.testing.assert_close(got[name], w, rtol=1e-4, atol=1e-5 * float(w.abs().max()), msg=name)
