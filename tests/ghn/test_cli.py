"""``quicktrain ghn train|predict`` through the argparse entry point."""

import pytest
import torch

from quicktrain.ghn.checkpoint import read_checkpoint
from quicktrain.ghn.cli import main


def test_train_then_predict(tmp_path, capsys):
    ckpt, ship, out = tmp_path / "g.pt", tmp_path / "ship.pt", tmp_path / "cnn.pt"
    args = ["ghn", "train", "--dataset", "digits", "--steps", "2", "--meta-batch", "1", "--batch-size", "8"]
    assert main([*args, "--out", str(ckpt), "--ship", str(ship)]) == 0
    full, shipped = read_checkpoint(ckpt), read_checkpoint(ship)
    assert full["train"]["step"] == 2 and "optimizer" in full["train"] and "optimizer" not in shipped["train"]
    assert shipped["dataset"] == {"name": "digits", "in_shape": [1, 8, 8], "num_classes": 10}
    assert main(["ghn", "predict", "--model", "cnn", "--checkpoint", str(ship), "--out", str(out)]) == 0
    state = torch.load(out, weights_only=True)
    assert "features.0.0.weight" in state and torch.isfinite(state["features.0.0.weight"]).all()
    assert "predicted 10 tensors of cnn" in capsys.readouterr().out


def test_family_weights_are_parsed_stored_and_checked(tmp_path, capsys):
    ckpt = tmp_path / "g.pt"
    args = ["ghn", "train", "--dataset", "digits", "--steps", "1", "--meta-batch", "1", "--batch-size", "8"]
    assert main([*args, "--pool-size", "6", "--family-weights", "vit=3", "mlp=0.5", "--out", str(ckpt)]) == 0
    assert read_checkpoint(ckpt)["train"]["args"]["family_weights"] == {"vit": 3.0, "mlp": 0.5}
    with pytest.raises(SystemExit):
        main([*args, "--family-weights", "vit", "--out", str(ckpt)])
    assert "expected FAMILY=WEIGHT (e.g. vit=3), got 'vit'" in capsys.readouterr().err
