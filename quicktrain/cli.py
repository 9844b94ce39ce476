"""The ``quicktrain`` command: ``train``, ``demo``, ``report`` and one sub-command per part."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from . import bench, data, models, report
from .boost import cli as boost_cli
from .compose import build_hooks
from .ghn import cli as ghn_cli
from .kron import cli as kron_cli
from .precond import cli as precond_cli
from .train import TrainConfig, fit, load_recipe


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train`` options, one per :class:`TrainConfig` field (defaults from the dataclass)."""
    d = TrainConfig()
    add = parser.add_argument
    add("--dataset", default=d.dataset, help=f"one of {data.list_datasets()} or folder:PATH")
    add("--classes", default=d.classes, help="train and evaluate on these classes only, e.g. 0-4 (shared head)")
    add("--model", default=d.model, help=f"one of {models.list_models()} or tv:NAME (any torchvision classifier)")
    add("--epochs", type=int, default=d.epochs)
    add("--batch-size", type=int, default=d.batch_size, help="global batch size (split over torchrun processes)")
    add("--lr", type=float, default=d.lr)
    add("--optimizer", choices=("sgd", "adam", "adamw"), default=d.optimizer)
    add("--momentum", type=float, default=d.momentum)
    add("--weight-decay", type=float, default=d.weight_decay)
    add("--schedule", choices=("cosine", "constant"), default=d.schedule)
    add("--warmup-steps", type=int, default=d.warmup_steps)
    add("--seed", type=int, default=d.seed)
    add("--out", default=d.out, help="run folder: metrics.jsonl, last.pt (resume point), model.pt")
    add("--recipe", default=None, help="TOML recipe of settings; flags given on the command line override it")
    add("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add(
        "--auto-resume",
        action="store_true",
        help="resume when --out has a checkpoint, else start (for restarts by torchrun --max-restarts)",
    )
    add("--device", default=d.device, help="auto (CUDA if available), cpu, cuda or cuda:N")
    add(
        "--threads",
        type=int,
        default=d.threads,
        help="torch CPU threads (default 1: fastest measured for small models on a busy 2-core machine)",
    )
    add("--data-dir", default=d.data_dir, help="folder with the dataset files (non-bundled datasets)")
    add("--download", action="store_true", help="let torchvision download mnist/cifar10/cifar100 into --data-dir")
    add("--max-steps-per-epoch", type=int, default=d.max_steps_per_epoch)
    add("--no-progress", dest="progress", action="store_false", help="no progress bars")
    add("--amp", action="store_true", help="bfloat16 autocast (CUDA only)")
    add("--compile", action="store_true", help="torch.compile the model")
    parts = parser.add_argument_group("parts")
    parts.add_argument("--init", default=d.init, help="ghn or ghn:CHECKPOINT (predicted initialisation)")
    parts.add_argument("--ghn-noise", type=float, default=d.ghn_noise, help="relative noise on predicted weights")
    parts.add_argument("--precond", default=d.precond, help="gradient preconditioner (quicktrain.precond)")
    parts.add_argument("--damping", type=float, default=d.damping)
    parts.add_argument("--curvature-interval", type=int, default=d.curvature_interval)
    parts.add_argument("--inverse-interval", type=int, default=d.inverse_interval)
    parts.add_argument("--boost", action="store_true", help="NetBooster: expand, train, linearise, contract")
    parts.add_argument("--boost-ratio", type=float, default=d.boost_ratio,
                       help="NetBooster expansion ratio r of the inserted blocks (hidden width r*C, e.g. 1.5)")
    parts.add_argument("--plt-start", type=float, default=d.plt_start, help="fraction of steps where PLT starts")
    parts.add_argument(
        "--consolidate",
        default=d.consolidate,
        help="continue from this finished run folder, protecting what it learned with EWC",
    )
    parts.add_argument("--consolidate-strength", type=float, default=d.consolidate_strength, help="EWC lambda")
    parts.add_argument(
        "--consolidate-curvature",
        choices=("diag", "kron", "unitwise"),
        default=d.consolidate_curvature,
        help="curvature representation of the EWC penalty",
    )
    parts.add_argument("--plt-end", type=float, default=d.plt_end, help="fraction of steps where slopes reach 1")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` named by parsed ``train`` arguments."""
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in TrainConfig.field_names()})


def cmd_train(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    result = fit(config, build_hooks(config))
    m = result.metrics
    print(
        f"final: test acc {m['test_acc']:.4f}  test loss {m['test_loss']:.4f}  val acc {m['val_acc']:.4f}"
        + (f"  ->  {result.out}" if result.out else "")
    )


def cmd_demo(args: argparse.Namespace) -> None:
    """Train the ``bench all`` configurations on the bundled ``digits`` data and print a summary table."""
    out = Path(args.out)
    start = time.perf_counter()
    base = TrainConfig(dataset="digits", model="cnn", epochs=args.epochs, lr=3e-3, progress=False)
    records = bench.run_ablation(base, out, seeds=[0])
    rows = bench.summary_rows(records, target=0.95)
    report.print_table(bench.SUMMARY_COLUMNS, rows, title="quicktrain demo: cnn on digits, one seed")
    png = report.plot_runs([run for runs in records.values() for run in runs], out / "demo.png")
    print(f"demo finished in {time.perf_counter() - start:.0f}s; curves in {png}")


def cmd_report(args: argparse.Namespace) -> None:
    """Print the comparison table and draw the curves; with ``--html`` also write the HTML report and its CSV."""
    runs = [report.load_run(d) for d in args.runs]
    section = report.runs_section(runs, args.out)
    columns, rows = section.tables[0]
    report.print_table(columns, rows, title="runs")
    print(f"plot: {args.out}")
    if args.html:
        csv_path = report.write_csv(columns, rows, Path(args.html).with_suffix(".csv"))
        section.downloads.append(csv_path)
        print(f"html: {report.render_html([section], args.html, title='quicktrain report')}  (table: {csv_path})")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; for ``train --recipe FILE`` the recipe's settings become the defaults of the flags."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe")
    recipe = pre.parse_known_args(argv)[0].recipe
    return get_args_parser(load_recipe(recipe) if recipe else {}).parse_args(argv)


def get_args_parser(train_defaults: dict | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quicktrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model on a dataset")
    add_train_arguments(train)
    train.set_defaults(func=cmd_train, **(train_defaults or {}))
    demo = sub.add_parser("demo", help="a short run on the bundled digits data with a summary table")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--epochs", type=int, default=15)
    demo.set_defaults(func=cmd_demo)
    rep = sub.add_parser("report", help="compare run folders: a table and accuracy/loss plots")
    rep.add_argument("runs", nargs="+", help="run folders (the --out of quicktrain train)")
    rep.add_argument("--out", default="report.png", help="PNG file to write")
    rep.add_argument("--html", help="also write this self-contained HTML report, and the table as CSV beside it")
    rep.set_defaults(func=cmd_report)
    boost_cli.add_subparser(sub)
    ghn_cli.add_subparser(sub)
    kron_cli.add_subparser(sub)
    precond_cli.add_subparser(sub)
    bench.add_subparser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
