"""Gradient makers: one object per method that owns all its state and writes the preconditioned gradient.

A maker's ``forward_backward(x, y)`` runs forward and backward (and the extra backward passes its curvature
needs) and leaves ``Δθ = (C + damping)^{-1} ∇θ`` in every ``p.grad``, so any ``torch.optim`` optimizer applies
it. Steps are counted from 0; step ``t`` refreshes the curvature when ``t < warmup`` or
``t % curvature_interval == 0`` and the inverse when ``t < warmup`` or ``t % inverse_interval == 0``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from quicktrain.precond.capture import (
    ATTENTION_TYPES,
    KRON_TYPES,
    NORM_TYPES,
    SUPPORTED_TYPES,
    AttentionProjection,
    LayerBatch,
    LayerCapture,
    check_attention,
    check_module,
)
from quicktrain.precond.curvature import (
    FisherType,
    GraphCurvature,
    loss_kind,
    math_attention,
    n_examples,
    output_sqrt,
    parse_fisher_type,
    unflatten,
)
from quicktrain.precond.distributed import all_reduce_mean
from quicktrain.precond.grafting import Grafting
from quicktrain.precond.representations import FullModel, Representation, first_nonfinite
from quicktrain.train.hooks import unwrap

__all__ = [
    "CurvatureGradients",
    "GraphMaker",
    "PlainGradients",
    "RepresentationMap",
    "RngState",
    "check_common",
    "check_method",
    "check_unsupported",
    "due",
    "no_ema",
    "select_modules",
    "trainable_params",
    "type_map",
]

RepresentationMap = dict[type[nn.Module], Callable[[str, nn.Module], Representation]]
"""Which representation each module type gets: ``{nn.Linear: KronFactored, ...}`` (subclasses match)."""


def type_map(kron: Callable[[str, nn.Module], Representation], embedding: Callable[[str, nn.Module], Representation],
             norm: Callable[[str, nn.Module], Representation]) -> RepresentationMap:
    """One representation for Linear/Conv2d, one for Embedding and one for the normalisation layers."""
    out: RepresentationMap = {t: kron for t in KRON_TYPES}
    out[nn.Embedding] = embedding
    out.update({t: norm for t in NORM_TYPES})
    return out

# ------------------------------------------------------------------------------------------ config
def check_common(damping: float, curvature_interval: int, inverse_interval: int, warmup: int,
                 ema_decay: float | None) -> None:
    """Validate the options every method shares; raise ``ValueError`` naming the bad value."""
    if not damping > 0:
        raise ValueError(f"damping must be > 0, got {damping}")
    for key, v in (("curvature_interval", curvature_interval), ("inverse_interval", inverse_interval)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {v!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
    if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")


def no_ema(method: str, config: dict[str, Any]) -> None:
    """Refuse a moving average for methods that keep the latest batch's rows, and set it to 0."""
    if config.get("ema_decay") not in (None, 0.0):
        raise ValueError(f"{method} keeps the rows of the latest curvature batch only; ema_decay must be 0 or unset")
    config["ema_decay"] = 0.0


def due(step: int, interval: int, warmup: int) -> bool:
    """Whether step ``step`` refreshes a quantity updated every ``interval`` steps after ``warmup``."""
    return step < warmup or step % interval == 0


def _ignored(name: str, module: nn.Module, ignore: Iterable[Any]) -> bool:
    for item in ignore:
        if isinstance(item, str) and (name == item or name.startswith(item + ".")):
            return True
        if isinstance(item, type) and isinstance(module, item):
            return True
        if item is module:
            return True
    return False


def check_unsupported(unsupported: str) -> None:
    """Raise ``ValueError`` unless ``unsupported`` is ``error`` or ``identity``."""
    if unsupported not in ("error", "identity"):
        raise ValueError(f"Unknown unsupported={unsupported!r}; choose from ['error', 'identity']")


def select_modules(model: nn.Module, types: Iterable[type[nn.Module]], ignore: Iterable[Any] = (),
                   unsupported: str = "error", method: str = "") -> dict[str, nn.Module]:
    """Modules with trainable parameters that the method preconditions, by name.

    An ``nn.MultiheadAttention`` becomes two entries when the method has a representation for ``nn.Linear``:
    ``NAME.in_proj`` and ``NAME.out_proj``, :class:`~quicktrain.precond.capture.AttentionProjection` s (linear
    layers over the tokens sharing the attention's parameters). Parameters that a container module holds
    beside its children (a class token, positional embeddings on the root model) have no layer structure to
    model; they keep the plain gradient of the loss, whatever ``unsupported`` says.

    Args:
        model: the (unwrapped) model.
        types: module types the method has a representation for.
        ignore: module names (a name covers its children), module types or module objects whose
            parameters keep the plain gradient.
        unsupported: ``error`` (default) raises for a module with trainable parameters of another type;
            ``identity`` leaves its parameters with the plain gradient.
        method: method name, for messages.

    Returns:
        ``{name: module}`` in model order.
    """
    check_unsupported(unsupported)
    types = tuple(types)
    ignore = list(ignore)
    out = {}
    inside_attention: list[str] = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own or _ignored(name, module, ignore) or any(name.startswith(a + ".") for a in inside_attention):
            continue
        if isinstance(module, ATTENTION_TYPES) and nn.Linear in types:
            check_attention(name, module)
            inside_attention.append(name)
            for which in ("in_proj", "out_proj"):
                out[f"{name}.{which}"] = AttentionProjection(module, which)
        elif isinstance(module, types):
            check_module(name, module)
            out[name] = module
        elif unsupported == "error" and not any(True for _ in module.children()):
            label = name or "<root>"
            raise ValueError(f"module {label!r} ({type(module).__name__}) has trainable parameters but "
                             f"{method or 'this method'} has no representation for it (supported: "
                             f"{sorted({t.__name__ for t in types})}); pass ignore_modules=[{name!r}] or "
                             "unsupported='identity' to apply the plain gradient to it")
    if not out:
        raise ValueError("no module to precondition: every trainable module is ignored or unsupported")
    return out


def trainable_params(model: nn.Module, ignore: Iterable[Any]) -> dict[str, nn.Parameter]:
    """Trainable parameters by full name, without those of ignored modules (see :func:`select_modules`)."""
    ignore = list(ignore)
    out = {}
    for mname, module in model.named_modules():
        if _ignored(mname, module, ignore):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                out[f"{mname}.{pname}" if mname else pname] = p
    return out


# ------------------------------------------------------------------------------------------ makers
class PlainGradients:
    """``sgd``: no preconditioning, same interface (``loss.backward()``); it has no curvature, so the common
    options (``unsupported`` included) are validated and have no effect."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, *, damping: float = 1e-3,
                 curvature_interval: int = 1, inverse_interval: int = 1, warmup: int = 0,
                 ema_decay: float | None = None, ignore_modules: Iterable[Any] = (),
                 unsupported: str = "error") -> None:
        check_common(damping, curvature_interval, inverse_interval, warmup, ema_decay)
        check_unsupported(unsupported)
        self.model, self.loss_fn, self.step = model, loss_fn, 0

    def forward_backward(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.model(inputs)
        loss = self.loss_fn(logits, targets)
        loss.backward()
        self.step += 1
        return loss.detach(), logits.detach()

    def state_dict(self) -> dict[str, Any]:
        return {"method": "sgd", "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_method(state, "sgd")
        self.step = int(state["step"])


def _tensors(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    return []


def check_method(state: dict[str, Any], method: str) -> None:
    """Raise ``ValueError`` when ``state`` was saved by another method than ``method``."""
    if state.get("method") != method:
        raise ValueError(f"state was saved by preconditioner {state.get('method')!r}, not {method!r}")


class RngState:
    """A lazily created ``torch.Generator`` on the data's device whose state is saved and restored."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._gen: torch.Generator | None = None
        self._pending: Tensor | None = None

    def get(self, device: torch.device) -> torch.Generator:
        if self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device=device)
            self._gen.manual_seed(self.seed)
            if self._pending is not None:
                self._gen.set_state(self._pending)
                self._pending = None
        return self._gen

    def state_dict(self) -> Tensor | None:
        return self._gen.get_state() if self._gen is not None else self._pending

    def load_state_dict(self, state: Tensor | None) -> None:
        self._gen, self._pending = None, state


class CurvatureGradients:
    """A curvature-preconditioned gradient maker, configured by per-type representations.

    Each step: forward through ``model`` (the DDP wrapper when there is one), and on curvature steps extra
    backward passes with the vectors of :func:`~quicktrain.precond.curvature.output_sqrt` (``emp`` reuses the
    loss backward); statistics are averaged over ranks; then each representation writes ``(C_l+λ)^{-1}∇θ_l``.

    Args:
        model: the model (possibly DDP-wrapped).
        loss_fn: ``nn.CrossEntropyLoss`` or ``nn.MSELoss`` (mean).
        method: method name (state and messages).
        reps: representation per module type; or None with ``full`` set.
        full: ``cholesky`` or ``smw`` for one dense Fisher over all modules (``full_ng``, ``smw_ng``).
        fisher_type: ``emp``, ``mc`` or ``exact``.
        n_mc_samples: Monte-Carlo samples per example (``mc``).
        damping: ``λ`` added to the curvature (see each representation for where).
        curvature_interval: refresh statistics every this many steps.
        inverse_interval: refresh inverses every this many steps.
        warmup: refresh both at every step before this step.
        ema_decay: moving-average decay of the statistics (0 keeps only the latest; None means 0.95).
        ignore_modules: names/types/objects whose parameters keep the plain gradient.
        unsupported: ``error`` or ``identity`` for modules of types without representation.
        seed: seed of the maker's own random generator (Monte-Carlo sampling, sketches).
        grafting: ``none`` (default), ``sgd`` or ``adam``: layer-wise grafting
            (:mod:`~quicktrain.precond.grafting`): each preconditioned layer's update (its weight and bias
            together) takes the norm of the grafted method's step on that layer, ``Δ_l = ‖D_l‖/‖S_l‖ · S_l``, so
            the preconditioner sets the direction within a layer and the grafted method the step size of each
            layer. The parameters the maker owns but does not precondition (root-level ones such as class tokens
            and positional embeddings, ``unsupported='identity'`` modules) take the identity direction with the
            same norm, ``‖D‖/‖G‖ · G``; ignored modules keep the plain gradient.
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module, *, method: str, reps: RepresentationMap | None,
                 full: str | None = None, fisher_type: str = "mc", n_mc_samples: int = 1,
                 damping: float = 1e-3, curvature_interval: int = 1, inverse_interval: int = 1, warmup: int = 0,
                 ema_decay: float | None = None, ignore_modules: Iterable[Any] = (), unsupported: str = "error",
                 seed: int = 0, grafting: str = "none") -> None:
        ema_decay = 0.95 if ema_decay is None else ema_decay
        self.grafting = Grafting(grafting)
        check_common(damping, curvature_interval, inverse_interval, warmup, ema_decay)
        loss_kind(loss_fn)
        self.fisher_type = parse_fisher_type(fisher_type)
        if n_mc_samples < 1:
            raise ValueError(f"n_mc_samples must be >= 1, got {n_mc_samples}")
        self.model, self.loss_fn, self.method = model, loss_fn, method
        self.n_mc_samples, self.damping = n_mc_samples, damping
        self.curvature_interval, self.inverse_interval, self.warmup = curvature_interval, inverse_interval, warmup
        self.ema_decay = ema_decay
        types = tuple(reps) if reps is not None else SUPPORTED_TYPES
        self.modules = select_modules(unwrap(model), types, ignore_modules, unsupported, method)
        self.reps: dict[str, Representation] = {}
        self.full: FullModel | None = None
        if reps is None:
            self.full = FullModel(self.modules, solver=full or "cholesky")
        else:
            for name, module in self.modules.items():
                factory = next(f for t, f in reps.items() if isinstance(module, t))
                self.reps[name] = factory(name, module)
        self.rng = RngState(seed)
        self._graft_groups = self._grafting_groups(ignore_modules) if grafting != "none" else []
        self.step = 0
        self._has_curvature = False
        self._has_inverse = False

    # -- one step
    def forward_backward(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        t = self.step
        if due(t, self.curvature_interval, self.warmup) or not self._has_curvature:
            loss, logits = self._curvature_step(inputs, targets)
            self._has_curvature = True
        else:
            logits = self.model(inputs)
            loss = self.loss_fn(logits, targets)
            loss.backward()
        if due(t, self.inverse_interval, self.warmup) or not self._has_inverse:
            for name, rep in self._named_reps():
                try:
                    rep.update_inverse(self.damping)
                except torch.linalg.LinAlgError as e:
                    raise FloatingPointError(f"{self.method}: inverse failed in layer {name!r} at step {t} ({e}); "
                                             "raise the damping") from e
            self._has_inverse = True
        steps = [[self.grafting.direction(n, p.grad, t) for n, p in group] for group in self._graft_groups]
        for rep in self._all_reps():
            rep.precondition(self.damping)
        for group, d in zip(self._graft_groups, steps, strict=True):
            c = Grafting.scale([p.grad for _, p in group], d)
            for _, p in group:
                p.grad = p.grad * c
        self._check_grads(t)
        self.step += 1
        return loss.detach(), logits.detach()

    def _grafting_groups(self, ignore_modules: Iterable[Any]) -> list[list[tuple[str, nn.Parameter]]]:
        """The groups that grafting rescales together: each preconditioned module's parameters, then each other
        parameter the maker owns on its own (its gradient is left as it is: the identity direction)."""
        names = {id(p): n for n, p in unwrap(self.model).named_parameters()}
        groups = [[(names[id(p)], p) for p in m.parameters(recurse=False) if p.requires_grad]
                  for m in self.modules.values()]
        inside = {id(p) for group in groups for _, p in group}
        return groups + [[(n, p)] for n, p in trainable_params(unwrap(self.model), ignore_modules).items()
                         if id(p) not in inside]

    def _all_reps(self) -> list:
        return [self.full] if self.full is not None else list(self.reps.values())

    def _named_reps(self) -> list[tuple[str, Any]]:
        return [("<all>", self.full)] if self.full is not None else list(self.reps.items())

    def _check_statistics(self, step: int) -> None:
        """Raise naming the first layer whose statistics hold NaN/Inf (one device sync when all are fine)."""
        named = [(name, t) for name, rep in self._named_reps()
                 for key, v in rep.state_dict().items() if not key.endswith("_inv") for t in _tensors(v)]
        bad = first_nonfinite(named)
        if bad is not None:
            raise FloatingPointError(f"{self.method}: non-finite curvature statistics in layer {bad!r} at step "
                                     f"{step}; check the inputs' scale, lower the learning rate")

    def _curvature_step(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        with LayerCapture(self.modules) as cap:
            logits = self.model(inputs)
            loss = self.loss_fn(logits, targets)
            if not bool(torch.isfinite(loss)):
                raise FloatingPointError(f"{self.method}: non-finite loss at step {self.step}; the model or the "
                                         "data hold NaN/Inf, or the learning rate is too high")
            if self.fisher_type is FisherType.EMP:
                loss.backward()
                scale, passes = math.sqrt(n_examples(self.loss_fn, logits, targets)), slice(0, 1)
            else:
                vecs = output_sqrt(self.loss_fn, logits, targets, self.fisher_type, n_samples=self.n_mc_samples,
                                   generator=self.rng.get(logits.device))
                with cap.paused():  # the statistics use the Fisher's passes only
                    loss.backward(retain_graph=True)
                # last, so that the activations are freed while the output gradients are recorded
                cap.backward_to_outputs(logits, vecs, retain_graph=False)
                scale, passes = 1.0, slice(None)
        n = inputs.shape[0]
        batches = {name: cap.batch(name, n, scale, passes) for name in self.modules}
        del cap  # the batches hold the only references to the records, which _update frees layer by layer
        self._update(batches)
        self._check_statistics(self.step)
        return loss, logits

    def _update(self, batches: dict[str, LayerBatch]) -> None:
        if self.full is not None:
            self.full.update(batches, self.ema_decay)
            return
        device = next(iter(self.modules.values())).weight.device
        # last layer first, each layer's records dropped once its statistics are in: the first layers, whose
        # records and temporaries (conv patches) are the largest, run when most other records are freed
        for name, rep in reversed(self.reps.items()):
            if hasattr(rep, "generator"):
                rep.generator = self.rng.get(device)
            rep.step = self.step
            rep.update(batches.pop(name), self.ema_decay)

    def _check_grads(self, step: int) -> None:
        params = [(name, p) for name, m in self.modules.items() for p in m.parameters(recurse=False)
                  if p.requires_grad]
        bad = first_nonfinite([(name, p.grad) for name, p in params])
        if bad is not None:
            raise FloatingPointError(f"{self.method}: non-finite preconditioned gradient in layer {bad!r} at step "
                                     f"{step}; raise the damping or lower the learning rate")

    # -- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "step": self.step,
            "has_curvature": self._has_curvature,
            "has_inverse": self._has_inverse,
            "rng": self.rng.state_dict(),
            "layers": {name: rep.state_dict() for name, rep in self.reps.items()},
            "full": self.full.state_dict() if self.full is not None else None,
            "grafting": self.grafting.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_method(state, self.method)
        if set(state["layers"]) != set(self.reps):
            raise ValueError(f"state has layers {sorted(state['layers'])}, this maker {sorted(self.reps)}")
        self.step = int(state["step"])
        self._has_curvature, self._has_inverse = bool(state["has_curvature"]), bool(state["has_inverse"])
        self.rng.load_state_dict(state["rng"])
        for name, rep in self.reps.items():
            rep.load_state_dict(state["layers"][name])
        if self.full is not None:
            self.full.load_state_dict(state["full"])
        self.grafting.load_state_dict(state.get("grafting", {}),
                                      {n: p.device for n, p in unwrap(self.model).named_parameters()})


class GraphMaker:
    """Shared: forward through the unwrapped model (attention on the math kernel, which double backward needs),
    keep the graph, average gradients over ranks. Every parameter is in the flat vector of the matrix-free
    products, so ``unsupported`` is validated and has nothing to apply to."""

    method = ""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, damping: float, curvature_interval: int,
                 inverse_interval: int, warmup: int, ema_decay: float | None, ignore_modules: Iterable[Any],
                 unsupported: str = "error") -> None:
        check_common(damping, curvature_interval, inverse_interval, warmup, ema_decay)
        check_unsupported(unsupported)
        if ema_decay is not None:
            raise ValueError(f"{self.method} uses the current batch's curvature only; leave ema_decay unset")
        self.curvature_interval, self.inverse_interval, self.warmup = curvature_interval, inverse_interval, warmup
        self.model, self.loss_fn, self.damping = unwrap(model), loss_fn, damping
        self.params = trainable_params(self.model, ignore_modules)
        ignored = [p for p in self.model.parameters() if p.requires_grad and all(p is not q for q in
                                                                                self.params.values())]
        self._plain = ignored
        self.step = 0

    def _graph(self, inputs: Tensor, targets: Tensor) -> tuple[GraphCurvature, Tensor]:
        with math_attention():
            logits = self.model(inputs)
        loss = self.loss_fn(logits, targets)
        if self._plain:
            for p, g in zip(self._plain, torch.autograd.grad(loss, self._plain, retain_graph=True,
                                                             materialize_grads=True), strict=True):
                p.grad = all_reduce_mean(g.detach().clone())
        gc = GraphCurvature(list(self.params.values()), logits, loss, self.loss_fn, targets)
        return gc, loss

    def _write(self, flat: Tensor) -> None:
        if not bool(torch.isfinite(flat).all()):
            raise FloatingPointError(f"{self.method}: non-finite update at step {self.step}; raise the damping")
        for p, d in zip(self.params.values(), unflatten(flat, list(self.params.values())), strict=True):
            p.grad = d.detach().clone()

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.method, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_method(state, self.method)
        self.step = int(state["step"])

    def _on_device(self, t: Tensor | None) -> Tensor | None:
        """A saved tensor moved to the parameters' device (None stays None)."""
        return None if t is None else t.to(next(iter(self.params.values())).device)
