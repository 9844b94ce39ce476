"""``quicktrain prune RUN_DIR --sparsity S [--structured]``: prune a finished run by curvature or magnitude.

Wire-up (by the lead, in ``quicktrain/cli.py``)::

    from .curvature_apps import cli as curvature_apps_cli
    curvature_apps_cli.add_subparser(sub)   # then dispatch with args.func(args)

Stand-alone: ``python -m quicktrain.curvature_apps.cli prune runs/digits-cnn --sparsity 0.5 --structured``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from quicktrain.curvature_apps.prune import SCORES, prune_run

__all__ = ["add_subparser", "main", "prune_command"]


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from err
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"sparsity must be in [0, 1), got {value}")
    return value


def prune_command(args: argparse.Namespace) -> dict:
    """Run :func:`~quicktrain.curvature_apps.prune.prune_run` and print one line per metric set."""
    result = prune_run(args.run_dir, args.sparsity, structured=args.structured, score=args.score,
                       finetune_steps=args.finetune_steps, out=args.out, lr=args.lr, per_layer=args.per_layer,
                       batches=args.batches)
    before, after = result["before"], result["metrics"]
    print(f"pruned ({args.score}, sparsity {args.sparsity:g}{', structured' if args.structured else ''}): "
          f"test acc {before['test_acc']:.4f}  val acc {before['val_acc']:.4f}  params {result['params']}")
    if args.finetune_steps > 0:
        print(f"after {args.finetune_steps} fine-tuning steps: test acc {after['test_acc']:.4f}  "
              f"val acc {after['val_acc']:.4f}")
    print(f"-> {result['out']}/model.pt")
    return result


def add_subparser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``prune`` on the ``quicktrain`` sub-command parsers."""
    p = subparsers.add_parser("prune", help="remove the least important weights or channels of a finished run",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", metavar="RUN_DIR", help="--out folder of a finished quicktrain train run")
    p.add_argument("--sparsity", type=_fraction, required=True,
                   help="fraction of weights (or of each hidden layer's channels with --structured) to remove")
    p.add_argument("--structured", action="store_true",
                   help="remove whole output channels (mlp and cnn): a genuinely smaller model")
    p.add_argument("--per-layer", action="store_true",
                   help="unstructured: the same sparsity in every layer (a global ranking may empty a layer)")
    p.add_argument("--score", choices=SCORES, default="obd-kron",
                   help="importance: OBD saliency ½θ²F with the K-FAC or diagonal Fisher, or magnitude")
    p.add_argument("--finetune-steps", type=int, default=0, help="fine-tune this many steps on the run's task")
    p.add_argument("--lr", type=float, default=None, help="fine-tuning learning rate (default: the run's / 10)")
    p.add_argument("--batches", type=int, default=16, help="training batches (of 128) for the curvature")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR-pruned-SCORE-S[-structured])")
    p.set_defaults(func=prune_command)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m quicktrain.curvature_apps.cli")
    add_subparser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
