"""``quicktrain ghn train|predict|scale``: argparse sub-commands, wired into ``quicktrain/cli.py`` by the lead.

Usage::

    quicktrain ghn train --dataset digits --size T --steps 700 --out ghn-digits.pt
    quicktrain ghn predict --model resnet20 --dataset digits --out resnet20-ghn.pt
    quicktrain ghn predict --model resnet998 --dataset fashion-mnist --out resnet998-ghn.pt
    quicktrain ghn scale --model vit1b --dataset fashion-mnist   # time and peak memory, as JSON
    quicktrain ghn transfer --dataset fashion-mnist --target digits --classes 0-4 --head reinit --shots 10
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import fields

import torch

from .meta import MetaTrainConfig, meta_train, strip_training_state
from .model import SIZES


def add_subparser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``ghn`` with its ``train`` and ``predict`` sub-commands on ``subparsers``."""
    ghn = subparsers.add_parser(
        "ghn", help="Graph HyperNetworks: meta-train one, or predict a model's parameters"
    )
    sub = ghn.add_subparsers(dest="ghn_command", required=True)

    d = MetaTrainConfig()
    tr = sub.add_parser("train", help="meta-train a GHN on random architectures for a dataset")
    tr.add_argument("--dataset", required=True, help="dataset name (quicktrain.data.list_datasets())")
    tr.add_argument("--size", default=d.size, choices=sorted(SIZES), help="GHN size")
    tr.add_argument("--steps", type=int, default=d.steps)
    tr.add_argument("--meta-batch", type=int, default=d.meta_batch, help="architectures per step")
    tr.add_argument("--batch-size", type=int, default=d.batch_size, help="images per architecture per step")
    tr.add_argument(
        "--pool-size",
        type=int,
        default=d.pool_size,
        help="fixed pool of training architectures built once (0 = new architectures every step)",
    )
    tr.add_argument("--lr", type=float, default=d.lr)
    tr.add_argument("--weight-decay", type=float, default=d.weight_decay)
    tr.add_argument("--warmup", type=int, default=d.warmup)
    tr.add_argument("--grad-clip", type=float, default=d.grad_clip)
    tr.add_argument(
        "--reg", type=float, default=d.reg, help="GHN-3 predicted-parameter regulariser (0 = off)"
    )
    tr.add_argument(
        "--no-graph", action="store_true", help="ablation: mask node types, degrees and distances"
    )
    tr.add_argument(
        "--family-weights",
        type=_family_weight,
        nargs="+",
        default=[],
        metavar="FAMILY=W",
        help="draw pool networks of these families W times as often (e.g. vit=3); the others weigh 1",
    )
    tr.add_argument("--seed", type=int, default=d.seed)
    tr.add_argument("--save-every", type=int, default=d.save_every)
    tr.add_argument("--log-every", type=int, default=d.log_every)
    tr.add_argument("--time-budget-min", type=float, default=d.time_budget_min, help="stop after N minutes")
    tr.add_argument(
        "--schedule-min",
        type=float,
        default=d.schedule_min,
        help="cosine learning rate over N minutes of training time (summed over resumes), then stop; "
        "--steps is then an upper bound",
    )
    tr.add_argument("--threads", type=int, default=d.threads, help="torch threads (0 = torch default)")
    tr.add_argument("--device", default=d.device, help="device for the GHN, the pool and the data (cpu, cuda)")
    tr.add_argument("--out", required=True, help="checkpoint path (rewritten every --save-every steps)")
    tr.add_argument("--resume", action="store_true", help="continue from --out if it exists")
    tr.add_argument(
        "--init-from",
        default=d.init_from,
        help="start from this GHN checkpoint's weights (e.g. a shipped one), with a fresh optimizer",
    )
    tr.add_argument("--ship", default=None, help="also write a copy without optimizer state here")
    tr.set_defaults(func=_train)

    pr = sub.add_parser("predict", help="predict a model's parameters with a GHN and save its state_dict")
    pr.add_argument(
        "--model",
        required=True,
        help="model name (quicktrain.models.list_models(), tv:NAME, or a scale model: resnet<6n+2>, vit1b)",
    )
    src = pr.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="GHN checkpoint path")
    src.add_argument("--dataset", help="use the shipped GHN of this dataset")
    pr.add_argument("--noise", type=float, default=0.0, help="relative symmetry-breaking noise")
    pr.add_argument(
        "--bn-batches", type=int, default=4, help="training batches to re-estimate BN statistics (0: keep them)"
    )
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--out", required=True, help="where to save the model's state_dict")
    pr.set_defaults(func=_predict)

    sc = sub.add_parser(
        "scale",
        help="predict a very deep/large model (resnet<6n+2>, vit1b); print time and peak memory as JSON",
    )
    sc.add_argument("--model", required=True, help="resnet<depth> (depth = 6n+2, e.g. resnet998) or vit1b")
    src = sc.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="GHN checkpoint path")
    src.add_argument("--dataset", help="use the shipped GHN of this dataset")
    sc.add_argument(
        "--train-steps", type=int, default=0, help="also train N SGD steps from GHN and from default init"
    )
    sc.add_argument("--batch-size", type=int, default=16, help="SGD batch size for --train-steps")
    sc.add_argument("--lr", type=float, default=0.05, help="SGD learning rate for --train-steps")
    sc.add_argument("--threads", type=int, default=1, help="torch threads")
    sc.add_argument("--seed", type=int, default=0)
    sc.set_defaults(func=_scale)

    tf = sub.add_parser(
        "transfer",
        help="initialise a model for another data set with a GHN, fine-tune, compare with default init",
    )
    src = tf.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="source GHN checkpoint path")
    src.add_argument("--dataset", help="use the shipped GHN of this (source) dataset")
    tf.add_argument("--target", required=True, help="target dataset (adapted to the GHN's input shape)")
    tf.add_argument("--classes", default=None, help="target class subset, relabelled 0..k-1 (e.g. 0-4)")
    tf.add_argument("--model", default="resnet20", help="registry model name")
    tf.add_argument("--head", default="predict", choices=["predict", "reinit"], help="classifier head")
    tf.add_argument("--shots", type=int, default=10, help="labelled examples per class (0 = full train set)")
    tf.add_argument("--steps", type=int, default=100, help="Adam fine-tuning steps (batch 64)")
    tf.add_argument("--lr", type=float, default=1e-3)
    tf.add_argument("--noise", type=float, default=0.05, help="GHN-init symmetry-breaking noise")
    tf.add_argument(
        "--pretrain-steps", type=int, default=0, help="also fine-tune a model pre-trained N steps on the source"
    )
    tf.add_argument("--threads", type=int, default=1, help="torch threads")
    tf.add_argument("--seed", type=int, default=0)
    tf.set_defaults(func=_transfer)
    return ghn


def _family_weight(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        if sep:
            return name, float(value)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected FAMILY=WEIGHT (e.g. vit=3), got {text!r}")


def _train(args: argparse.Namespace) -> int:
    names = {f.name for f in fields(MetaTrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["family_weights"] = dict(args.family_weights)
    cfg = MetaTrainConfig(**values, graph_info=not args.no_graph)
    command = "quicktrain " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    summary = meta_train(cfg, args.out, resume=args.resume, command=command)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 writes and reports
        return 0
    if args.ship:
        strip_training_state(args.out, args.ship)
    print(
        f"done: {summary['steps']} steps ({summary['skipped']} skipped) in {summary['seconds']:.0f}s, "
        f"meta-loss {summary['loss']:.4f}, train acc {summary['acc']:.3f} -> {args.out}"
    )
    return 0


def _predict(args: argparse.Namespace) -> int:
    from quicktrain import models
    from quicktrain.data import get_dataset

    from .checkpoint import load_checkpoint
    from .predict import default_checkpoint, predict_into
    from .scale import build_scale_model, is_scale_model

    torch.manual_seed(args.seed)
    ghn = load_checkpoint(args.checkpoint or default_checkpoint(args.dataset))
    ds = ghn.dataset
    scale = is_scale_model(args.model)
    need = ds.in_shape if scale else models.input_shape(args.model, ds.in_shape)
    if tuple(need) != tuple(ds.in_shape):
        raise SystemExit(
            f"model {args.model!r} needs inputs of shape {tuple(need)}, but this GHN was trained for "
            f"{ds.name!r} inputs of shape {tuple(ds.in_shape)}; train a GHN on data of that shape "
            "(quicktrain ghn train)"
        )
    if scale:
        model = build_scale_model(args.model, num_classes=ds.num_classes, in_shape=need)
    else:
        model = models.get_model(args.model, num_classes=ds.num_classes, in_shape=need)
    data = get_dataset(ds.name)
    xs = data.train.tensors[0]
    bn = [xs[i * 128 : (i + 1) * 128] for i in range(args.bn_batches)] if args.bn_batches > 0 else "keep"
    report = predict_into(model, ghn, example_inputs=xs[:2], bn_batches=bn, noise=args.noise, progress=scale)
    torch.save(model.state_dict(), args.out)
    print(
        f"predicted {len(report.predicted)} tensors of {args.model} in {report.seconds:.3f}s "
        f"(unsupported, default init: {report.unsupported or 'none'}) -> {args.out}"
    )
    return 0


def _scale(args: argparse.Namespace) -> int:
    from quicktrain.data import get_dataset

    from .checkpoint import load_checkpoint
    from .predict import default_checkpoint
    from .scale import compare_training, measure_prediction

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    ghn = load_checkpoint(args.checkpoint or default_checkpoint(args.dataset))
    if args.train_steps > 0:
        xs, ys = get_dataset(ghn.dataset.name).train.tensors
        losses = compare_training(
            args.model, ghn, xs, ys, steps=args.train_steps, batch=args.batch_size, lr=args.lr, seed=args.seed
        )
        print(json.dumps({"model": args.model, "lr": args.lr, "batch": args.batch_size, "losses": losses}))
        return 0
    _, report = measure_prediction(args.model, ghn)
    print(json.dumps(report))
    return 0


def _transfer(args: argparse.Namespace) -> int:
    from quicktrain.data import parse_classes

    from .checkpoint import load_checkpoint
    from .predict import default_checkpoint
    from .transfer import accuracy, default_init, few_shot, finetune, from_pretrained, ghn_init, pretrain, target_data

    torch.set_num_threads(args.threads)
    ghn = load_checkpoint(args.checkpoint or default_checkpoint(args.dataset))
    shape = ghn.dataset.in_shape
    data = target_data(args.target, shape, parse_classes(args.classes) if args.classes else None)
    x, y = (data.x_train, data.y_train) if args.shots == 0 else few_shot(data.x_train, data.y_train, args.shots)
    inits = {
        f"ghn ({args.head} head)": lambda: ghn_init(args.model, ghn, data, head=args.head, noise=args.noise),
        "default": lambda: default_init(args.model, data, shape),
    }
    if args.pretrain_steps > 0:
        source = pretrain(args.model, ghn.dataset.name, steps=args.pretrain_steps, seed=args.seed)
        inits["pre-trained on source"] = lambda: from_pretrained(source, args.model, data, shape)
    result = {}
    for name, make in inits.items():
        model = make()
        before = accuracy(model, data.x_test, data.y_test)
        finetune(model, x, y, steps=args.steps, lr=args.lr, seed=args.seed)
        result[name] = {"k=0": before, f"k={args.steps}": accuracy(model, data.x_test, data.y_test)}
    print(json.dumps({"target": args.target, "classes": args.classes, "shots": args.shots, "acc": result}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m quicktrain.ghn.cli ghn train ...``) until the lead wires the CLI."""
    parser = argparse.ArgumentParser(prog="quicktrain")
    add_subparser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
