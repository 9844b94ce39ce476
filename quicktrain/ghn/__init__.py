"""Graph HyperNetworks (GHN-3 style): predict any network's parameters from its graph in one forward pass.

Modules beyond the core: :mod:`quicktrain.ghn.scale` (very deep and very large targets: ResNet-998/1202,
a 10^9-parameter ViT; time and peak memory) and :mod:`quicktrain.ghn.transfer` (few-shot transfer to another
data set or class count).

References:
    Knyazev et al., "Parameter Prediction for Unseen Deep Architectures", NeurIPS 2021 (GHN-2, DeepNets-1M).
    Knyazev, Hwang, Lacoste-Julien, "Can We Scale Transformers to Predict Parameters of Diverse ImageNet
    Models?", ICML 2023 (GHN-3).
"""

from .archs import ArchSpec, RandomNet, Split, build_arch, sample_arch
from .checkpoint import load_checkpoint, save_checkpoint, shipped_checkpoints
from .graph import Graph, PrimType, model_to_graph
from .meta import MetaTrainConfig, meta_train
from .model import GHN, SIZES, DatasetInfo, GHNConfig, ghn_config, predicted_param_regularizer
from .predict import PredictReport, initializer, predict_into, reestimate_bn

__all__ = [
    # graphs
    "Graph",
    "PrimType",
    "model_to_graph",
    # the hypernetwork
    "GHN",
    "GHNConfig",
    "DatasetInfo",
    "SIZES",
    "ghn_config",
    "predicted_param_regularizer",
    # architectures
    "ArchSpec",
    "RandomNet",
    "Split",
    "build_arch",
    "sample_arch",
    # training and checkpoints
    "MetaTrainConfig",
    "meta_train",
    "load_checkpoint",
    "save_checkpoint",
    "shipped_checkpoints",
    # use
    "PredictReport",
    "initializer",
    "predict_into",
    "reestimate_bn",
]
