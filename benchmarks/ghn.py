"""GHN benchmark: predicted parameters on architectures the GHN never saw in training.

(1) test accuracy with predicted parameters and no training, on the in-distribution (``test``), ``deep`` and
    ``wide`` splits and on quicktrain's registry models, against chance and default init;
(2) accuracy after k = 0, 10, 25, 50, 100, 200 fine-tuning steps from GHN init vs default init (AdamW and
    SGD, 3 learning rates each, median over seeds; the best rate of the same grid is reported at each k) and
    the steps default init needs to reach GHN init's 50-step accuracy;
(3) ablations: GHNs meta-trained without graph information and without the parameter regulariser;
(4) prediction time per model and GHN training time (read from the checkpoints);
(5) meta-training throughput: architecture-samples per CPU-second of this code's meta-training step (a fixed
    architecture pool, per-architecture image batches) against the code of ``--baseline-commit`` (the step of
    issue 13's "current code": new networks built and traced every step), measured in turns in one process,
    with the floor of a step (the sampled networks' own forward and backward, parameters held fixed).

Usage::

    python benchmarks/ghn.py --datasets digits fashion-mnist --archs 16 \
        --ablations digits:/tmp/ghnruns/digits-nograph.pt,/tmp/ghnruns/digits-noreg.pt
    python benchmarks/ghn.py --datasets --throughput-rounds 6   # throughput only

Writes ``benchmarks/results/ghn.json`` and prints Markdown tables. Very deep/large targets, GHN size and
few-shot transfer are in the sibling ``benchmarks/ghn_scale.py``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy import stats

from quicktrain import models
from quicktrain.data import get_dataset
from quicktrain.ghn import (
    GHN,
    DatasetInfo,
    build_arch,
    ghn_config,
    load_checkpoint,
    predict_into,
    reestimate_bn,
    shipped_checkpoints,
)
from quicktrain.ghn.checkpoint import read_checkpoint
from quicktrain.ghn.meta import ArchPool, ghn_optimizer, meta_loss

REGISTRY = ["cnn", "mlp", "resnet20", "vit_tiny", "mobilenetv2_tiny"]
SPLITS = ["test", "deep", "wide"]
KS = [0, 10, 25, 50, 100, 200]
LRS = {"adamw": [3e-4, 1e-3, 3e-3], "sgd": [0.01, 0.03, 0.1]}  # SGD with momentum 0.9


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(a).argmax(1) == b).sum()) for a, b in zip(x.split(500), y.split(500), strict=True))
    return correct / len(y)


def build(name: str, ds) -> torch.nn.Module:
    if name.startswith(tuple(s + ":" for s in SPLITS)):
        split, idx = name.split(":")
        return build_arch(split, int(idx), in_shape=ds.in_shape, num_classes=ds.num_classes)
    return models.get_model(name, num_classes=ds.num_classes, in_shape=ds.in_shape)


def init_model(name, ds, ghn, bn, *, use_ghn: bool, seed: int, noise: float = 0.0, head_norm: str = "predicted"):
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
                bn_batches=bn,
                noise=noise,
                generator=torch.Generator().manual_seed(seed),
                head_norm=head_norm,
            )
        return model, rep.seconds
    reestimate_bn(model, bn)
    return model, seconds


def finetune_curve(
    model, xtr, ytr, xte, yte, *, opt: str, lr: float, seed: int, steps: int, warmup: int = 0
) -> dict[int, float]:
    """``opt`` fine-tuning for ``steps`` steps (batch 64), the learning rate rising linearly over the first
    ``warmup`` steps; test accuracy at every k in KS and every 10 steps (the resolution of "steps to target")."""
    if opt == "adamw":
        optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    else:
        optim = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    curve = {0: accuracy(model, xte, yte)}
    for step in range(1, steps + 1):
        for group in optim.param_groups:
            group["lr"] = lr * min(1.0, step / warmup) if warmup > 0 else lr
        model.train()
        b = torch.randint(len(ytr), (64,), generator=g)
        optim.zero_grad(set_to_none=True)
        F.cross_entropy(model(xtr[b]), ytr[b]).backward()
        optim.step()
        if step in KS or step % 10 == 0:
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
    groups = {s: [f"{s}:{i}" for i in range(args.archs)] for s in SPLITS} if args.archs > 0 else {}
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
    # (2) fine-tuning curves: per optimizer and learning rate the median over seeds; then, at every k, the
    # best rate of the same grid for each init
    for n in args.finetune:
        curves, grid = {}, {}
        for init in ("ghn", "default"):
            per = {}
            for opt in args.ft_optimizers:
                for lr in LRS[opt]:
                    runs = []
                    for seed in range(args.ft_seeds):
                        m, _ = init_model(
                            n,
                            ds,
                            ghn,
                            bn,
                            use_ghn=init == "ghn",
                            seed=seed,
                            noise=args.noise if init == "ghn" else 0,
                            head_norm=args.ft_head_norm,
                        )
                        runs.append(
                            finetune_curve(m, xtr, ytr, xte, yte, opt=opt, lr=lr, seed=seed, steps=args.ft_steps,
                                           warmup=args.ft_warmup)
                        )
                    per[f"{opt}:{lr}"] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            grid[init] = per
            ks = next(iter(per.values())).keys()
            curves[init] = {k: max(c[k] for c in per.values()) for k in ks}
        ghn50 = curves["ghn"].get(50)
        s_def = steps_to(curves["default"], ghn50) if ghn50 is not None else None
        res["finetune"][n] = {
            "curves": curves,
            "grid": grid,
            "ghn_at_50": ghn50,
            "default_steps_to_ghn_at_50": s_def,
        }
        print(
            f"[{name}] finetune {n}: "
            + " ".join(f"k={k}: {curves['ghn'][k]:.3f}/{curves['default'][k]:.3f}" for k in KS if k in curves["ghn"])
            + f"; default init reaches GHN's 50-step {ghn50} at step {s_def}",
            flush=True,
        )
    return res


def run_ablation(name: str, ckpts: list[Path], args) -> dict:
    """Zero-shot accuracy of each GHN on the same unseen networks; every GHN after the first is compared with
    the first by the paired per-network difference (points, mean and 95% t-interval over networks)."""
    data = get_dataset(name)
    xtr = data.train.tensors[0]
    xte, yte = data.test.tensors[0][: args.test_size], data.test.tensors[1][: args.test_size]
    bn = [xtr[i * 128 : (i + 1) * 128] for i in range(4)]
    nets = [f"{split}:{i}" for split in SPLITS for i in range(args.archs)]
    out = {}
    for ckpt in ckpts:
        ghn = load_checkpoint(ckpt)
        per = [accuracy(init_model(n, ghn.dataset, ghn, bn, use_ghn=True, seed=0)[0], xte, yte) for n in nets]
        by_net = dict(zip(nets, per, strict=True))
        accs = {split: statistics.mean(by_net[f"{split}:{i}"] for i in range(args.archs)) for split in SPLITS}
        meta = read_checkpoint(ckpt)
        out[str(ckpt)] = {
            "command": meta.get("command"),
            "steps": meta.get("train", {}).get("step"),
            "zero_shot": accs,
            "per_network": by_net,
        }
        print(f"[{name}] ablation {ckpt}: {accs}", flush=True)
    first = out[str(ckpts[0])]["per_network"]
    for ckpt in ckpts[1:]:
        diffs = [100 * (first[n] - out[str(ckpt)]["per_network"][n]) for n in nets]
        m = statistics.mean(diffs)
        half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
        out[str(ckpt)]["first_minus_this"] = {"mean": m, "low": m - half, "high": m + half, "networks": len(diffs)}
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
        rep = predict_into(model, ghn, example_inputs=torch.zeros(2, 3, 32, 32), bn_batches="keep")  # timing only
        params = sum(p.numel() for p in model.parameters())
        out[n] = {"seconds": rep.seconds, "params": params, "tensors": len(rep.predicted)}
        print(f"[timing] {n}: {params / 1e6:.1f} M params, {len(rep.predicted)} tensors, {rep.seconds:.2f} s")
    return out


def _baseline_package(commit: str):
    """The ``quicktrain/ghn`` package of ``commit`` as a top-level package ``ghn_baseline`` (a temp copy)."""
    root = Path(tempfile.mkdtemp(prefix="ghn-baseline-"))
    pkg = root / "ghn_baseline"
    pkg.mkdir()
    names = subprocess.run(
        ["git", "ls-tree", "--name-only", commit, "quicktrain/ghn/"], capture_output=True, text=True, check=True
    ).stdout.split()
    for name in names:
        src = subprocess.run(["git", "show", f"{commit}:{name}"], capture_output=True, text=True, check=True)
        (pkg / Path(name).name).write_text(src.stdout)
    sys.path.insert(0, str(root))
    return importlib.import_module("ghn_baseline.meta"), importlib.import_module("ghn_baseline.model")


def throughput(args) -> dict:
    """Architecture-samples per CPU-second (and per wall-second) of one meta-training step, in turns.

    Every contender runs the full step of its ``meta_train``: sample, predict with gradients, the predicted
    networks' forward and backward, GHN backward, clipping, AdamW. The baseline builds and traces new networks
    every step (its meta-batch 2 x 32 images is what the shipped GHNs were trained with); the pool contender
    samples from an :class:`ArchPool` built beforehand (its one-time build cost is reported separately). The
    "networks only" rows are the floor of a pool step: ``meta_loss``'s forward and backward of the same
    networks with parameters predicted once and held fixed (no GHN forward, backward, clipping or AdamW).
    """
    old_meta, old_model = _baseline_package(args.baseline_commit)
    data = get_dataset(args.throughput_dataset)
    xs, ys = data.train.tensors
    shape, classes = tuple(data.in_shape), int(data.num_classes)
    torch.manual_seed(0)
    old_ghn = old_model.GHN(old_model.ghn_config("T"), old_model.DatasetInfo("x", shape, classes))
    new_ghn = GHN(ghn_config("T"), DatasetInfo("x", shape, classes))
    t = time.process_time()
    pool = ArchPool(new_ghn, args.throughput_pool, seed=0, in_shape=shape, num_classes=classes)
    for j in range(len(pool)):
        pool[j]
    build = (time.process_time() - t) / len(pool)
    gen = torch.Generator().manual_seed(0)
    opts = {  # each contender's meta_train optimizer
        id(old_ghn): torch.optim.AdamW(old_ghn.parameters(), lr=1e-4, weight_decay=1e-2),
        id(new_ghn): ghn_optimizer(new_ghn, lr=1e-4, weight_decay=1e-2),
    }

    def step(ghn, models, x, y, graphs=None) -> None:
        opt = opts[id(ghn)]
        opt.zero_grad(set_to_none=True)
        kw = {"graphs": graphs} if graphs is not None else {}
        total, _, _ = (meta_loss if ghn is new_ghn else old_meta.meta_loss)(ghn, models, x, y, reg=3e-5, **kw)
        total.backward()
        torch.nn.utils.clip_grad_norm_(ghn.parameters(), 5.0)
        opt.step()

    def baseline(m: int, b: int) -> None:
        idx = torch.randint(1_000_000, (m,), generator=gen).tolist()
        models = [old_meta.build_arch("train", i, in_shape=shape, num_classes=classes) for i in idx]
        sel = torch.randint(len(ys), (b,), generator=gen)
        step(old_ghn, models, xs[sel], ys[sel])

    def pooled(m: int, b: int) -> None:
        idx = torch.randint(len(pool), (m,), generator=gen).tolist()
        models, graphs = map(list, zip(*(pool[j] for j in idx), strict=True))
        sel = torch.randint(len(ys), (m, b), generator=gen)
        step(new_ghn, models, list(xs[sel]), list(ys[sel]), graphs)

    with torch.no_grad():
        fixed = {id(pool[j][1]): new_ghn([pool[j][1]])[0] for j in range(len(pool))}

    def predicted(graphs):  # stands in for the GHN: the fixed predictions, as leaves that take gradients
        return [{k: w.detach().requires_grad_() for k, w in fixed[id(g)].items()} for g in graphs]

    def networks(m: int, b: int) -> None:
        idx = torch.randint(len(pool), (m,), generator=gen).tolist()
        models, graphs = map(list, zip(*(pool[j] for j in idx), strict=True))
        sel = torch.randint(len(ys), (m, b), generator=gen)
        meta_loss(predicted, models, list(xs[sel]), list(ys[sel]), reg=0.0, graphs=graphs)[0].backward()

    contenders = {
        "baseline, meta-batch 2 x 32 images": (baseline, 2, 32),
        "pool, meta-batch 8 x 8 images": (pooled, 8, 8),
        "pool, meta-batch 8 x 32 images": (pooled, 8, 32),
        "networks only, 8 x 8 images": (networks, 8, 8),
        "networks only, 8 x 32 images": (networks, 8, 32),
    }
    cpu = dict.fromkeys(contenders, 0.0)
    wall = dict.fromkeys(contenders, 0.0)
    samples = dict.fromkeys(contenders, 0)
    for fn, m, b in contenders.values():  # warm-up (first calls allocate)
        fn(m, b)
    for r in range(args.throughput_rounds):
        for name, (fn, m, b) in contenders.items():
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(args.throughput_steps):
                fn(m, b)
            cpu[name] += time.process_time() - c0
            wall[name] += time.perf_counter() - w0
            samples[name] += m * args.throughput_steps
        print(f"[throughput] round {r + 1}/{args.throughput_rounds} done", flush=True)
    base = samples["baseline, meta-batch 2 x 32 images"] / cpu["baseline, meta-batch 2 x 32 images"]
    out = {
        "dataset": args.throughput_dataset,
        "baseline_commit": args.baseline_commit,
        "pool_build_cpu_s_per_arch": build,
        "contenders": {},
    }
    for name, (_, m, b) in contenders.items():
        out["contenders"][name] = {
            "meta_batch": m,
            "images_per_arch": b,
            "arch_samples_per_cpu_s": samples[name] / cpu[name],
            "cpu_s_per_step": cpu[name] / (samples[name] / m),
            "arch_samples_per_wall_s": samples[name] / wall[name],
            "vs_baseline": samples[name] / cpu[name] / base,
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="*", default=["digits", "fashion-mnist"])
    p.add_argument("--archs", type=int, default=16, help="architectures per split")
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--finetune", nargs="*", default=["test:0", "cnn", "resnet20"])
    p.add_argument("--ft-optimizers", nargs="*", default=["adamw", "sgd"], choices=sorted(LRS))
    p.add_argument("--ft-seeds", type=int, default=3)
    p.add_argument("--ft-steps", type=int, default=200)
    p.add_argument(
        "--ft-head-norm",
        default="predicted",
        choices=["predicted", "default"],
        help="GHN init for fine-tuning: keep the predicted head or rescale it to default-init norm",
    )
    p.add_argument("--ft-warmup", type=int, default=0, help="linear learning-rate warm-up steps (both inits)")
    p.add_argument("--noise", type=float, default=0.05, help="GHN-init symmetry-breaking noise (fine-tuning)")
    p.add_argument("--ablations", nargs="*", default=[], help="DATASET:CKPT[,CKPT...] GHNs to compare")
    p.add_argument("--tv-timing", nargs="*", default=[], help="torchvision models to time prediction on")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--throughput-rounds", type=int, default=4, help="rounds of turns (0 = skip throughput)")
    p.add_argument("--throughput-steps", type=int, default=3, help="steps per contender per round")
    p.add_argument("--throughput-pool", type=int, default=64, help="architectures in the pool")
    p.add_argument("--throughput-dataset", default="fashion-mnist")
    p.add_argument("--baseline-commit", default="b5ad87b", help="git commit of the code to compare against")
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
    if args.throughput_rounds > 0:
        results["throughput"] = throughput(args)
    results["seconds"] = time.time() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print_tables(results)


def print_tables(results: dict) -> None:
    mean = statistics.mean
    if results.get("throughput"):
        t = results["throughput"]
        print(
            f"\nmeta-training throughput on {t['dataset']} (pool build: {t['pool_build_cpu_s_per_arch']:.3f} "
            "CPU-s per architecture, once)"
        )
        print("| step | archs x images | CPU-s/step | arch-samples per CPU-s | per wall-s | vs baseline |")
        print("|---|---|---|---|---|---|")
        for name, c in t["contenders"].items():
            print(
                f"| {name} | {c['meta_batch']} x {c['images_per_arch']} | {c['cpu_s_per_step']:.3f} | "
                f"{c['arch_samples_per_cpu_s']:.2f} | {c['arch_samples_per_wall_s']:.2f} | {c['vs_baseline']:.2f}x |"
            )
    print("\n| dataset | split | models | chance | default init | GHN mean (min) | predict s/model |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results["datasets"].items():
        for group, z in r["zero_shot"].items():
            print(
                f"| {name} | {group} | {len(z['models'])} | {r['chance']:.3f} | {mean(z['default']):.3f} | "
                f"{mean(z['ghn']):.3f} ({min(z['ghn']):.3f}) | {r['predict_seconds'][group]:.3f} |"
            )
    print("\n| dataset | model | init | " + " | ".join(f"k={k}" for k in KS) + " |")
    print("|---|---|---|" + "---|" * len(KS))
    for name, r in results["datasets"].items():
        for m, f in r["finetune"].items():
            for init in ("ghn", "default"):
                c = f["curves"][init]
                print(f"| {name} | {m} | {init} | " + " | ".join(f"{c[k]:.3f}" if k in c else "-" for k in KS) + " |")
            print(
                f"| {name} | {m} | default steps to GHN's k=50 ({f['ghn_at_50']}) | "
                f"{f['default_steps_to_ghn_at_50'] or 'not reached'} |"
            )
    if results.get("tv_timing"):
        print("\n| torchvision model | params (M) | tensors | predict s |")
        print("|---|---|---|---|")
        for n, t in results["tv_timing"].items():
            print(f"| {n} | {t['params'] / 1e6:.1f} | {t['tensors']} | {t['seconds']:.2f} |")
    if results.get("ablations"):
        print("\n| dataset | GHN | meta-steps | test | deep | wide | first GHN − this, points (networks) |")
        print("|---|---|---|---|---|---|---|")
        for name, abl in results["ablations"].items():
            for ckpt, a in abl.items():
                z = a["zero_shot"]
                d = a.get("first_minus_this")
                diff = f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] ({d['networks']})" if d else "-"
                print(
                    f"| {name} | {Path(ckpt).name} | {a.get('steps')} | {z['test']:.3f} | {z['deep']:.3f} | "
                    f"{z['wide']:.3f} | {diff} |"
                )


if __name__ == "__main__":
    main()
