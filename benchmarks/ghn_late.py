"""Diagnosis of the late fine-tuning phase, where default init overtakes GHN init: variants of GHN init.

``prenorm``: does the predicted weights' scale before BatchNorm slow fine-tuning down? Predicted conv weights
that feed a BatchNorm are larger than default init (``cnn`` on digits: the stem 5.5x,
the second conv 1.9x). BatchNorm makes the network invariant to that scale, but the gradient of a
scale-invariant weight shrinks as ``1/||W||`` and its relative SGD step as ``1/||W||^2``, so a large predicted
weight learns slowly. The test: fine-tune GHN init as predicted and with every pre-BatchNorm weight rescaled to
its default-init norm (the same function after BN statistics are re-estimated), against default init, on the
same seeds and batches.

``noise=E``: is it the predicted tensors' low diversity (repeated tiles, low effective rank)? GHN init with
symmetry-breaking noise of relative std ``E`` (``predict_into(noise=E)``; 0 is the plain prediction).

``spectrum=A``: every predicted weight but the classifier's with its singular values moved a fraction ``A``
toward their mean, singular vectors and norm kept (``quicktrain.ghn.postprocess.flatten_spectrum``): more
diversity without random directions; ``A = 1`` is the nearest orthogonal matrix at the predicted norm.

``orth``: Knyazev (2022)'s post-processing: every predicted weight but the classifier's replaced by the
orthogonal factor of its QR at the predicted norm (``quicktrain.ghn.postprocess.orthogonalize``), BN statistics
re-estimated: the same subspaces, every singular value equal.

``revive``: the dead hidden ReLU units (negative on every BN batch) made live with the same function
(``quicktrain.ghn.postprocess.revive_dead_units``: bias shifted by the median pre-activation, the next layer's
weights from the unit zeroed).

The mechanism is measured, not only the accuracy: for every >= 2-D weight the effective rank and the fraction
of distinct filters, and for every ReLU layer the fraction of dead units (``quicktrain.ghn.postprocess``), at
init and after the last step, per variant.

Every variant is paired with the plain prediction (``noise=0``) and with default init on the same seeds and
batches; the table gives the paired differences at each k.

    python benchmarks/ghn_late.py --dataset digits --variants prenorm
    python benchmarks/ghn_late.py --dataset fashion-mnist --grid sgd:0.03 adamw:1e-3 --variants prenorm
    python benchmarks/ghn_late.py --dataset fashion-mnist --grid sgd:0.03 adamw:1e-3 --variants noise=0.05 noise=0.3
    python benchmarks/ghn_late.py --dataset digits --seeds 4 --variants noise=0.1 noise=0.3 orth --tag=-diversity

Writes ``benchmarks/results/ghn_late-<dataset><tag>.json``; ``--report FILE`` prints a saved run's tables.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ghn import finetune_curve, init_model  # noqa: E402

from quicktrain.data import get_dataset  # noqa: E402
from quicktrain.ghn import load_checkpoint, shipped_checkpoints  # noqa: E402
from quicktrain.ghn.postprocess import (  # noqa: E402
    dead_fraction,
    distinct_filters,
    effective_rank,
    flatten_spectrum,
    orthogonalize,
    revive_dead_units,
)
from quicktrain.ghn.predict import reestimate_bn  # noqa: E402

KS = (10, 25, 50, 100, 200)


def rescale_before_bn(model: torch.nn.Module, reference: torch.nn.Module) -> list[str]:
    """Rescale each Conv2d/Linear weight directly followed by a BatchNorm to ``reference``'s norm."""
    names = []
    modules = list(model.named_modules())
    ref = dict(reference.named_parameters())
    for (name, m), (_, nxt) in zip(modules, modules[1:], strict=False):
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and isinstance(nxt, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.mul_(ref[f"{name}.weight"].norm() / m.weight.norm())
            names.append(f"{name}.weight")
    return names


def transform_but_head(model: torch.nn.Module, fn) -> list[str]:
    """Apply ``fn`` to every >= 2-D weight except the last one (the classifier), as Knyazev (2022) does."""
    names = [n for n, p in model.named_parameters() if p.dim() >= 2][:-1]
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].copy_(fn(params[n]))
    return names


def seen_images(n: int, seed: int, steps: int) -> torch.Tensor:
    """The distinct training images ``finetune_curve`` drew (batches of 64 from ``Generator(seed)``)."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randint(n, (64,), generator=g) for _ in range(steps)]).unique()


@torch.no_grad()
def train_fit(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """``[cross-entropy, accuracy]`` on ``x`` (eval mode)."""
    model.eval()
    logits = torch.cat([model(a) for a in x.split(500)])
    return [float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())]


def diversity(model: torch.nn.Module) -> dict[str, list[float]]:
    """``[effective rank, distinct filters]`` of every >= 2-D weight."""
    return {n: [effective_rank(p), distinct_filters(p)] for n, p in model.named_parameters() if p.dim() >= 2}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--model", default="cnn")
    p.add_argument("--grid", nargs="+", default=["sgd:0.03", "sgd:0.1", "adamw:1e-3", "adamw:3e-3"])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--variants", nargs="*", default=["prenorm"], help="prenorm, noise=E, orth, spectrum=A, revive")
    p.add_argument("--tag", default="")
    p.add_argument("--report", metavar="JSON", help="print the tables of a saved run and exit")
    args = p.parse_args()
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        curves = {key: {int(k): a for k, a in c.items()} for key, c in saved["curves"].items()}
        report(curves, saved["runs"], saved["args"]["variants"], saved["args"]["steps"])
        return
    torch.set_num_threads(1)
    ds = get_dataset(args.dataset)
    ghn = load_checkpoint(shipped_checkpoints()[args.dataset]).eval()
    xtr, ytr = ds.train.tensors
    xte, yte = ds.test.tensors[0][: args.test_size], ds.test.tensors[1][: args.test_size]
    bn = [xtr[i * 128 : (i + 1) * 128] for i in range(4)]
    xfull, yfull = ds.test.tensors  # the whole test set: a fixed 1,000-image subset has its own sampling error
    curves: dict[str, dict[int, float]] = {}
    div: dict[str, dict[str, dict[str, list[float]]]] = {}
    for entry in args.grid:
        opt, lr = entry.split(":")
        for seed in range(args.seeds):
            default, _ = init_model(args.model, ds, ghn, bn, use_ghn=False, seed=seed)
            inits = {"default": default}
            inits["ghn"], _ = init_model(args.model, ds, ghn, bn, use_ghn=True, seed=seed, head_norm="default")
            for variant in args.variants:
                noise = float(variant.split("=")[1]) if variant.startswith("noise=") else 0.0
                m, _ = init_model(args.model, ds, ghn, bn, use_ghn=True, seed=seed, noise=noise, head_norm="default")
                if variant == "revive":
                    print("revived units:", len(revive_dead_units(m, bn)), flush=True)
                if variant == "prenorm":
                    print("rescaled to default-init norm:", rescale_before_bn(m, default), flush=True)
                    reestimate_bn(m, bn)
                if variant == "orth" or variant.startswith("spectrum="):
                    a = float(variant.split("=")[1]) if "=" in variant else 0.0
                    transform_but_head(m, orthogonalize if variant == "orth" else lambda w, a=a: flatten_spectrum(w, a))
                    reestimate_bn(m, bn)
                inits[variant] = m
            for kind, m in inits.items():
                start = {**diversity(m), **{f"dead {n}": [f, f] for n, f in dead_fraction(m, bn).items()}}
                c = finetune_curve(m, xtr, ytr, xte, yte, opt=opt, lr=float(lr), seed=seed, steps=args.steps)
                curves[f"{entry} s{seed} {kind}"] = c
                end = {**diversity(m), **{f"dead {n}": [f, f] for n, f in dead_fraction(m, bn).items()}}
                seen = seen_images(len(ytr), seed, args.steps)  # the images this run trained on: its fit
                div[f"{entry} s{seed} {kind}"] = {
                    "init": start,
                    "end": end,
                    "train_end": train_fit(m, xtr[seen], ytr[seen]) + train_fit(m, xfull, yfull),
                }
                print(entry, seed, f"{kind:12s}", " ".join(f"{k}:{c[k]:.3f}" for k in (0, *KS)), flush=True)
    result = {"args": vars(args), "curves": curves, "runs": div}
    result.update(report(curves, div, args.variants, args.steps))
    out = Path(__file__).resolve().parent / "results" / f"ghn_late-{args.dataset}{args.tag}.json"
    out.write_text(json.dumps(result, indent=1))


def paired_values(runs: list[str], div: dict, a: str, b: str) -> dict[str, tuple[float, float, float]]:
    """Paired ``a - b`` of the end-of-run train accuracy and whole-test-set accuracy: mean and 95% t-interval."""
    out = {}
    for name, i in (("train acc", 1), ("test acc (all)", 3)):
        d = [100 * (div[f"{r} {a}"]["train_end"][i] - div[f"{r} {b}"]["train_end"][i]) for r in runs]
        half = float(stats.t.ppf(0.975, len(d) - 1)) * statistics.stdev(d) / math.sqrt(len(d))
        out[name] = (statistics.mean(d), statistics.mean(d) - half, statistics.mean(d) + half)
    return out


def late(curve: dict[int, float], steps: int) -> float:
    """Mean accuracy over the evaluations of the last quarter (steps 150-200 of 200): one snapshot's
    accuracy moves by several points from one evaluation to the next, this average much less."""
    return statistics.mean(a for k, a in curve.items() if k >= 0.75 * steps)


def report(curves: dict[str, dict[int, float]], div: dict, variants: list[str], steps: int) -> dict:
    """Print and return the paired table (mean, sd, 95% t-interval) and the diversity table."""
    runs = sorted({k.rsplit(" ", 1)[0] for k in curves})
    cols = [*KS, "late"]

    def value(key: str, k: int | str) -> float:
        return late(curves[key], steps) if k == "late" else curves[key][k]

    def paired(a: str, b: str, k: int | str) -> list[float]:
        d = [100 * (value(f"{r} {a}", k) - value(f"{r} {b}", k)) for r in runs]
        m, sd = statistics.mean(d), statistics.stdev(d)
        half = float(stats.t.ppf(0.975, len(d) - 1)) * sd / math.sqrt(len(d))
        return [m, sd, m - half, m + half]

    table = {v: {str(k): paired(v, "ghn", k) for k in cols} for v in variants}
    table["ghn vs default"] = {str(k): paired("ghn", "default", k) for k in cols}
    print(
        f"\n{len(runs)} paired runs; points, mean [95% t-interval]; 'ghn' is the plain prediction (head at default "
        f"norm); 'late' is the mean accuracy over steps >= {0.75 * steps:.0f}"
    )
    heads = [f"k={k}" if k != "late" else k for k in cols]
    print("| variant − ghn | " + " | ".join(heads) + " |\n|---|" + "---|" * len(cols))
    for v, row in table.items():
        print(f"| {v} | " + " | ".join(f"{m:+.2f} [{lo:+.1f}, {hi:+.1f}]" for m, _, lo, hi in row.values()) + " |")
    kinds = ["default", "ghn", *variants]
    layers = list(next(iter(div.values()))["init"])
    summary = {
        kind: {
            when: {
                layer: [statistics.mean(div[f"{r} {kind}"][when][layer][i] for r in runs) for i in (0, 1)]
                for layer in layers
            }
            for when in ("init", "end")
        }
        for kind in kinds
    }
    print(
        "\neffective rank / distinct filters (cos <= 0.99) of each weight, and the fraction of dead units after "
        f"each ReLU chain's producer ('dead ...'), mean over runs; at init -> after {steps} steps"
    )
    print("| init | " + " | ".join(layers) + " |\n|---|" + "---|" * len(layers))
    for kind in kinds:
        cells = [
            f"{summary[kind]['init'][la][0]:.2f} -> {summary[kind]['end'][la][0]:.2f}"
            if la.startswith("dead ")
            else f"{summary[kind]['init'][la][0]:.1f} / {summary[kind]['init'][la][1]:.2f} -> "
            f"{summary[kind]['end'][la][0]:.1f} / {summary[kind]['end'][la][1]:.2f}"
            for la in layers
        ]
        print(f"| {kind} | " + " | ".join(cells) + " |")
    fit = {}
    if all(len(div[f"{r} {kind}"].get("train_end", ())) == 4 for r in runs for kind in kinds):
        fit = {
            kind: [statistics.mean(div[f"{r} {kind}"]["train_end"][i] for r in runs) for i in range(4)]
            for kind in kinds
        }
        d_full = paired_values(runs, div, "ghn", "default")
        print(
            f"\nafter {steps} steps, mean over runs: loss and accuracy on the training images each run drew, and on "
            "the whole test set"
        )
        print("| init | train loss | train acc | test loss (all) | test acc (all) |\n|---|---|---|---|---|")
        for kind, (loss, acc, tl, ta) in fit.items():
            print(f"| {kind} | {loss:.3f} | {acc:.3f} | {tl:.3f} | {ta:.4f} |")
        print(
            "ghn − default, points, mean [95% t-interval]: "
            + ", ".join(f"{k} {m:+.2f} [{lo:+.2f}, {hi:+.2f}]" for k, (m, lo, hi) in d_full.items())
        )
        fit["ghn - default"] = d_full
    return {"paired": table, "diversity": summary, "train_fit": fit}


if __name__ == "__main__":
    main()
