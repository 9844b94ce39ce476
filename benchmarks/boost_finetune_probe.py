"""Why a pre-trained tiny network fine-tunes worse than a fresh one: two candidate causes, measured.

For the tiny networks that ``benchmarks/boost.py`` pre-trained (vanilla and NetBooster, one folder per seed under
``--runs``) and for a fresh initialisation of the same seed:

* **dead ReLU channels**: a conv-BN-ReLU channel whose output is 0 on every image passes no gradient to its
  BatchNorm or filter, so fine-tuning cannot use it. Counted on the whole training split of ``--transfer`` in train
  mode (batch statistics, as fine-tuning starts) and on the first 10,000 training images of the pre-training set,
  with the share of positive outputs per ReLU;
* **filter norm growth**: a conv filter followed by BatchNorm only matters by its direction, and an AdamW step of
  rate ``lr`` turns a filter of norm ``||w||`` by about ``lr * sqrt(numel) / ||w||`` radians, so a filter whose norm
  grew k-fold in pre-training fine-tunes as if at ``lr / k`` (the effective learning rate of scale-invariant weights:
  van Laarhoven, 2017; Hoffer et al., NeurIPS 2018). Reported as ``||w_pre-trained|| / ||w_init||`` per conv layer.

    python benchmarks/boost_finetune_probe.py --model microcnn --tag _micro4_dl_ft0.008 --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch
from torch import nn

from quicktrain import data, models
from quicktrain.train import load_checkpoint


def relu_activity(model: nn.Module, images: torch.Tensor) -> list[tuple[int, float]]:
    """Per ReLU, in order: (channels never positive on ``images``, share of positive outputs), in train mode on one
    batch of all ``images`` (a copy of ``model``, so its running statistics are left alone)."""
    model = copy.deepcopy(model).train()
    outputs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach()))
             for m in model.modules() if isinstance(m, nn.ReLU)]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    return [(int((out.amax(dim=(0, 2, 3)) <= 0).sum()), float((out > 0).float().mean())) for out in outputs]


def filter_norm_growth(model: nn.Module, init: nn.Module) -> list[float]:
    """``||w|| / ||w_init||`` of each convolution's weight, in order."""
    convs = [(m, i) for m, i in zip(model.modules(), init.modules(), strict=True) if isinstance(m, nn.Conv2d)]
    return [float(m.weight.detach().norm() / i.weight.detach().norm()) for m, i in convs]


def load_images(name: str, model: str, limit: int | None = None) -> torch.Tensor:
    images = data.get_dataset(name).train.tensors[0][:limit]
    shape = tuple(images.shape[1:])
    return data.Adapter(shape, models.input_shape(model, shape))(images)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="microcnn")
    p.add_argument("--tag", required=True, help="the benchmarks/boost.py tag whose pre-trained runs to read")
    p.add_argument("--methods", nargs="+", default=["vanilla", "netbooster"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--transfer", default="digits")
    p.add_argument("--runs", default="runs/bench_boost")
    p.add_argument("--results", default="benchmarks/results")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    sets = {args.transfer: load_images(args.transfer, args.model), args.dataset: load_images(args.dataset, args.model,
                                                                                              10_000)}
    in_shape = tuple(next(iter(sets.values())).shape[1:])
    rows = []
    for seed in args.seeds:
        torch.manual_seed(seed)  # the loop seeds so before it builds the model
        init = models.get_model(args.model, num_classes=10, in_shape=in_shape)
        for method in ("init", *args.methods):
            net = copy.deepcopy(init)
            if method != "init":
                folder = Path(args.runs) / f"{args.tag}-{args.model}-{method}--{seed}"
                if not (folder / "model.pt").exists():
                    raise SystemExit(f"{folder / 'model.pt'} not found: run benchmarks/boost.py with --tag {args.tag} "
                                     f"--seeds {seed} and the same --runs first")
                net.load_state_dict(load_checkpoint(folder / "model.pt")["model"])
            growth = filter_norm_growth(net, init)
            for name, images in sets.items():
                rows.append({"seed": seed, "method": method, "data": name, "relus": relu_activity(net, images),
                             "norm_growth": growth})
    widths = [m.out_channels for m in init.modules() if isinstance(m, nn.Conv2d)]
    command = "python benchmarks/boost_finetune_probe.py " + " ".join(argv)
    lines = [f"Dead ReLU channels (never positive, train-mode BatchNorm on the whole set) and conv filter norm over "
             f"its initial norm, {args.model} (channels per layer {widths}), mean over seeds {args.seeds}; 'init' is "
             f"a fresh network.", f"Command: {command}", "",
             "| data | network | dead channels per layer | positive outputs per layer (%) | filter norm / initial |",
             "| --- | --- | --- | --- | --- |"]
    for name in sets:
        for method in ("init", *args.methods):
            mine = [r for r in rows if r["data"] == name and r["method"] == method]
            relus = range(len(mine[0]["relus"]))
            dead = " / ".join(f"{statistics.mean(r['relus'][i][0] for r in mine):.1f}" for i in relus)
            live = " / ".join(f"{100 * statistics.mean(r['relus'][i][1] for r in mine):.0f}" for i in relus)
            grown = " / ".join(f"{statistics.mean(r['norm_growth'][i] for r in mine):.1f}" for i in range(len(widths)))
            lines.append(f"| {name} | {method} | {dead} | {live} | {grown} |")
    text = "\n".join(lines)
    print(text)
    out = Path(args.results)
    (out / f"boost{args.tag}_probe.md").write_text(text + "\n")
    (out / f"boost{args.tag}_probe.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
