"""Pruning: structured pruning gives a smaller model equal to the masked original; masks, runs and the CLI."""

import json

import pytest
import torch
from torch import nn

from quicktrain.curvature_apps import cli
from quicktrain.curvature_apps.channels import mask_channels, shrink
from quicktrain.curvature_apps.prune import apply_masks, channel_keep, prune_run, unstructured_masks
from quicktrain.curvature_apps.run_data import build_model
from quicktrain.models.small import MLP, SmallCNN
from quicktrain.train import TrainConfig, fit, load_checkpoint


def _random_bn(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()


@pytest.mark.parametrize("train_mode", [False, True])
def test_structured_cnn_is_smaller_and_equals_the_masked_original(train_mode):
    model = SmallCNN(1, 3, widths=(5, 6)).double()
    _random_bn(model)
    model.train(train_mode)
    keep = {"features.0.0": torch.tensor([4, 0, 2]), "features.2.0": torch.tensor([1, 5]),
            "classifier.1": torch.randperm(128)[:40]}
    small = shrink(model, keep)
    masked = shrink(model, {})  # an unchanged copy
    mask_channels(masked, keep)
    x = torch.randn(7, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(small(x), masked(x))
    assert small.features[2][0].weight.shape == (2, 3, 3, 3) and small.features[2][1].running_mean.shape == (2,)
    assert small.classifier[1].weight.shape == (40, 2 * 16) and small.classifier[3].weight.shape == (3, 40)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    assert not torch.equal(model(x), masked(x))  # the mask did change the model


def test_structured_mlp_equals_the_masked_original():
    model = MLP(10, 4, hidden=(8, 6)).double()
    keep = channel_keep({"1": torch.randn(8), "3": torch.randn(6)}, 0.5)
    assert [len(k) for k in keep.values()] == [4, 3]
    small = shrink(model, keep)
    mask_channels(model, keep)
    x = torch.randn(5, 10, dtype=torch.float64)
    torch.testing.assert_close(small(x), model(x))
    assert [m.out_features for m in small if isinstance(m, nn.Linear)] == [4, 3, 4]


def test_structured_pruning_refuses_other_models():
    with pytest.raises(ValueError, match="drop --structured"):
        shrink(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), {"0": torch.tensor([0])})


def test_unstructured_masks_remove_the_globally_lowest_scores():
    model = MLP(4, 2, hidden=(3,))
    scores = {"1.weight": torch.arange(12.0).view(3, 4), "3.weight": torch.tensor([[0.5, 20.0, 3.5],
                                                                                  [30.0, 40.0, 50.0]])}
    masks = unstructured_masks(model, scores, 0.4)  # 18 weights -> remove 7: 0, 0.5, 1, 2, 3, 3.5, 4
    assert int(sum((1 - m).sum() for m in masks.values())) == 7
    assert masks["3"].tolist() == [[0.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
    assert masks["1"].flatten().tolist() == [0.0] * 5 + [1.0] * 7
    per_layer = unstructured_masks(model, scores, 0.5, per_layer=True)  # 6 of 12 and 3 of 6 removed
    assert per_layer["1"].flatten().tolist() == [0.0] * 6 + [1.0] * 6
    assert per_layer["3"].tolist() == [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    apply_masks(model, masks)
    assert int((model[1].weight == 0).sum()) == 5
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        unstructured_masks(model, scores, 1.0)


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "cnn"
    fit(TrainConfig(dataset="digits", model="cnn", epochs=1, max_steps_per_epoch=3, out=str(out), progress=False))
    return out


def test_prune_run_structured_writes_a_smaller_loadable_model(cnn_run, tmp_path):
    result = prune_run(cnn_run, 0.5, structured=True, score="obd-kron", finetune_steps=2, out=tmp_path / "p",
                       batches=2)
    ckpt = load_checkpoint(tmp_path / "p" / "model.pt")
    assert ckpt["pruning"]["widths"] == {"features.0.0": 16, "features.2.0": 32, "classifier.1": 64}
    model = build_model(ckpt)
    assert sum(p.numel() for p in model.parameters()) == result["params"]
    assert result["params"] < sum(p.numel() for p in build_model(load_checkpoint(cnn_run / "model.pt")).parameters())
    assert json.loads((tmp_path / "p" / "summary.json").read_text())["metrics"]["step"] == 2


def test_prune_cli_unstructured_keeps_masked_weights_at_zero_through_finetuning(cnn_run, tmp_path, capsys):
    cli.main(["prune", str(cnn_run), "--sparsity", "0.6", "--score", "magnitude", "--finetune-steps", "2",
              "--out", str(tmp_path / "u")])
    assert "test acc" in capsys.readouterr().out
    weights = [v for k, v in load_checkpoint(tmp_path / "u" / "model.pt")["model"].items()
               if k.endswith("weight") and v.dim() > 1]
    total = sum(w.numel() for w in weights)
    assert sum(int((w == 0).sum()) for w in weights) == round(0.6 * total)
    with pytest.raises(SystemExit):
        cli.main(["prune", str(cnn_run), "--sparsity", "1.5"])
