"""Ablation: why K-FAC needs more steps than SOAP to the anchors' target (one seed, short runs, in turns).

Each variant trains ``--steps`` steps on seed ``--seed`` (0) at batch 128 with the anchors' data, clock and evaluation
(:mod:`precond_anchors`); none stops at the target, so every curve has the same length. Printed per variant:
the subset accuracy every ``--eval-every`` steps, the first step at the target, ms/step; and at step
``--norm-step`` the per-parameter update size ``RMS(Δθ) = ‖Δθ‖/√n`` of one optimizer step (the parameter change, so
learning rate, momentum and preconditioner together), for comparing layer by layer with SOAP.

Usage::

    .venv/bin/python benchmarks/precond_anchors_ablate.py --variants kfac kfac,c=1,i=1 kfac,d=0.001,lr=0.001 soap
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import precond_anchors as pa  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from quicktrain import precond  # noqa: E402


def _maker_step(method: str, opt: str = "sgd", kl_clip: float | None = None, root_scale: float = 1.0,
                momentum: float = 0.9, **config) -> Callable[[nn.Module, float], pa.Step]:
    """``method``'s maker writing ``F̂⁻¹g`` into ``.grad``, applied by SGD with ``momentum`` (0.9) or AdamW.

    ``kl_clip``: KFAC-pytorch's trust region, every preconditioned gradient times
    ``ν = min(1, √(κ / (η² Σ gᵀF̂⁻¹g)))``; ``root_scale``: the plain gradients of the parameters outside the
    maker's layers (class token, positional embedding) times this factor.
    """

    def build(model: nn.Module, lr: float) -> pa.Step:
        maker = precond.make(method, model, nn.CrossEntropyLoss(), **config)
        layer_params = {id(p) for m in getattr(maker, "modules", {}).values() for p in m.parameters(recurse=False)}
        raw: dict[int, torch.Tensor] = {}
        if kl_clip is not None:
            for rep in maker.reps.values():
                inner_pre = rep.precondition

                def pre(damping, rep=rep, inner_pre=inner_pre):
                    raw.update({id(p): p.grad.clone() for p in rep.module.parameters(recurse=False)})
                    inner_pre(damping)

                rep.precondition = pre
        if opt == "sgd":
            o = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=5e-4)
        else:
            o = torch.optim.AdamW(model.parameters(), lr=lr)

        def step(x, y):
            o.zero_grad(set_to_none=True)
            try:
                loss, _ = maker.forward_backward(x, y)
            except FloatingPointError:  # a non-finite loss or update: the run diverged
                return torch.tensor(float("nan"))
            if kl_clip is not None:
                params = [p for p in model.parameters() if id(p) in raw]
                vg = sum(float((p.grad * raw[id(p)]).sum()) for p in params) * lr**2
                nu = min(1.0, (kl_clip / abs(vg)) ** 0.5) if vg else 1.0
                for p in params:
                    p.grad.mul_(nu)
            if root_scale != 1.0:
                for p in model.parameters():
                    if id(p) not in layer_params and p.grad is not None:
                        p.grad.mul_(root_scale)
            o.step()
            return loss

        return step

    return build


_KEYS = {"d": ("damping", float), "c": ("curvature_interval", int), "i": ("inverse_interval", int),
         "ws": ("weight_sharing", str), "fisher": ("fisher_type", str), "opt": ("opt", str),
         "kl": ("kl_clip", float), "root": ("root_scale", float), "graft": ("grafting", str),
         "ema": ("ema_decay", float), "b1": ("beta1", float), "mom": ("momentum", float)}


# heavyball's SOAP and SOLP (SOAP with LaProp's order: momentum of the normalised steps, in the rotated basis)
_HEAVYBALL = {"soap": "SOAP", "solp": "SOLP"}


def variant(spec: str) -> tuple[Callable[[nn.Module, float], pa.Step], float]:
    """``NAME[,KEY=VALUE...]``: an anchors contender (``adamw``...), heavyball's ``soap`` or ``solp`` (``f=``: its
    basis refresh interval), or a maker method (``kfac``, ``kfac_soap``, ``ekfac``, ``shampoo``) with options
    (keys of :data:`_KEYS`, ``lr=`` and ``ln=plain``); returns ``(builder, lr)``. Maker defaults: damping 0.1,
    curvature every 5, inverses every 20, SGD momentum."""
    name, *opts = spec.split(",")
    kv = dict(o.split("=", 1) for o in opts)
    lr = float(kv.pop("lr")) if "lr" in kv else None
    if name in _HEAVYBALL:  # f=: the eigenbasis refresh interval (precondition_frequency, default 2)
        options = {"precondition_frequency": int(kv.pop("f"))} if "f" in kv else {}
        return pa._heavy(_HEAVYBALL[name], **options), lr or 3e-3
    if name in pa.CONTENDERS and name not in precond.list_methods():
        return pa.CONTENDERS[name][0], lr or pa.CONTENDERS[name][1]
    config: dict = {"damping": 0.1, "curvature_interval": 5, "inverse_interval": 20}
    if kv.pop("ln", None) == "plain":
        config["ignore_modules"] = [nn.LayerNorm]
    for k, v in kv.items():
        key, cast = _KEYS[k]
        config[key] = cast(v)
    return _maker_step(name, **config), lr or 0.01


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vit_tiny", choices=list(pa.TARGETS))
    ap.add_argument("--variants", nargs="+", required=True)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-n", type=int, default=1000)
    ap.add_argument("--norm-step", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0, help="initial weights and batch order (the anchors' grid: 0)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    table = {v: variant(v) for v in args.variants}
    pa.CONTENDERS.update(table)
    data = pa.load(args.model, args.eval_n)
    lrs = [table[v][1] for v in args.variants]
    runs = [pa.new_run(args.model, data, v, lr, args.seed, args.steps, 128)
            for v, lr in zip(args.variants, lrs, strict=True)]
    norms: dict[str, dict[str, float]] = {}
    for r in runs:  # wrap each step to record one step's parameter change at --norm-step
        inner = r.step_fn

        def step(x, y, r=r, inner=inner):
            if r.steps + 1 != args.norm_step:
                return inner(x, y)
            before = _params(r.model)
            loss = inner(x, y)
            norms[f"{r.contender}@{r.lr:g}"] = {
                n: float((p.detach() - before[n]).square().mean().sqrt())
                for n, p in r.model.named_parameters()}
            return loss

        r.step_fn = step
    target = pa.TARGETS[args.model]
    pa.in_turns(runs, data, target=2.0, steps=args.steps, cap_s=1e9, batch=128, eval_every=args.eval_every)
    rows = []
    for r in runs:
        first = next((s for s, _, _, a in r.evals if a >= target), None)
        curve = " ".join(f"{a:.3f}" for _, _, _, a in r.evals)
        ms = 1000 * r.seconds / max(r.steps, 1)
        print(f"{r.contender:34s} lr {r.lr:<7.3g} to {target:.0%}: {first or '-':>4} steps  {ms:5.0f} ms/step  "
              f"{'diverged ' if r.diverged else ''}curve {curve}")
        rows.append({"variant": r.contender, "lr": r.lr, "steps_to_target": first, "ms_per_step": round(ms, 1),
                     "diverged": r.diverged, "evals": r.evals})
    names = list(next(iter(norms.values()))) if norms else []
    if names:
        keys = list(norms)
        print("\nupdate RMS(Δθ) at step", args.norm_step, "| " + " | ".join(keys))
        for n in names:
            print(f"{n:28s} " + " ".join(f"{norms[k].get(n, float('nan')):9.2e}" for k in keys))
    out = pa.ROOT / "results" / f"precond_anchors_ablate_{args.model}{args.tag}.json"
    out.write_text(json.dumps({"args": vars(args), "rows": rows, "update_norms": norms}, indent=1))


if __name__ == "__main__":
    main()
