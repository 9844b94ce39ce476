"""Checkpoints round-trip exactly; predict_into fills models in place, checks data, re-estimates BN."""

import pytest
import torch
from torch import nn

from quicktrain import models
from quicktrain.ghn import GHN, DatasetInfo, ghn_config, load_checkpoint, predict_into, save_checkpoint
from quicktrain.ghn.checkpoint import read_checkpoint
from quicktrain.ghn.predict import default_checkpoint, initializer, reestimate_bn

INFO = DatasetInfo("digits", (1, 8, 8), 10)


@pytest.fixture
def ghn() -> GHN:
    return GHN(ghn_config("T"), INFO)


def test_save_load_round_trips_exactly(ghn, tmp_path):
    path = tmp_path / "g.pt"
    save_checkpoint(path, ghn, command="quicktrain ghn train --dataset digits")
    loaded = load_checkpoint(path)
    assert loaded.config == ghn.config and loaded.dataset == ghn.dataset
    sd, sd2 = ghn.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert read_checkpoint(path)["command"] == "quicktrain ghn train --dataset digits"
    m1 = models.get_model("resnet20", num_classes=10, in_shape=(1, 8, 8))
    m2 = models.get_model("resnet20", num_classes=10, in_shape=(1, 8, 8))
    predict_into(m1, ghn.eval(), bn_batches="keep")
    predict_into(m2, path, bn_batches="keep")
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters(), strict=True))
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic-write temp file is gone


def test_missing_and_corrupt_checkpoints_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(bad)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ValueError, match="not a quicktrain GHN checkpoint"):
        load_checkpoint(other)


def test_predict_into_writes_in_place(ghn):
    model = models.get_model("cnn", num_classes=10, in_shape=(1, 8, 8))
    ids = {n: p.data_ptr() for n, p in model.named_parameters()}
    before = {n: p.clone() for n, p in model.named_parameters()}
    report = predict_into(model, ghn, bn_batches="keep")
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ids  # same storage: in place
    assert sorted(report.predicted) == sorted(before) and report.unsupported == []
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())
    from quicktrain.ghn import model_to_graph

    want = ghn.eval()(model_to_graph(model, torch.zeros(2, 1, 8, 8)))[0]
    assert all(torch.allclose(want[n], p, atol=1e-6) for n, p in model.named_parameters())


def test_wrong_input_shape_or_classes_is_a_clear_error(ghn):
    wrong_shape = models.get_model("cnn", num_classes=10, in_shape=(3, 8, 8))
    with pytest.raises(ValueError, match=r"inputs of shape \(1, 8, 8\).*\(3, 8, 8\)"):
        predict_into(wrong_shape, ghn, example_inputs=torch.zeros(2, 3, 8, 8))
    wrong_classes = models.get_model("cnn", num_classes=7, in_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="10 classes, but the model outputs 7"):
        predict_into(wrong_classes, ghn, bn_batches="keep")


def test_noise_has_its_relative_size(ghn):
    model = models.get_model("cnn", num_classes=10, in_shape=(1, 8, 8))
    predict_into(model, ghn, bn_batches="keep")
    w = model.features[2][0].weight.detach().clone()
    predict_into(model, ghn, bn_batches="keep", noise=0.05, generator=torch.Generator().manual_seed(0))
    w2 = model.features[2][0].weight.detach()
    rel = (w2 - w).std() / w.std()
    assert 0.03 < rel < 0.07


def test_bn_models_need_bn_batches(ghn):
    """Default-init BN statistics do not fit predicted weights: no silent 0.13-instead-of-0.47 any more."""
    model = models.get_model("cnn", num_classes=10, in_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="pass bn_batches=.*or bn_batches=\"keep\""):
        predict_into(model, ghn)
    x = torch.randn(64, 1, 8, 8)
    report = predict_into(model, ghn, bn_batches=list(x.split(16)))
    assert report.bn_batches == 4
    assert not torch.equal(model.features[0][1].running_var, torch.ones(32))
    mlp = models.get_model("mlp", num_classes=10, in_shape=(1, 8, 8))  # no BN: nothing to re-estimate
    assert predict_into(mlp, ghn).bn_batches == 0


def test_bn_statistics_are_re_estimated():
    model = nn.Sequential(nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3))
    batches = [torch.randn(8, 1, 4, 4) * 3 + 1 for _ in range(3)]
    n = reestimate_bn(model, batches)
    assert n == 3
    with torch.no_grad():
        acts = torch.cat([model[0](b) for b in batches])
    want = torch.stack([model[0](b).mean((0, 2, 3)) for b in batches]).mean(0).detach()
    assert torch.allclose(model[1].running_mean, want, atol=1e-5)
    assert acts.shape[0] == 24 and model[1].momentum == 0.1 and model.training
    with pytest.raises(ValueError, match="bn_batches is empty"):
        reestimate_bn(model, [])


def test_initializer_contract(ghn, tmp_path):
    path = tmp_path / "g.pt"
    save_checkpoint(path, ghn)
    init = initializer(path)
    model = models.get_model("resnet20", num_classes=10, in_shape=(1, 8, 8))
    x = torch.randn(16, 1, 8, 8)
    init(model, x)
    assert torch.isfinite(model.eval()(x)).all()
    assert model.fc.weight.norm().item() == pytest.approx((10 / 3) ** 0.5, rel=1e-5)  # head at default norm
    assert not torch.equal(model.bn1.running_var, torch.ones_like(model.bn1.running_var))
    with pytest.raises(ValueError, match="no shipped GHN for dataset 'nope'"):
        default_checkpoint("nope")


def test_model_that_fails_on_the_data_shape_is_a_clear_error(ghn):
    from quicktrain.models import get_model

    model = get_model("tv:resnet18", num_classes=10, in_shape=(3, 32, 32))
    with pytest.raises(ValueError, match=r"inputs of shape \(1, 8, 8\)"):
        predict_into(model, ghn, bn_batches="keep")  # default example inputs: the GHN's digits shape


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_head_norm_default_rescales_only_the_head_and_keeps_the_predictions(ghn, name):
    torch.manual_seed(0)
    kept, scaled = (models.get_model(name, num_classes=10, in_shape=(1, 8, 8)).eval() for _ in range(2))
    predict_into(kept, ghn, bn_batches="keep")
    report = predict_into(scaled, ghn, bn_batches="keep", head_norm="default")
    a, b = dict(kept.named_parameters()), dict(scaled.named_parameters())
    head = [n for n in a if not torch.equal(a[n], b[n])]
    last = list(a)[-2:]  # the classifier's weight and bias are the model's last two parameters
    assert head == last
    weight, bias = last
    assert b[weight].norm().item() == pytest.approx((10 / 3) ** 0.5, rel=1e-5)
    scale = b[weight].norm() / a[weight].norm()
    assert report.head_scale == pytest.approx(scale.item(), rel=1e-5)
    torch.testing.assert_close(b[bias], a[bias] * scale)
    x = torch.randn(16, 1, 8, 8)
    torch.testing.assert_close(scaled(x), kept(x) * scale, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="head_norm must be"):
        predict_into(kept, ghn, bn_batches="keep", head_norm="small")


def test_head_norm_default_keeps_a_head_whose_output_is_not_the_logits(ghn):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.LayerNorm(10))  # output: LayerNorm's scale
    with pytest.warns(UserWarning, match="does not come from one layer's weight"):
        report = predict_into(model, ghn, head_norm="default")
    assert report.head_scale is None
