"""Turns the parts' settings in a :class:`TrainConfig` into the loop's :class:`Hooks`.

This is the only module that knows every part; each part is reached through its public API.
"""

from __future__ import annotations

from torch import nn

from .train import GradientMaker, Hooks, TrainConfig


def build_hooks(config: TrainConfig) -> Hooks:
    """The initializer, gradient maker and transforms that ``config`` asks for (plain training if none)."""
    validate(config)
    hooks = Hooks()
    if config.init is not None:
        hooks.init = _ghn_initializer(config)
        source = config.init.split(":", 1)[1] if ":" in config.init else f"the shipped GHN for {config.dataset}"
        noise = f", noise {config.ghn_noise:g}" if config.ghn_noise else ""
        hooks.notes.append(f"init: parameters predicted by {source} (BatchNorm statistics re-estimated){noise}")
    if config.precond is not None:
        hooks.gradients = _precond_factory(config)
        hooks.notes.append(
            f"gradients: {config.precond} preconditioner, damping {config.damping:g}, curvature every "
            f"{config.curvature_interval} and inverse every {config.inverse_interval} steps"
        )
    if config.boost:
        hooks.transforms.append(_boost_transform(config))
        hooks.notes.append(
            f"transform: NetBooster giant of ratio {config.boost_ratio}, linearised from {config.plt_start:.0%} to "
            f"{config.plt_end:.0%} of the steps, contracted back to {config.model} at the end"
        )
    if config.consolidate is not None:  # after --precond: the EWC penalty's gradient is preconditioned too
        from . import curvature_apps

        hooks.init, hooks.gradients = curvature_apps.consolidation_hooks(
            config.consolidate,
            strength=config.consolidate_strength,
            representation=config.consolidate_curvature,
            model_name=config.model,
            dataset=config.dataset,
            base=hooks.gradients,
        )
        hooks.notes.append(
            f"consolidate: continue from {config.consolidate} with an EWC penalty ({config.consolidate_curvature} "
            f"curvature, strength {config.consolidate_strength:g})"
        )
    return hooks


def validate(config: TrainConfig) -> None:
    """Reject settings the parts cannot honour, before any data is loaded."""
    if config.init is not None and config.init.split(":", 1)[0] != "ghn":
        raise ValueError(f"Unknown --init {config.init!r}; choose 'ghn' or 'ghn:CHECKPOINT'")
    if config.consolidate is not None and (config.init is not None or config.boost):
        raise ValueError(
            "--consolidate continues from a finished run's weights and architecture, so it cannot be combined "
            "with --init (which replaces the weights) or --boost (which changes the architecture)"
        )


def _ghn_initializer(config: TrainConfig):
    from . import ghn

    checkpoint = config.init.split(":", 1)[1] if ":" in config.init else None
    return ghn.initializer(checkpoint, dataset=config.dataset, noise=config.ghn_noise)


def _precond_factory(config: TrainConfig):
    from . import precond

    if config.precond not in precond.list_methods():
        raise ValueError(f"Unknown preconditioner {config.precond!r}; choose from {precond.list_methods()}")

    options = {"grafting": config.grafting} if config.grafting != "none" else {}

    def factory(model: nn.Module, loss_fn: nn.Module) -> GradientMaker:
        try:
            return precond.make(
                config.precond,
                model,
                loss_fn,
                damping=config.damping,
                curvature_interval=config.curvature_interval,
                inverse_interval=config.inverse_interval,
                **options,
            )
        except precond.UnknownOptionError as e:
            if e.option != "grafting":
                raise
            raise ValueError(
                f"--grafting {config.grafting} does not apply to {config.precond!r}, which sets its own step size; "
                "drop --grafting, or pick a method that takes it (kfac, shampoo and the other curvature methods)"
            ) from None

    return factory


def _boost_transform(config: TrainConfig):
    from . import boost

    return boost.BoostTransform(ratio=config.boost_ratio, plt_start=config.plt_start, plt_end=config.plt_end)
