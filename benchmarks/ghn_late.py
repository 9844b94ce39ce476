"""Diagnosis of the late fine-tuning phase, where default init overtakes GHN init: variants of GHN init.

``prenorm``: does the predicted weights' scale before BatchNorm slow fine-tuning down? Predicted conv weights
that feed a BatchNorm are larger than default init (``cnn`` on digits: the stem 5.5x,
the second conv 1.9x). BatchNorm makes the network invariant to that scale, but the gradient of a
scale-invariant weight shrinks as ``1/||W||`` and its relative SGD step as ``1/||W||^2``, so a large predicted
weight learns slowly. The test: fine-tune GHN init as predicted and with every pre-BatchNorm weight rescaled to
its default-init norm (the same function after BN statistics are re-estimated), against default init, on the
same seeds and batches.

``noise=E``: is it the predicted tensors' low diversity (repeated tiles, low effective rank)? GHN init with
symmetry-breaking noise of relative std ``E`` (``predict_into(noise=E)``; 0 is the plain prediction).

Every variant is paired with the plain prediction (``noise=0``) and with default init on the same seeds and
batches; the table gives the paired differences at each k.

    python benchmarks/ghn_late.py --dataset digits --variants prenorm
    python benchmarks/ghn_late.py --dataset fashion-mnist --grid sgd:0.03 adamw:1e-3 --variants prenorm
    python benchmarks/ghn_late.py --dataset fashion-mnist --grid sgd:0.03 adamw:1e-3 --variants noise=0.05 noise=0.3

Writes ``benchmarks/results/ghn_late-<dataset><tag>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ghn import finetune_curve, init_model  # noqa: E402

from quicktrain.data import get_dataset  # noqa: E402
from quicktrain.ghn import load_checkpoint, shipped_checkpoints  # noqa: E402
from quicktrain.ghn.predict import reestimate_bn  # noqa: E402

KS = (10, 25, 50, 100, 200)


def rescale_before_bn(model: torch.nn.Module, reference: torch.nn.Module) -> list[str]:
    """Rescale each Conv2d/Linear weight directly followed by a BatchNorm to ``reference``'s norm."""
    names = []
    modules = list(model.named_modules())
    ref = dict(reference.named_parameters())
    for (name, m), (_, nxt) in zip(modules, modules[1:], strict=False):
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and isinstance(nxt, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.mul_(ref[f"{name}.weight"].norm() / m.weight.norm())
            names.append(f"{name}.weight")
    return names


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--model", default="cnn")
    p.add_argument("--grid", nargs="+", default=["sgd:0.03", "sgd:0.1", "adamw:1e-3", "adamw:3e-3"])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--variants", nargs="+", default=["prenorm"], help="prenorm, noise=E")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    torch.set_num_threads(1)
    ds = get_dataset(args.dataset)
    ghn = load_checkpoint(shipped_checkpoints()[args.dataset]).eval()
    xtr, ytr = ds.train.tensors
    xte, yte = ds.test.tensors[0][: args.test_size], ds.test.tensors[1][: args.test_size]
    bn = [xtr[i * 128 : (i + 1) * 128] for i in range(4)]
    curves: dict[str, dict[int, float]] = {}
    for entry in args.grid:
        opt, lr = entry.split(":")
        for seed in range(args.seeds):
            default, _ = init_model(args.model, ds, ghn, bn, use_ghn=False, seed=seed)
            inits = {"default": default}
            inits["ghn"], _ = init_model(args.model, ds, ghn, bn, use_ghn=True, seed=seed, head_norm="default")
            for variant in args.variants:
                noise = float(variant.split("=")[1]) if variant.startswith("noise=") else 0.0
                m, _ = init_model(args.model, ds, ghn, bn, use_ghn=True, seed=seed, noise=noise, head_norm="default")
                if variant == "prenorm":
                    print("rescaled to default-init norm:", rescale_before_bn(m, default), flush=True)
                    reestimate_bn(m, bn)
                inits[variant] = m
            for kind, m in inits.items():
                c = finetune_curve(m, xtr, ytr, xte, yte, opt=opt, lr=float(lr), seed=seed, steps=args.steps)
                curves[f"{entry} s{seed} {kind}"] = c
                print(entry, seed, f"{kind:12s}", " ".join(f"{k}:{c[k]:.3f}" for k in (0, *KS)), flush=True)
    runs = sorted({k.rsplit(" ", 1)[0] for k in curves})

    def paired(a: str, b: str, k: int) -> list[float]:
        d = [100 * (curves[f"{r} {a}"][k] - curves[f"{r} {b}"][k]) for r in runs]
        return [statistics.mean(d), statistics.stdev(d)]

    table = {v: {k: paired(v, "ghn", k) for k in KS} for v in args.variants}
    table["ghn vs default"] = {k: paired("ghn", "default", k) for k in KS}
    print(f"\n{len(runs)} paired runs; points, mean ± sd; 'ghn' is the plain prediction (head at default norm)")
    print("| variant − ghn | " + " | ".join(f"k={k}" for k in KS) + " |\n|---|" + "---|" * len(KS))
    for v, row in table.items():
        print(f"| {v} | " + " | ".join(f"{m:+.2f} ± {sd:.2f}" for m, sd in row.values()) + " |")
    out = Path(__file__).resolve().parent / "results" / f"ghn_late-{args.dataset}{args.tag}.json"
    out.write_text(json.dumps({"args": vars(args), "paired": table, "curves": curves}, indent=1))


if __name__ == "__main__":
    main()
