"""Knowledge-distillation loss and gradient maker; ONNX/TorchScript export and the ``boost export`` CLI."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quicktrain import models
from quicktrain.boost import DistillationGradients, distillation, distillation_loss, expand
from quicktrain.boost.cli import add_subparser
from quicktrain.boost.export import export_model, load_final_model
from quicktrain.train import CheckpointError, save_checkpoint


def test_distillation_loss_matches_its_definition_float64() -> None:
    s, t = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    y = torch.randint(0, 5, (6,))
    temp, alpha = 3.0, 0.7
    p_t, log_p_s = (t / temp).softmax(-1), (s / temp).log_softmax(-1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(-1).mean()
    want = (1 - alpha) * F.cross_entropy(s, y) + alpha * temp**2 * kl
    torch.testing.assert_close(distillation_loss(s, t, y, temperature=temp, alpha=alpha), want)
    torch.testing.assert_close(distillation_loss(s, t, y, alpha=0.0), F.cross_entropy(s, y))
    assert distillation_loss(t, t, y, alpha=1.0).abs() < 1e-12  # student = teacher: no soft loss
    with pytest.raises(ValueError, match="alpha must be in"):
        distillation(nn.Linear(2, 2), alpha=2.0)
    with pytest.raises(ValueError, match="same classes"):
        distillation_loss(s, t[:, :4], y)


def test_distillation_gradients_train_only_the_student() -> None:
    student, teacher = nn.Linear(4, 3), nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    maker = distillation(teacher, temperature=2.0, alpha=0.5)(student, nn.CrossEntropyLoss())
    assert isinstance(maker, DistillationGradients)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    loss, logits = maker.forward_backward(x, y)
    want = distillation_loss(student(x), teacher(x), y, temperature=2.0, alpha=0.5)
    torch.testing.assert_close(loss, want.detach())
    assert student.weight.grad is not None and all(p.grad is None for p in teacher.parameters())
    assert not teacher.training and logits.shape == (10, 3)
    maker.load_state_dict(maker.state_dict())
    with pytest.raises(ValueError, match="differ"):
        maker.load_state_dict({"temperature": 1.0, "alpha": 0.5})


def _final_checkpoint(tmp_path, model: nn.Module, name: str = "cnn") -> None:
    save_checkpoint({"model": model.state_dict(), "model_name": name, "num_classes": 10,
                     "in_shape": [1, 8, 8]}, tmp_path / "run" / "model.pt")


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_cli_writes_onnx_and_torchscript(tmp_path, capsys) -> None:
    tiny = models.get_model("cnn", num_classes=10, in_shape=(1, 8, 8))
    _final_checkpoint(tmp_path, tiny)
    parser = argparse.ArgumentParser(prog="quicktrain")
    add_subparser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["boost", "export", str(tmp_path / "run"), "--out", str(tmp_path / "exp")])
    args.func(args)  # export_model compares both files with eager PyTorch (onnxruntime when installed)
    assert (tmp_path / "exp" / "model.onnx").stat().st_size > 0
    assert "onnx" in capsys.readouterr().out
    scripted = torch.jit.load(str(tmp_path / "exp" / "model.ts"))
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(scripted(x), tiny.eval()(x))


def test_export_rejects_giants_and_training_checkpoints(tmp_path) -> None:
    tiny = models.get_model("cnn", num_classes=10, in_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="contract"):
        export_model(expand(tiny), (1, 8, 8), tmp_path)
    _final_checkpoint(tmp_path, expand(tiny))
    with pytest.raises(CheckpointError, match="giant"):
        load_final_model(tmp_path / "run")
    save_checkpoint({"model": tiny.state_dict(), "optimizer": {}}, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match="last.pt"):
        load_final_model(tmp_path / "last.pt")
