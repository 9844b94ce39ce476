"""quicktrain: cheaper neural-network training.

Parts: :mod:`quicktrain.ghn` (predicted initialisation), :mod:`quicktrain.precond` (gradient
preconditioning), :mod:`quicktrain.boost` (NetBooster), :mod:`quicktrain.kron` (Kronecker SGD); shared
:mod:`quicktrain.data`, :mod:`quicktrain.models` and :mod:`quicktrain.train`.
"""

from . import data, models, train
from .data import get_dataset
from .models import get_model
from .train import TrainConfig, fit

__version__ = "0.1.0"
__all__ = ["data", "models", "train", "get_dataset", "get_model", "fit", "TrainConfig", "__version__"]
