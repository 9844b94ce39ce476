"""Very deep and very large targets: a ~1,000-layer ResNet and a ViT with over 10^9 parameters.

GHN-3 (Knyazev et al., ICML 2023, Sec. 5) initialises a ResNet with about 1,000 layers and a ViT with over a
billion parameters. Here every step scales to such models on a CPU:

* graph construction is one traced forward pass and an iterative walk of the autograd graph; shortest paths
  are sparse with a cutoff (:func:`~quicktrain.ghn.graph.shortest_paths`, ``O(N * reach)``);
* the GHN's attention is exact but computed per query block from the sparse distances
  (:class:`~quicktrain.ghn.model.DistanceBias`): no ``[N, N]`` tensor;
* decoding is batched by route (:meth:`~quicktrain.ghn.model.GHN.iter_predictions`) and every predicted
  tensor is written into the model in place as soon as it is decoded, so no second copy of the model exists.

The model is built with real (default-initialised) weights, not on the ``meta`` device: the predictions must
be written into real storage anyway, and tracing with real weights adds no copy of them (autograd saves
references to the weights, and the activations of a one-example forward pass are small). Peak memory is
therefore the model itself plus a bounded overhead, which :func:`measure_prediction` reports.

Scale models: ``resnet<depth>`` (CIFAR ResNet, ``depth = 6n + 2``, e.g. ``resnet998``, ``resnet1202``) and
``vit1b`` (the registry ViT with 2048-dim tokens, 30 blocks, 16 heads, MLP ratio 2: 1.01 x 10^9 parameters).
"""

from __future__ import annotations

import math
import re
import resource
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from quicktrain.models.resnet import cifar_resnet
from quicktrain.models.vit import VisionTransformer

from .graph import model_to_graph
from .model import GHN
from .predict import predict_into, reestimate_bn

VIT_1B = {"dim": 2048, "depth": 30, "heads": 16}
_RESNET = re.compile(r"resnet(\d+)")


def is_scale_model(name: str) -> bool:
    """Whether ``name`` is a scale model (``resnet<depth>`` with ``depth = 6n + 2``, or ``vit1b``)."""
    m = _RESNET.fullmatch(name)
    return name == "vit1b" or (m is not None and (int(m[1]) - 2) % 6 == 0 and int(m[1]) >= 8)


def build_scale_model(name: str, *, num_classes: int, in_shape: tuple[int, int, int]) -> nn.Module:
    """Build scale model ``name`` (default initialisation) for ``in_shape`` inputs and ``num_classes``.

    Raises:
        ValueError: ``name`` is not a scale model.
    """
    if not is_scale_model(name):
        raise ValueError(
            f"unknown scale model {name!r}; use resnet<depth> with depth = 6n + 2 (e.g. resnet998, resnet1202) "
            "or vit1b"
        )
    if name == "vit1b":
        patch = max(1, min(in_shape[1:]) // 4)  # 4x4 patches + a class token: 17 tokens
        return VisionTransformer(in_shape, num_classes, patch=patch, **VIT_1B)
    return cifar_resnet(int(name.removeprefix("resnet")), num_classes=num_classes, in_shape=in_shape)


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far, in GiB (``getrusage`` ``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def graph_seconds(
    depths: list[int], *, in_shape: tuple[int, int, int], sp_cutoff: int = 16, repeats: int = 3
) -> list[dict]:
    """Graph-construction time (trace + walk + sparse shortest paths) of CIFAR ResNets of each depth.

    The time is the minimum over ``repeats`` runs (the least disturbed by other processes on a shared CPU).
    """
    rows = []
    for depth in tqdm(depths, desc="graph", unit="model"):
        model = cifar_resnet(depth, num_classes=10, in_shape=in_shape)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            graph = model_to_graph(model, torch.zeros(1, *in_shape), sp_cutoff=sp_cutoff)
            times.append(time.perf_counter() - start)
        rows.append(
            {"depth": depth, "nodes": graph.num_nodes, "sp_pairs": int(graph.sp_dist.numel()), "s": min(times)}
        )
    return rows


def loglog_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x`` (1 = linear growth, 2 = quadratic)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def measure_prediction(
    name: str,
    ghn: GHN,
    *,
    bn_batches: list[Tensor] | None = None,
    example_inputs: Tensor | None = None,
) -> tuple[nn.Module, dict]:
    """Build scale model ``name``, predict all its parameters in place and report time and memory.

    Run it in a fresh process (``quicktrain ghn scale``) for ``peak_rss_gib`` to describe this model alone.

    Returns:
        ``(model, report)`` with build/predict seconds, parameter count and bytes, predicted tensors, graph
        nodes, and the process's peak RSS in GiB.
    """
    if ghn.dataset is None:
        raise ValueError("this GHN has no dataset info; load it from a checkpoint (quicktrain ghn train)")
    ds = ghn.dataset
    start = time.perf_counter()
    model = build_scale_model(name, num_classes=ds.num_classes, in_shape=ds.in_shape)
    build_s = time.perf_counter() - start
    rss_model = peak_rss_gib()
    n_params = sum(p.numel() for p in model.parameters())
    inputs = example_inputs if example_inputs is not None else torch.zeros(1, *ds.in_shape)
    # without bn_batches this measures prediction only: the statistics are not used, so they are kept
    bn = bn_batches if bn_batches is not None else "keep"
    rep = predict_into(model, ghn, example_inputs=inputs, bn_batches=bn, progress=True)
    return model, {
        "model": name,
        "params": n_params,
        "param_gib": n_params * 4 / 2**30,
        "tensors": len(rep.predicted),
        "unsupported": rep.unsupported,
        "build_s": build_s,
        "predict_s": rep.seconds,
        "peak_rss_after_build_gib": rss_model,
        "peak_rss_gib": peak_rss_gib(),
    }


def sgd_losses(
    model: nn.Module, x: Tensor, y: Tensor, *, steps: int, batch: int, lr: float, seed: int = 0
) -> list[float]:
    """Training losses of ``steps`` SGD steps (momentum 0.9) on random batches of ``(x, y)``.

    Stops early (the rest of the list is missing) at the first non-finite loss, which is recorded.
    """
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    model.train()
    for _ in tqdm(range(steps), desc="sgd", unit="step"):
        b = torch.randint(len(y), (batch,), generator=g)
        loss = F.cross_entropy(model(x[b]), y[b])
        losses.append(float(loss))
        if not math.isfinite(losses[-1]):
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return losses


def compare_training(
    name: str, ghn: GHN, x: Tensor, y: Tensor, *, steps: int, batch: int, lr: float, seed: int = 0
) -> dict:
    """SGD losses of scale model ``name`` from GHN-predicted parameters and from default init (same batches).

    Both models re-estimate BatchNorm statistics on the same 4 batches before training.
    """
    bn = [x[i * 64 : (i + 1) * 64] for i in range(4)]
    out = {}
    for init in ("ghn", "default"):
        torch.manual_seed(seed)
        if init == "ghn":
            model, _ = measure_prediction(name, ghn, bn_batches=bn, example_inputs=x[:1])
        else:
            ds = ghn.dataset
            model = build_scale_model(name, num_classes=ds.num_classes, in_shape=ds.in_shape)
            reestimate_bn(model, bn)
        out[init] = sgd_losses(model, x, y, steps=steps, batch=batch, lr=lr, seed=seed)
        del model
    return out


__all__ = [
    "VIT_1B",
    "build_scale_model",
    "compare_training",
    "graph_seconds",
    "is_scale_model",
    "loglog_slope",
    "measure_prediction",
    "peak_rss_gib",
    "sgd_losses",
]
