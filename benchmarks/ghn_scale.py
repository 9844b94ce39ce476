"""GHN at scale and in transfer (GHN-3 Sec. 5): very deep/large targets, GHN size, few-shot transfer.

(a) ``scale``: graph-construction time of CIFAR ResNets at several depths with the fitted log-log slope
    (1 = linear in depth); time and peak RSS of predicting ResNet-998, ResNet-1202 and a 1.01e9-parameter ViT,
    each in a fresh ``quicktrain ghn scale`` process; SGD losses of ResNet-998 from predicted vs default init.
(b) ``size``: no-training accuracy on the held-out splits (test, deep, wide) of GHNs of sizes T/S/M meta-trained
    with the same number of architectures seen.
(c) ``transfer``: a GHN meta-trained on the source initialises ``resnet20`` for a target with another input
    shape (data adapted to the source shape) and/or class count; fine-tuning with 10 labels per class and with
    the full set, against default init and against conventional pre-training on the source.

Usage::

    python benchmarks/ghn_scale.py --parts scale
    python benchmarks/ghn_scale.py --parts size --size-checkpoints T:/tmp/ghnsize/fashion-T.pt \
        S:/tmp/ghnsize/fashion-S.pt M:/tmp/ghnsize/fashion-M.pt
    python benchmarks/ghn_scale.py --parts transfer

Writes ``benchmarks/results/ghn_{scale,size,transfer}.json`` (and ``.csv``) and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from quicktrain.data import parse_classes
from quicktrain.ghn import load_checkpoint, shipped_checkpoints
from quicktrain.ghn.checkpoint import read_checkpoint
from quicktrain.ghn.scale import graph_seconds, loglog_slope
from quicktrain.ghn.transfer import (
    accuracy,
    default_init,
    few_shot,
    finetune,
    from_pretrained,
    ghn_init,
    pretrain,
    target_data,
)

RESULTS = Path("benchmarks/results")
DEPTHS = [20, 56, 110, 302, 602, 998]


def _write(name: str, rows: list[dict], payload: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"ghn_{name}.json").write_text(json.dumps(payload, indent=1))
    if rows:
        with open(RESULTS / f"ghn_{name}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def _cli(*args: str) -> dict:
    """Run ``quicktrain ghn ARGS`` in a fresh process (so its peak RSS is its own) and parse its JSON line."""
    cmd = [sys.executable, "-m", "quicktrain.ghn.cli", "ghn", *args]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.perf_counter() - start
    return res


def part_scale(args: argparse.Namespace) -> None:
    ghn_ds = args.dataset
    shape = tuple(load_checkpoint(shipped_checkpoints()[ghn_ds]).dataset.in_shape)
    rows = graph_seconds(DEPTHS, in_shape=shape)
    slope_depth = loglog_slope([r["depth"] for r in rows[1:]], [r["s"] for r in rows[1:]])
    print("\n| depth | graph nodes | sparse SP pairs | graph construction s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['depth']} | {r['nodes']} | {r['sp_pairs']} | {r['s']:.2f} |")
    print(f"\nlog-log slope of time vs depth (depths {DEPTHS[1]}-{DEPTHS[-1]}): {slope_depth:.2f} (1 = linear)")
    preds = [_cli("scale", "--model", m, "--dataset", ghn_ds) for m in args.scale_models]
    print("\n| model | params | tensors | build s | predict s | peak RSS GiB | params GiB | process wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for p in preds:
        print(
            f"| {p['model']} | {p['params'] / 1e6:.1f} M | {p['tensors']} | {p['build_s']:.1f} | "
            f"{p['predict_s']:.1f} | {p['peak_rss_gib']:.2f} | {p['param_gib']:.2f} | {p['wall_s']:.0f} |"
        )
    train = None
    if args.train_steps > 0:
        train = _cli(
            "scale", "--model", "resnet998", "--dataset", ghn_ds, "--train-steps", str(args.train_steps),
            "--batch-size", str(args.train_batch), "--lr", str(args.train_lr),
        )  # fmt: skip
        print(f"\nResNet-998 SGD (lr {args.train_lr}, momentum 0.9, batch {args.train_batch}) training losses:")
        for init, losses in train["losses"].items():
            print(f"- {init}: " + ", ".join(f"{v:.3g}" for v in losses))
    _write(
        "scale" + args.tag,
        rows,
        {"dataset": ghn_ds, "graph": rows, "slope_depth": slope_depth, "predict": preds, "train": train},
    )


def part_size(args: argparse.Namespace) -> None:
    from ghn import run_ablation  # benchmarks/ghn.py: zero-shot accuracy of checkpoints on held-out splits

    specs = dict(s.split(":", 1) for s in args.size_checkpoints)
    ds = load_checkpoint(next(iter(specs.values()))).dataset.name
    ns = argparse.Namespace(archs=args.archs, test_size=args.test_size)
    acc = run_ablation(ds, [Path(p) for p in specs.values()], ns)
    rows = []
    for size, path in specs.items():
        meta = read_checkpoint(path)
        ghn = load_checkpoint(path)
        tr = meta.get("train", {})
        seen = tr.get("step", 0) * tr.get("args", {}).get("meta_batch", 0)
        z = acc[str(Path(path))]["zero_shot"]
        rows.append(
            {
                "size": size,
                "params_M": sum(p.numel() for p in ghn.parameters()) / 1e6,
                "steps": tr.get("step"),
                "archs_seen": seen,
                "train_s": tr.get("seconds"),
                **{f"acc_{k}": v for k, v in z.items()},
            }
        )
    print(f"\n| GHN | params (M) | steps | architectures seen | train s | test | deep | wide |  ({ds}, no training)")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size']} | {r['params_M']:.2f} | {r['steps']} | {r['archs_seen']} | {r['train_s']:.0f} | "
            f"{r['acc_test']:.3f} | {r['acc_deep']:.3f} | {r['acc_wide']:.3f} |"
        )
    _write("size" + args.tag, rows, {"dataset": ds, "archs_per_split": args.archs, "rows": rows, "checkpoints": specs})


def part_transfer(args: argparse.Namespace) -> None:
    ghn = load_checkpoint(shipped_checkpoints()[args.dataset])
    shape = tuple(ghn.dataset.in_shape)
    source = pretrain(args.model, args.dataset, steps=args.pretrain_steps)
    rows = []
    for task in args.tasks:
        target, _, classes = task.partition(":")
        data = target_data(target, shape, parse_classes(classes) if classes else None)
        inits = {
            "ghn (predict head)": lambda d=data: ghn_init(args.model, ghn, d, head="predict", noise=args.noise),
            "ghn (reinit head)": lambda d=data: ghn_init(args.model, ghn, d, head="reinit", noise=args.noise),
            "default": lambda d=data: default_init(args.model, d, shape),
            "pre-trained on source": lambda d=data: from_pretrained(source, args.model, d, shape),
        }
        regimes = {f"{args.shots}/class": (args.shots, args.few_steps), "full": (0, args.full_steps)}
        for regime, (shots, steps) in regimes.items():
            for seed in range(args.seeds):
                x, y = data.x_train, data.y_train
                if shots:
                    x, y = few_shot(x, y, shots, seed=seed)
                for init, make in inits.items():
                    model = make()
                    k0 = accuracy(model, data.x_test, data.y_test)
                    finetune(model, x, y, steps=steps, lr=args.lr, seed=seed)
                    row = {
                        "task": task, "classes": data.num_classes, "regime": regime, "examples": len(y),
                        "steps": steps, "seed": seed, "init": init, "acc_k0": k0,
                        "acc_final": accuracy(model, data.x_test, data.y_test),
                    }  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    print(
        f"\nsource {args.dataset} -> target; model {args.model}; Adam lr {args.lr}; pre-training: "
        f"{args.pretrain_steps} steps on the source (quicktrain.train.fit)"
    )
    print("\n| target | regime | examples | steps | init | acc before | acc after (mean over seeds) |")
    print("|---|---|---|---|---|---|---|")
    for task, regime, init in dict.fromkeys((r["task"], r["regime"], r["init"]) for r in rows):
        sel = [r for r in rows if (r["task"], r["regime"], r["init"]) == (task, regime, init)]
        mean = sum(r["acc_final"] for r in sel) / len(sel)
        k0 = sum(r["acc_k0"] for r in sel) / len(sel)
        print(f"| {task} | {regime} | {sel[0]['examples']} | {sel[0]['steps']} | {init} | {k0:.3f} | {mean:.3f} |")
    _write("transfer" + args.tag, rows, {"source": args.dataset, "model": args.model, "args": vars(args), "rows": rows})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["scale", "transfer"], choices=["scale", "size", "transfer"])
    p.add_argument("--dataset", default="fashion-mnist", help="source data set (its shipped GHN)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default="", help="suffix of the result files (ghn_transfer{tag}.json, ...)")
    # (a)
    p.add_argument("--scale-models", nargs="*", default=["resnet998", "resnet1202", "vit1b"])
    p.add_argument("--train-steps", type=int, default=20, help="ResNet-998 SGD steps per init (0 = skip)")
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--train-lr", type=float, default=0.05)
    # (b)
    p.add_argument("--size-checkpoints", nargs="*", default=[], help="SIZE:CKPT, e.g. T:/tmp/ghnsize/fashion-T.pt")
    p.add_argument("--archs", type=int, default=8, help="architectures per held-out split")
    p.add_argument("--test-size", type=int, default=1000)
    # (c)
    p.add_argument("--tasks", nargs="*", default=["digits", "digits:0-4"], help="TARGET[:CLASSES]")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--few-steps", type=int, default=50)
    p.add_argument("--full-steps", type=int, default=150)
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--noise", type=float, default=0.05)
    p.add_argument("--seeds", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for part in args.parts:
        {"scale": part_scale, "size": part_size, "transfer": part_transfer}[part](args)


if __name__ == "__main__":
    main()
