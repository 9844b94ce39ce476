"""Applications built on the curvature of :mod:`quicktrain.precond` (through its public API only).

* :mod:`~quicktrain.curvature_apps.ewc` — elastic weight consolidation (``quicktrain train --consolidate``);
* :mod:`~quicktrain.curvature_apps.importance` — Optimal Brain Damage saliencies and magnitudes;
* :mod:`~quicktrain.curvature_apps.prune` — pruning a finished run, unstructured or by channels
  (``quicktrain prune``), with :mod:`~quicktrain.curvature_apps.channels` for the channel surgery;
* :mod:`~quicktrain.curvature_apps.run_data` — a finished run's model and task data.
"""

from quicktrain.curvature_apps.ewc import EWCPenalty, consolidated, consolidation_hooks, run_initializer
from quicktrain.curvature_apps.importance import (
    channel_magnitude,
    channel_saliency,
    curvature_diagonal,
    magnitude_scores,
    obd_saliency,
)
from quicktrain.curvature_apps.prune import prune_run

__all__ = [
    "EWCPenalty",
    "channel_magnitude",
    "channel_saliency",
    "consolidated",
    "consolidation_hooks",
    "curvature_diagonal",
    "magnitude_scores",
    "obd_saliency",
    "prune_run",
    "run_initializer",
]
