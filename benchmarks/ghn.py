"""GHN benchmark: predicted parameters on architectures the GHN never saw in training.

(1) test accuracy with predicted parameters and no training, on the in-distribution (``test``), ``deep`` and
    ``wide`` splits and on quicktrain's registry models, against chance and default init;
(2) accuracy after k = 0, 10, 50, 200 fine-tuning steps from GHN init vs default init (same Adam learning
    rate grid for both; the best rate of the grid is reported at each k) and steps saved to reach a target;
(3) ablations: GHNs meta-trained without graph information and without the parameter regulariser;
(4) prediction time per model and GHN training time (read from the checkpoints).

Usage::

    python benchmarks/ghn.py --datasets digits fashion-mnist --archs 10 \
        --ablations digits:/tmp/ghnruns/digits-nograph.pt,/tmp/ghnruns/digits-noreg.pt

Writes ``benchmarks/results/ghn.json`` and prints Markdown tables. Very deep/large targets, GHN size and
few-shot transfer are in the sibling ``benchmarks/ghn_scale.py``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from quicktrain import models
from quicktrain.data import get_dataset
from quicktrain.ghn import build_arch, load_checkpoint, predict_into, reestimate_bn, shipped_checkpoints
from quicktrain.ghn.checkpoint import read_checkpoint

REGISTRY = ["cnn", "mlp", "resnet20", "vit_tiny", "mobilenetv2_tiny"]
SPLITS = ["test", "deep", "wide"]
KS = [0, 10, 50, 200]
LRS = [1e-3, 3e-3]


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(
        int((model(a).argmax(1) == b).sum()) for a, b in zip(x.split(500), y.split(500), strict=True)
    )
    return correct / len(y)


def build(name: str, ds) -> torch.nn.Module:
    if name.startswith(tuple(s + ":" for s in SPLITS)):
        split, idx = name.split(":")
        return build_arch(split, int(idx), in_shape=ds.in_shape, num_classes=ds.num_classes)
    return models.get_model(name, num_classes=ds.num_classes, in_shape=ds.in_shape)


def init_model(name, ds, ghn, bn, *, use_ghn: bool, seed: int, noise: float = 0.0):
    """Build ``name`` (default init from ``seed``) or predict it with the GHN; re-estimate BN stats."""
    torch.manual_seed(seed)
    model = build(name, ds)
    seconds = None
    if use_ghn:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an unsupported parameter would make the comparison unfair
            rep = predict_into(
                model,
                ghn,
                example_inputs=bn[0][:2],
                noise=noise,
                generator=torch.Generator().manual_seed(seed),
            )
        seconds = rep.seconds
    reestimate_bn(model, bn)
    return model, seconds


def finetune_curve(model, xtr, ytr, xte, yte, *, lr: float, seed: int) -> dict[int, float]:
    """Adam fine-tuning for max(KS) steps (batch 64); test accuracy at every k in KS, every 10 steps up to
    50 and every 25 steps after (the resolution of "steps to target")."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    curve = {0: accuracy(model, xte, yte)}
    for step in range(1, max(KS) + 1):
        model.train()
        b = torch.randint(len(ytr), (64,), generator=g)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(xtr[b]), ytr[b]).backward()
        opt.step()
        if step in KS or (step % 10 == 0 and step <= 50) or step % 25 == 0:
            curve[step] = accuracy(model, xte, yte)
    return curve


def steps_to(curve: dict[int, float], target: float) -> int | None:
    hits = [k for k in sorted(curve) if curve[k] >= target]
    return hits[0] if hits else None


def run_dataset(name: str, ckpt: Path, args) -> dict:
    ghn = load_checkpoint(ckpt)
    meta = read_checkpoint(ckpt)
    data = get_dataset(name)
    ds = ghn.dataset
    xtr, ytr = data.train.tensors
    xte, yte = data.test.tensors[0][: args.test_size], data.test.tensors[1][: args.test_size]
    bn = [xtr[i * 128 : (i + 1) * 128] for i in range(4)]
    res: dict = {
        "checkpoint": str(ckpt),
        "command": meta.get("command"),
        "train": meta.get("train", {}).get("args"),
        "train_seconds": meta.get("train", {}).get("seconds"),
        "train_steps": meta.get("train", {}).get("step"),
        "chance": 1 / ds.num_classes,
        "zero_shot": {},
        "finetune": {},
        "predict_seconds": {},
    }
    # (1) zero-shot accuracy
    groups = {s: [f"{s}:{i}" for i in range(args.archs)] for s in SPLITS}
    groups["registry"] = REGISTRY
    for group, names in groups.items():
        ghn_acc, def_acc, secs = [], [], []
        for n in names:
            m, s = init_model(n, ds, ghn, bn, use_ghn=True, seed=0)
            ghn_acc.append(accuracy(m, xte, yte))
            secs.append(s)
            m, _ = init_model(n, ds, ghn, bn, use_ghn=False, seed=0)
            def_acc.append(accuracy(m, xte, yte))
        res["zero_shot"][group] = {"models": names, "ghn": ghn_acc, "default": def_acc}
        res["predict_seconds"][group] = statistics.mean(secs)
        print(
            f"[{name}] {group}: GHN {statistics.mean(ghn_acc):.3f} default {statistics.mean(def_acc):.3f}",
            flush=True,
        )
    # (2) fine-tuning curves
    for n in args.finetune:
        curves = {}
        for init in ("ghn", "default"):
            per_lr = {}
            for lr in LRS:
                m, _ = init_model(
                    n, ds, ghn, bn, use_ghn=init == "ghn", seed=1, noise=args.noise if init == "ghn" else 0
                )
                per_lr[lr] = finetune_curve(m, xtr, ytr, xte, yte, lr=lr, seed=1)
            # best rate of the grid at each k (same grid for both inits)
            curves[init] = {k: max(per_lr[lr][k] for lr in LRS) for k in per_lr[LRS[0]]}
        target = args.target_frac * curves["default"][max(KS)]
        s_ghn, s_def = steps_to(curves["ghn"], target), steps_to(curves["default"], target)
        res["finetune"][n] = {"curves": curves, "target": target, "steps_ghn": s_ghn, "steps_default": s_def}
        print(
            f"[{name}] finetune {n}: "
            + " ".join(f"k={k}: {curves['ghn'][k]:.3f}/{curves['default'][k]:.3f}" for k in KS)
            + f" steps to {target:.3f}: {s_ghn} vs {s_def}",
            flush=True,
        )
    return res


def run_ablation(name: str, ckpts: list[Path], args) -> dict:
    data = get_dataset(name)
    xtr = data.train.tensors[0]
    xte, yte = data.test.tensors[0][: args.test_size], data.test.tensors[1][: args.test_size]
    bn = [xtr[i * 128 : (i + 1) * 128] for i in range(4)]
    out = {}
    for ckpt in ckpts:
        ghn = load_checkpoint(ckpt)
        accs = {}
        for split in ("test", "deep", "wide"):
            accs[split] = statistics.mean(
                accuracy(init_model(f"{split}:{i}", ghn.dataset, ghn, bn, use_ghn=True, seed=0)[0], xte, yte)
                for i in range(args.archs)
            )
        out[str(ckpt)] = {"command": read_checkpoint(ckpt).get("command"), "zero_shot": accs}
        print(f"[{name}] ablation {ckpt}: {accs}", flush=True)
    return out


def tv_timing(names: list[str]) -> dict:
    """Seconds to trace + predict + write all parameters of torchvision models (3x32x32, 10 classes).

    Uses an untrained T-size GHN: the time does not depend on its weights.
    """
    from quicktrain.ghn import GHN, DatasetInfo, ghn_config

    ghn = GHN(ghn_config("T"), DatasetInfo("timing", (3, 32, 32), 10)).eval()
    out = {}
    for n in names:
        model = models.get_model(f"tv:{n}", num_classes=10, in_shape=(3, 32, 32))
        rep = predict_into(model, ghn, example_inputs=torch.zeros(2, 3, 32, 32))
        params = sum(p.numel() for p in model.parameters())
        out[n] = {"seconds": rep.seconds, "params": params, "tensors": len(rep.predicted)}
        print(f"[timing] {n}: {params / 1e6:.1f} M params, {len(rep.predicted)} tensors, {rep.seconds:.2f} s")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="*", default=["digits", "fashion-mnist"])
    p.add_argument("--archs", type=int, default=10, help="architectures per split")
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--finetune", nargs="*", default=["test:0", "cnn", "resnet20"])
    p.add_argument(
        "--target-frac", type=float, default=0.95, help="target = frac * default-init acc at k=200"
    )
    p.add_argument("--noise", type=float, default=0.05, help="GHN-init symmetry-breaking noise (fine-tuning)")
    p.add_argument("--ablations", nargs="*", default=[], help="DATASET:CKPT[,CKPT...] GHNs to compare")
    p.add_argument("--tv-timing", nargs="*", default=[], help="torchvision models to time prediction on")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/ghn.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shipped = shipped_checkpoints()
    t0 = time.time()
    results = {
        "env": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": args.threads,
            "cpu": platform.processor() or platform.machine(),
        },
        "args": vars(args),
        "datasets": {},
    }
    for name in args.datasets:
        if name not in shipped:
            raise SystemExit(f"no shipped GHN for {name!r} (shipped: {sorted(shipped)})")
        results["datasets"][name] = run_dataset(name, shipped[name], args)
    results["ablations"] = {}
    for spec in args.ablations:
        name, paths = spec.split(":", 1)
        results["ablations"][name] = run_ablation(name, [Path(x) for x in paths.split(",")], args)
    results["tv_timing"] = tv_timing(args.tv_timing)
    results["seconds"] = time.time() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print_tables(results)


def print_tables(results: dict) -> None:
    mean = statistics.mean
    print("\n| dataset | split | models | chance | default init | GHN (no training) | predict s/model |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results["datasets"].items():
        for group, z in r["zero_shot"].items():
            print(
                f"| {name} | {group} | {len(z['models'])} | {r['chance']:.3f} | {mean(z['default']):.3f} | "
                f"{mean(z['ghn']):.3f} | {r['predict_seconds'][group]:.3f} |"
            )
    print("\n| dataset | model | init | " + " | ".join(f"k={k}" for k in KS) + " | steps to target |")
    print("|---|---|---|" + "---|" * len(KS) + "---|")
    for name, r in results["datasets"].items():
        for m, f in r["finetune"].items():
            for init in ("ghn", "default"):
                c = f["curves"][init]
                steps = f[f"steps_{init}"]
                print(
                    f"| {name} | {m} | {init} | "
                    + " | ".join(f"{c[k]:.3f}" for k in KS)
                    + f" | {steps if steps is not None else '>200'} (target {f['target']:.3f}) |"
                )
    if results.get("tv_timing"):
        print("\n| torchvision model | params (M) | tensors | predict s |")
        print("|---|---|---|---|")
        for n, t in results["tv_timing"].items():
            print(f"| {n} | {t['params'] / 1e6:.1f} | {t['tensors']} | {t['seconds']:.2f} |")
    if results.get("ablations"):
        print("\n| dataset | GHN | test | deep | wide |")
        print("|---|---|---|---|---|")
        for name, abl in results["ablations"].items():
            for ckpt, a in abl.items():
                z = a["zero_shot"]
                print(f"| {name} | {Path(ckpt).name} | {z['test']:.3f} | {z['deep']:.3f} | {z['wide']:.3f} |")


if __name__ == "__main__":
    main()
