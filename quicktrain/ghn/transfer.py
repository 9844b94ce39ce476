"""Few-shot transfer: a GHN meta-trained on one data set initialises networks for another (GHN-3 Sec. 5.3).

GHN-3 fine-tunes networks it initialised for ImageNet on CIFAR-10/100 with few labels. Here the source GHN
was meta-trained on one data set (e.g. ``fashion-mnist``, ``1x28x28``, 10 classes) and the target may differ:

* **Input shape.** The GHN's prediction does not depend on the image size for convolutional networks, but a
  GHN is only validated for the input shape it was trained on (a mismatch is an error in
  :func:`~quicktrain.ghn.predict_into`). Transfer therefore adapts the *target data* to the source shape
  with :class:`quicktrain.data.Adapter` (bilinear upsampling, grey to RGB; ``digits`` 8x8 -> 28x28). The
  model is built for the source shape and trained and evaluated on adapted target images.
* **Class count.** ``head="predict"`` predicts the classifier for the target's class count: the decoded chunk
  is tiled/sliced to ``[classes, features]`` like any tensor (GHN-2 Sec. 4), with classifier normalisation
  (``beta = 1``). ``head="reinit"`` predicts every other tensor and leaves the classifier at the model's
  default init. With an equal class count ``"predict"`` keeps the source head's predicted values, whose class
  order means nothing for the target; both modes are measured.
* **Labels.** A class subset (``classes=[0, 1, 2, 3, 4]``) is relabelled ``0..k-1`` in the listed order.

The conventional baseline pre-trains the same architecture on the source data (:func:`pretrain`, with
:func:`quicktrain.train.fit`) and copies every tensor whose shape matches into the target model (a head of
another class count keeps default init).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from quicktrain import models
from quicktrain.data import Adapter, get_dataset

from .model import GHN
from .predict import HeadMode, predict_into, reestimate_bn


@dataclass
class TransferData:
    """Target data adapted to the source GHN's input shape, labels ``0..num_classes-1``."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int


def target_data(name: str, in_shape: tuple[int, int, int], classes: list[int] | None = None) -> TransferData:
    """Load data set ``name``, keep and relabel ``classes`` (all when ``None``), adapt images to ``in_shape``.

    Raises:
        ValueError: a class is out of range, or the images cannot be adapted (e.g. they would shrink).
    """
    splits = get_dataset(name)
    classes = list(range(splits.num_classes)) if classes is None else list(classes)
    if not classes or len(set(classes)) != len(classes) or not all(0 <= c < splits.num_classes for c in classes):
        raise ValueError(f"classes {classes} must be distinct ids in 0..{splits.num_classes - 1}")
    if len(classes) < 2:
        raise ValueError("a transfer task needs at least 2 classes")
    adapter = Adapter(splits.in_shape, in_shape)
    relabel = torch.full((splits.num_classes,), -1, dtype=torch.long)
    relabel[torch.tensor(classes)] = torch.arange(len(classes))

    def part(split) -> tuple[Tensor, Tensor]:
        x, y = split.tensors
        keep = relabel[y] >= 0
        with torch.no_grad():
            return adapter(x[keep]), relabel[y[keep]]

    (xtr, ytr), (xte, yte) = part(splits.train), part(splits.test)
    return TransferData(name, xtr, ytr, xte, yte, len(classes))


def few_shot(x: Tensor, y: Tensor, per_class: int, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``per_class`` examples of every class, drawn without replacement with a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    idx = []
    for c in torch.unique(y).tolist():
        pool = torch.nonzero(y == c).flatten()
        if len(pool) < per_class:
            raise ValueError(f"class {c} has {len(pool)} examples, fewer than {per_class}")
        idx.append(pool[torch.randperm(len(pool), generator=g)[:per_class]])
    idx = torch.cat(idx)
    return x[idx], y[idx]


def ghn_init(
    model_name: str,
    ghn: GHN,
    data: TransferData,
    *,
    head: HeadMode,
    noise: float = 0.0,
    seed: int = 0,
) -> nn.Module:
    """Build ``model_name`` for the target class count and predict its parameters with the source GHN.

    BatchNorm statistics are re-estimated on 4 batches of (adapted) target training images.
    """
    if head == "strict":
        raise ValueError('transfer needs head="predict" or head="reinit" (see quicktrain.ghn.transfer)')
    torch.manual_seed(seed)
    model = models.get_model(model_name, num_classes=data.num_classes, in_shape=ghn.dataset.in_shape)
    bn = list(data.x_train[:512].split(128))
    predict_into(
        model,
        ghn,
        example_inputs=data.x_train[:1],
        bn_batches=bn,
        noise=noise,
        generator=torch.Generator().manual_seed(seed),
        head=head,
    )
    return model


def default_init(model_name: str, data: TransferData, in_shape: tuple[int, int, int], *, seed: int = 0) -> nn.Module:
    """``model_name`` with its default init for the target (BN statistics re-estimated like :func:`ghn_init`)."""
    torch.manual_seed(seed)
    model = models.get_model(model_name, num_classes=data.num_classes, in_shape=in_shape)
    reestimate_bn(model, list(data.x_train[:512].split(128)))
    return model


def pretrain(model_name: str, source: str, *, steps: int, lr: float = 1e-3, seed: int = 0) -> nn.Module:
    """Conventional pre-training of ``model_name`` on ``source`` with :func:`quicktrain.train.fit`.

    One epoch capped at ``steps`` steps of batch 64 (AdamW, cosine schedule), no checkpoints written.
    """
    from quicktrain.train import TrainConfig, fit

    cfg = TrainConfig(
        dataset=source, model=model_name, epochs=1, max_steps_per_epoch=steps, lr=lr, seed=seed, progress=True
    )
    return fit(cfg).model


def from_pretrained(
    pretrained: nn.Module, model_name: str, data: TransferData, in_shape: tuple[int, int, int]
) -> nn.Module:
    """A target model with every pre-trained tensor of matching shape copied in (others: default init)."""
    torch.manual_seed(0)
    model = models.get_model(model_name, num_classes=data.num_classes, in_shape=in_shape)
    target = model.state_dict()
    source = pretrained.state_dict()
    model.load_state_dict(
        {k: source[k] if k in source and source[k].shape == v.shape else v for k, v in target.items()}
    )
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy in eval mode (batches of 500)."""
    model.eval()
    return sum(int((model(a).argmax(1) == b).sum()) for a, b in zip(x.split(500), y.split(500), strict=True)) / len(y)


def finetune(
    model: nn.Module, x: Tensor, y: Tensor, *, steps: int, lr: float = 1e-3, batch: int = 64, seed: int = 0
) -> nn.Module:
    """Adam fine-tuning for ``steps`` steps on random batches (``min(batch, len(y))``) of ``(x, y)``."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(steps), desc="finetune", unit="step", leave=False):
        b = torch.randperm(len(y), generator=g)[: min(batch, len(y))]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[b]), y[b]).backward()
        opt.step()
    return model


__all__ = [
    "TransferData",
    "accuracy",
    "default_init",
    "few_shot",
    "finetune",
    "from_pretrained",
    "ghn_init",
    "pretrain",
    "target_data",
]
