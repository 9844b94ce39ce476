"""``quicktrain ghn train|predict``: argparse sub-commands, wired into ``quicktrain/cli.py`` by the lead.

Usage::

    quicktrain ghn train --dataset digits --size T --steps 700 --out ghn-digits.pt
    quicktrain ghn predict --model resnet20 --dataset digits --out resnet20-ghn.pt
"""

from __future__ import annotations

import argparse
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
    tr.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step")
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
    tr.add_argument("--seed", type=int, default=d.seed)
    tr.add_argument("--save-every", type=int, default=d.save_every)
    tr.add_argument("--log-every", type=int, default=d.log_every)
    tr.add_argument("--time-budget-min", type=float, default=d.time_budget_min, help="stop after N minutes")
    tr.add_argument("--threads", type=int, default=d.threads, help="torch threads (0 = torch default)")
    tr.add_argument("--out", required=True, help="checkpoint path (rewritten every --save-every steps)")
    tr.add_argument("--resume", action="store_true", help="continue from --out if it exists")
    tr.add_argument("--ship", default=None, help="also write a copy without optimizer state here")
    tr.set_defaults(func=_train)

    pr = sub.add_parser("predict", help="predict a model's parameters with a GHN and save its state_dict")
    pr.add_argument("--model", required=True, help="model name (quicktrain.models.list_models() or tv:NAME)")
    src = pr.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="GHN checkpoint path")
    src.add_argument("--dataset", help="use the shipped GHN of this dataset")
    pr.add_argument("--noise", type=float, default=0.0, help="relative symmetry-breaking noise")
    pr.add_argument("--bn-batches", type=int, default=4, help="training batches to re-estimate BN statistics")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--out", required=True, help="where to save the model's state_dict")
    pr.set_defaults(func=_predict)
    return ghn


def _train(args: argparse.Namespace) -> int:
    names = {f.name for f in fields(MetaTrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
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

    torch.manual_seed(args.seed)
    ghn = load_checkpoint(args.checkpoint or default_checkpoint(args.dataset))
    ds = ghn.dataset
    need = models.input_shape(args.model, ds.in_shape)
    if tuple(need) != tuple(ds.in_shape):
        raise SystemExit(
            f"model {args.model!r} needs inputs of shape {tuple(need)}, but this GHN was trained for "
            f"{ds.name!r} inputs of shape {tuple(ds.in_shape)}; train a GHN on data of that shape "
            "(quicktrain ghn train)"
        )
    model = models.get_model(args.model, num_classes=ds.num_classes, in_shape=need)
    data = get_dataset(ds.name)
    xs = data.train.tensors[0]
    bn = [xs[i * 128 : (i + 1) * 128] for i in range(args.bn_batches)] if args.bn_batches > 0 else None
    report = predict_into(model, ghn, example_inputs=xs[:2], bn_batches=bn, noise=args.noise)
    torch.save(model.state_dict(), args.out)
    print(
        f"predicted {len(report.predicted)} tensors of {args.model} in {report.seconds:.3f}s "
        f"(unsupported, default init: {report.unsupported or 'none'}) -> {args.out}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m quicktrain.ghn.cli ghn train ...``) until the lead wires the CLI."""
    parser = argparse.ArgumentParser(prog="quicktrain")
    add_subparser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
