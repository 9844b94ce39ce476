"""The ``quicktrain`` command: ``train``, ``demo``, ``report`` and one sub-command per part.

Sub-commands are imported on demand (``quicktrain --help`` loads neither torch nor any part). Known errors
(bad settings, missing files, refused checkpoints, a diverged run) are printed as one line naming the problem
and the fix, with exit status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DESCRIPTION = (
    "quicktrain: cheaper neural-network training (predicted initialisation, preconditioning, NetBooster, "
    "Kronecker SGD). Run `quicktrain COMMAND --help` for a command's options."
)
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

# command -> (module whose add_subparser() registers it, one-line help); imported only when the command runs
PART_COMMANDS = {
    "bench": ("quicktrain.bench", "benchmarks that write one HTML report"),
    "boost": ("quicktrain.boost.cli", "NetBooster tools (export the contracted tiny model)"),
    "ghn": ("quicktrain.ghn.cli", "Graph HyperNetworks: meta-train one, or predict a model's parameters"),
    "kron": ("quicktrain.kron.cli", "Kronecker SGD (Song & Yue 2023): per-step cost independent of d"),
    "prune": ("quicktrain.curvature_apps.cli", "remove the least important weights or channels of a finished run"),
}
CORE_COMMANDS = {
    "train": "train a model on a dataset",
    "demo": "a short run of every part on the bundled digits data, with a summary table",
    "report": "compare run folders: a table and accuracy/loss plots",
}


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage dump) and whose help shows every default."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train`` options, one per :class:`TrainConfig` field (defaults from the dataclass)."""
    from . import data, models
    from .train import TrainConfig

    d = TrainConfig()
    add = parser.add_argument
    add("--dataset", default=d.dataset,
        help=f"one of {data.list_datasets()}, or folder:PATH (images in PATH/{{train,test}}/CLASS/*)")
    add("--classes", default=d.classes,
        help="train and evaluate on these classes only, e.g. 0-4 or 1,3,5 (shared head)")
    add("--model", default=d.model, help=f"one of {models.list_models()} or tv:NAME (any torchvision classifier)")
    add("--epochs", type=int, default=d.epochs, help="passes over the training set")
    add("--batch-size", type=int, default=d.batch_size, help="global batch size (split over torchrun processes)")
    add("--lr", type=float, default=d.lr, help="peak learning rate (may be changed on --resume)")
    add("--optimizer", choices=("sgd", "adam", "adamw"), default=d.optimizer, help="torch.optim optimizer")
    add("--momentum", type=float, default=d.momentum, help="SGD momentum")
    add("--weight-decay", type=float, default=d.weight_decay, help="weight decay of the optimizer")
    add("--schedule", choices=("cosine", "constant"), default=d.schedule, help="learning-rate schedule after warm-up")
    add("--warmup-steps", type=int, default=d.warmup_steps, help="steps of linear learning-rate warm-up")
    add("--seed", type=int, default=d.seed, help="seed of the model, the data order and the val split")
    add("--out", default=d.out, help="run folder: metrics.jsonl, last.pt (resume point), model.pt")
    add("--recipe", default=None, help="TOML recipe of settings; flags given on the command line override it")
    add("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add("--overwrite", action="store_true", help="replace the run already in --out (otherwise refused)")
    add(
        "--auto-resume",
        action="store_true",
        help="resume when --out has a checkpoint, else start (for restarts by torchrun --max-restarts)",
    )
    add("--save-every-steps", type=int, default=d.save_every_steps,
        help="also checkpoint every N steps inside an epoch (resume stays bit-exact)")
    add("--tensorboard", action="store_true", help="also write TensorBoard events into OUT/tensorboard")
    add("--device", default=d.device, help="auto (CUDA if available), cpu, cuda or cuda:N")
    add(
        "--threads",
        type=int,
        default=d.threads,
        help="torch CPU threads (1 was fastest measured for small models on a busy 2-core machine)",
    )
    add("--data-dir", default=d.data_dir, help="folder with the dataset files (non-bundled datasets)")
    add("--download", action="store_true", help="let torchvision download mnist/cifar10/cifar100 into --data-dir")
    add("--max-steps-per-epoch", type=int, default=d.max_steps_per_epoch, help="cap on the steps of each epoch")
    add("--eval-batch-size", type=int, default=d.eval_batch_size, help="batch size of evaluation")
    add("--no-progress", dest="progress", action="store_false", help="no summary, progress bars or epoch lines")
    add("--amp", action="store_true", help="bfloat16 autocast (CUDA only)")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--no-sync-batchnorm", dest="sync_batchnorm", action="store_false",
        help="under torchrun, keep BatchNorm statistics per process instead of synchronising them")
    parts = parser.add_argument_group("parts")
    part = parts.add_argument
    part("--init", default=d.init, help="ghn or ghn:CHECKPOINT (predicted initialisation)")
    part("--ghn-noise", type=float, default=d.ghn_noise, help="relative noise on predicted weights")
    part("--precond", default=d.precond, help="gradient preconditioner (quicktrain.precond), e.g. kfac, shampoo")
    part("--damping", type=float, default=d.damping, help="damping of the preconditioner's curvature")
    part("--curvature-interval", type=int, default=d.curvature_interval, help="steps between curvature updates")
    part("--inverse-interval", type=int, default=d.inverse_interval, help="steps between inverse updates")
    part("--grafting", default=d.grafting,
         help="none, sgd or adam: each layer moves in the preconditioner's direction by SGD's/Adam's step norm")
    part("--boost", action="store_true", help="NetBooster: expand, train, linearise, contract")
    part("--boost-ratio", type=float, default=d.boost_ratio,
         help="NetBooster expansion ratio r of the inserted blocks (hidden width r*C, e.g. 1.5)")
    part("--plt-start", type=float, default=d.plt_start, help="fraction of steps where PLT starts")
    part("--plt-end", type=float, default=d.plt_end, help="fraction of steps where slopes reach 1")
    part(
        "--consolidate",
        default=d.consolidate,
        help="continue from this finished run folder, protecting what it learned with EWC",
    )
    part("--consolidate-strength", type=float, default=d.consolidate_strength, help="EWC lambda")
    part(
        "--consolidate-curvature",
        choices=("diag", "kron", "unitwise"),
        default=d.consolidate_curvature,
        help="curvature representation of the EWC penalty",
    )


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`TrainConfig` named by parsed ``train`` arguments."""
    from .train import TrainConfig

    return TrainConfig(**{k: v for k, v in vars(args).items() if k in TrainConfig.field_names()})


def cmd_train(args: argparse.Namespace) -> None:
    from .compose import build_hooks
    from .train import fit

    config = config_from_args(args)
    result = fit(config, build_hooks(config))
    m = result.metrics
    if result.is_main:
        print(
            f"final: test acc {m['test_acc']:.4f}  test loss {m['test_loss']:.4f}  val acc {m['val_acc']:.4f}"
            + (f"  ->  {result.out}" if result.out else "")
        )


def cmd_demo(args: argparse.Namespace) -> None:
    """Train the ``bench all`` configurations on the bundled ``digits`` data and print a summary table."""
    from . import bench, report
    from .train import TrainConfig

    out = Path(args.out)
    start = time.perf_counter()
    base = TrainConfig(dataset="digits", model="cnn", epochs=args.epochs, lr=3e-3)
    records = bench.run_ablation(base, out, seeds=[0])
    rows = bench.summary_rows(records, target=0.95)
    report.print_table(bench.SUMMARY_COLUMNS, rows, title="quicktrain demo: cnn on digits, one seed")
    png = report.plot_runs([run for runs in records.values() for run in runs], out / "demo.png")
    print(f"demo finished in {time.perf_counter() - start:.0f}s; curves in {png}")


def cmd_report(args: argparse.Namespace) -> None:
    """Print the comparison table and draw the curves; with ``--html`` also write the HTML report and its CSV."""
    from . import report

    runs = [report.load_run(d) for d in args.runs]
    section = report.runs_section(runs, args.out, target=args.target)
    columns, rows = section.tables[0]
    report.print_table(columns, rows, title="runs")
    print(f"plot: {args.out}")
    if args.html:
        csv_path = report.write_csv(columns, rows, Path(args.html).with_suffix(".csv"))
        section.downloads.append(csv_path)
        print(f"html: {report.render_html([section], args.html, title='quicktrain report')}  (table: {csv_path})")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; for ``train --recipe FILE`` the recipe's settings become the defaults of the flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe = None
    if _command(argv) == "train":
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--recipe")
        recipe = pre.parse_known_args(argv)[0].recipe
    if recipe:
        from .train import load_recipe

        return get_args_parser(load_recipe(recipe), command="train").parse_args(argv)
    return get_args_parser(command=_command(argv)).parse_args(argv)


def _command(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def get_args_parser(train_defaults: dict | None = None, *, command: str | None = "train") -> argparse.ArgumentParser:
    """The ``quicktrain`` parser; only ``command``'s sub-parser is built in full (the others are listed)."""
    parser = _Parser(prog="quicktrain", description=DESCRIPTION,
                     epilog="add --debug anywhere to see the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in CORE_COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=help_text, add_help=False)
    for name, (module, help_text) in PART_COMMANDS.items():
        if name == command:
            importlib.import_module(module).add_subparser(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    if command == "train":
        train = sub.add_parser("train", help=CORE_COMMANDS["train"])
        add_train_arguments(train)
        train.set_defaults(func=cmd_train, **(train_defaults or {}))
    elif command == "demo":
        demo = sub.add_parser("demo", help=CORE_COMMANDS["demo"])
        demo.add_argument("--out", default="runs/demo", help="folder of the demo's runs (replaced on every demo)")
        demo.add_argument("--epochs", type=int, default=15, help="epochs of every configuration")
        demo.set_defaults(func=cmd_demo)
    elif command == "report":
        rep = sub.add_parser("report", help=CORE_COMMANDS["report"])
        rep.add_argument("runs", nargs="+", help="run folders (the --out of quicktrain train)")
        rep.add_argument("--out", default="report.png", help="PNG file to write")
        rep.add_argument("--html", help="also write this self-contained HTML report, and the table as CSV beside it")
        rep.add_argument("--target", type=float, default=None,
                         help="test accuracy target: the table flags runs that reached it but ended below")
        rep.set_defaults(func=cmd_report)
    return parser


def run(argv: Sequence[str] | None = None) -> Any:
    """Parse ``argv`` and run its command; errors propagate (see :func:`main` for the command line)."""
    args = parse_args(argv)
    return args.func(args)


def main(argv: Sequence[str] | None = None) -> None:
    """The console entry point: run ``argv`` and turn known errors and Ctrl-C into one line and an exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    main_rank = os.environ.get("RANK", "0") == "0"
    try:
        run(argv)
    except KeyboardInterrupt:
        if main_rank:
            print(_interrupted(argv), file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as error:
        if debug or not _is_known(error):
            raise
        if main_rank:
            print(f"quicktrain: error: {_one_line(error)}", file=sys.stderr)
        sys.exit(EXIT_ERROR)


def _is_known(error: Exception) -> bool:
    """Errors that describe bad input or a run's state (not a bug): shown as one line."""
    if isinstance(error, ValueError | OSError | FloatingPointError):
        return True
    checkpoint = sys.modules.get("quicktrain.train.checkpoint")  # loaded whenever one can have been raised
    return checkpoint is not None and isinstance(error, checkpoint.CheckpointError)


def _one_line(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        text = f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    else:
        text = str(error)
    return " ".join(text.split()) or type(error).__name__


def _interrupted(argv: Sequence[str]) -> str:
    if _command(argv) != "train" or "--out" not in argv[:-1]:
        return "interrupted"
    out = argv[argv.index("--out") + 1]
    if not (Path(out) / "last.pt").exists():
        return f"interrupted before the first checkpoint of {out}; start again with --overwrite"
    return f"interrupted; continue with `quicktrain train --resume --out {out}`"


if __name__ == "__main__":
    main()
