"""benchmarks/boost.py: the paired-difference table's rows for base supervision; the fine-tuning rate."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from quicktrain import models

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "boost.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_boost", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(method: str, seed: int, acc: float) -> dict:
    return {"kind": "pretrain", "model": "m", "method": method, "variant": "", "seed": seed, "test_acc": acc,
            "val_acc": acc, "train_acc": acc, "steps": 10, "train_wall_s": 1.0, "train_cpu_s": 1.0,
            "params": 1, "macs": 1}


def test_base_supervision_is_paired_with_equal_wall_vanilla_and_kd_only_where_they_ran() -> None:
    accs = {"vanilla": [0.80, 0.82, 0.81], "netbooster": [0.81, 0.84, 0.815], "netbooster_base": [0.83, 0.845, 0.82],
            "vanilla_wall": [0.82, 0.83, 0.84]}
    records = [_row(m, s, a) for m, values in accs.items() for s, a in enumerate(values)]
    text = _bench().tables(records, "header")
    diffs = 100 * (np.array(accs["netbooster_base"]) - np.array(accs["vanilla_wall"]))
    half = stats.t.ppf(0.975, 2) * diffs.std(ddof=1) / np.sqrt(3)
    expected = f"| m | netbooster_base − vanilla_wall | {diffs.mean():+.2f} | [{diffs.mean() - half:+.2f}, " \
               f"{diffs.mean() + half:+.2f}] | 3 |"
    assert expected in text.splitlines()
    # neither linear nor KD ran: no row (not a row of NaNs)
    assert "netbooster_base − kd" not in text and "netbooster_base − linear" not in text
    assert "nan" not in text


def _transfer(method: str, seed: int, repeat: int, acc: float) -> dict:
    return {"kind": "transfer", "model": "m", "method": method, "variant": "", "seed": seed, "repeat": repeat,
            "test_acc": acc, "train_wall_s": 1.0}


def test_fine_tuning_repeats_are_averaged_per_seed_before_pairing() -> None:
    rng = np.random.default_rng(0)
    accs = {m: rng.uniform(0.8, 0.9, size=(3, 4)) for m in ("vanilla", "netbooster")}  # [seed, repeat]
    records = [_row(m, s, 0.5) for m in accs for s in range(3)]
    records += [_transfer(m, s, r, a[s, r]) for m, a in accs.items() for s in range(3) for r in range(4)]
    text = _bench().tables(records, "header")
    diffs = 100 * (accs["netbooster"].mean(1) - accs["vanilla"].mean(1))  # paired over seeds, not seed x repeat
    half = stats.t.ppf(0.975, 2) * diffs.std(ddof=1) / np.sqrt(3)
    per_seed = 100 * accs["netbooster"].mean(1)
    expected = (f"| m | netbooster | {per_seed.mean():.2f} ± {per_seed.std(ddof=1):.2f} | {diffs.mean():+.2f} "
                f"[{diffs.mean() - half:+.2f}, {diffs.mean() + half:+.2f}] (3 seeds × 4 fine-tunings) |")
    assert expected in text.splitlines()


def test_fine_tuning_runs_at_transfer_lr_and_pre_training_at_lr(tmp_path: Path) -> None:
    # two steps of pre-training on fashion-mnist and one epoch of fine-tuning on digits: the rates, not accuracy
    _bench().main(["--models", "microcnn", "--methods", "vanilla", "--steps", "2", "--seeds", "0", "--lr", "0.05",
                   "--transfer-lr", "0.003", "--transfer-epochs", "1", "--transfer-labels", "0",
                   "--runs", str(tmp_path / "runs"), "--results", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "boost.jsonl").read_text().splitlines()]
    assert {(r["kind"], r["method"], r["lr"]) for r in rows} == {
        ("pretrain", "vanilla", 0.05), ("transfer", "scratch", 0.003), ("transfer", "vanilla", 0.003)}
    assert "transfer: digits (1 epochs, lr 0.003" in (tmp_path / "boost.md").read_text()
    # fine-tuning those networks again, rescaled, under another tag: no new pre-training
    _bench().main(["--models", "microcnn", "--methods", "vanilla", "--steps", "2", "--seeds", "0", "--lr", "0.05",
                   "--transfer-epochs", "1", "--transfer-labels", "0", "--pretrained", "", "--transfer-rescale",
                   "--runs", str(tmp_path / "runs"), "--results", str(tmp_path), "--tag", "_again"])
    again = [json.loads(line) for line in (tmp_path / "boost_again.jsonl").read_text().splitlines()]
    assert {(r["kind"], r["method"], r["rescaled"]) for r in again} == {
        ("transfer", "scratch", False), ("transfer", "vanilla", True)}


def test_rescaled_filters_keep_the_function_and_take_the_given_norms() -> None:
    torch.manual_seed(0)
    model = models.get_model("microcnn", num_classes=10, in_shape=(1, 28, 28)).train()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        for i, conv in enumerate(convs):
            conv.weight.mul_(5.0 + i)  # as pre-training grows them
    x = torch.randn(16, 1, 28, 28)
    before = model(x)
    targets = [torch.tensor(0.5 + i) for i in range(len(convs))]
    _bench().rescale_filters(model, targets)
    assert [float(c.weight.detach().norm()) for c in convs] == pytest.approx([float(t) for t in targets])
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-4)  # train-mode BatchNorm: scale-invariant
