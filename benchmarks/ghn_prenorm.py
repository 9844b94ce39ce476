"""Diagnosis: does the predicted weights' scale before BatchNorm slow fine-tuning down?

Predicted conv weights that feed a BatchNorm are larger than default init (``cnn`` on digits: the stem 5.5x,
the second conv 1.9x). BatchNorm makes the network invariant to that scale, but the gradient of a
scale-invariant weight shrinks as ``1/||W||`` and its relative SGD step as ``1/||W||^2``, so a large predicted
weight learns slowly. The test: fine-tune GHN init as predicted and with every pre-BatchNorm weight rescaled to
its default-init norm (the same function after BN statistics are re-estimated), against default init, on the
same seeds and batches; print paired differences at each k.

    python benchmarks/ghn_prenorm.py --dataset digits
    python benchmarks/ghn_prenorm.py --dataset fashion-mnist --grid sgd:0.03 adamw:1e-3

Writes ``benchmarks/results/ghn_prenorm-<dataset>.json``.
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
            inits["ghn_rescaled"], _ = init_model(args.model, ds, ghn, bn, use_ghn=True, seed=seed, head_norm="default")
            rescaled = rescale_before_bn(inits["ghn_rescaled"], default)
            reestimate_bn(inits["ghn_rescaled"], bn)
            for kind, m in inits.items():
                c = finetune_curve(m, xtr, ytr, xte, yte, opt=opt, lr=float(lr), seed=seed, steps=args.steps)
                curves[f"{entry} s{seed} {kind}"] = c
                print(entry, seed, f"{kind:13s}", " ".join(f"{k}:{c[k]:.3f}" for k in (0, *KS)), flush=True)
    runs = sorted({k.rsplit(" ", 1)[0] for k in curves})
    paired = {}
    for k in KS:
        d = [100 * (curves[f"{r} ghn_rescaled"][k] - curves[f"{r} ghn"][k]) for r in runs]
        e = [100 * (curves[f"{r} ghn"][k] - curves[f"{r} default"][k]) for r in runs]
        paired[k] = {
            "rescaled_minus_ghn": [statistics.mean(d), statistics.stdev(d)],
            "ghn_minus_default": [statistics.mean(e), statistics.stdev(e)],
        }
    print(f"\nrescaled pre-BN weights: {rescaled}")
    print("| k | rescaled − GHN (points, mean ± sd) | GHN − default |\n|---|---|---|")
    for k, v in paired.items():
        a, b = v["rescaled_minus_ghn"], v["ghn_minus_default"]
        print(f"| {k} | {a[0]:+.2f} ± {a[1]:.2f} | {b[0]:+.2f} ± {b[1]:.2f} |")
    out = Path(__file__).resolve().parent / "results" / f"ghn_prenorm-{args.dataset}.json"
    out.write_text(json.dumps({"args": vars(args), "rescaled": rescaled, "paired": paired, "curves": curves}, indent=1))


if __name__ == "__main__":
    main()
