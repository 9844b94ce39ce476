"""``quicktrain boost ...`` sub-commands: ``export`` the final (contracted) tiny model of a run."""

from __future__ import annotations

import argparse

from .export import export_model, load_final_model
from .macs import count_macs, count_params


def add_subparser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``quicktrain boost export RUN_OR_CHECKPOINT --out DIR`` on the top-level sub-parsers."""
    boost = subparsers.add_parser("boost", help="NetBooster tools (export the contracted tiny model)")
    sub = boost.add_subparsers(dest="boost_command", required=True)
    export = sub.add_parser("export", help="write a run's final model as ONNX and TorchScript")
    export.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="run folder (--out of train) or its model.pt")
    export.add_argument("--out", required=True, help="folder for model.onnx and model.ts")
    export.add_argument("--no-onnx", dest="onnx", action="store_false", help="skip ONNX")
    export.add_argument("--no-torchscript", dest="torchscript", action="store_false", help="skip TorchScript")
    export.set_defaults(func=cmd_export)
    return boost


def cmd_export(args: argparse.Namespace) -> None:
    """Load the run's final model, export it, and print what was written with its size and cost."""
    if not (args.onnx or args.torchscript):
        raise SystemExit("boost export: nothing to do (both --no-onnx and --no-torchscript given)")
    loaded = load_final_model(args.run)
    written = export_model(loaded.model, loaded.in_shape, args.out, onnx=args.onnx, torchscript=args.torchscript)
    params, macs = count_params(loaded.model), count_macs(loaded.model, loaded.in_shape)
    print(f"exported {loaded.model_name} from {loaded.source} ({params:,} params, {macs:,} MACs, "
          f"input {list(loaded.in_shape)}):")
    for kind, path in written.items():
        print(f"  {kind}: {path}")


__all__ = ["add_subparser", "cmd_export"]
