"""Meta-training lowers the meta-loss; resume equals an uninterrupted run; the schedule is right."""

import pytest
import torch
import torch.distributed as dist

from quicktrain.ghn import GHN, DatasetInfo, build_arch, ghn_config
from quicktrain.ghn.checkpoint import read_checkpoint
from quicktrain.ghn.meta import ArchPool, MetaTrainConfig, lr_at, meta_loss, meta_train

SHAPE = (1, 8, 8)


def test_few_steps_lower_the_meta_loss():
    torch.manual_seed(0)
    ghn = GHN(ghn_config("T", layers=1), DatasetInfo("digits", SHAPE, 10))
    models = [build_arch("train", i, in_shape=SHAPE, num_classes=10) for i in range(2)]
    x = torch.randn(32, *SHAPE)
    y = torch.randint(10, (32,))
    opt = torch.optim.AdamW(ghn.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        total, ce, _ = meta_loss(ghn, models, x, y, reg=3e-5)
        total.backward()
        opt.step()
        losses.append(float(ce))
    assert losses[-1] < 0.8 * losses[0]


def test_lr_schedule():
    assert lr_at(0, base=1.0, warmup=10, total=100) == pytest.approx(0.1)
    assert lr_at(9, base=1.0, warmup=10, total=100) == pytest.approx(1.0)
    assert lr_at(55, base=1.0, warmup=10, total=100) == pytest.approx(0.5)
    assert lr_at(100, base=1.0, warmup=10, total=100) == pytest.approx(0.0)


def test_resume_equals_straight_run(tmp_path):
    kw = dict(dataset="digits", size="T", meta_batch=1, batch_size=8, warmup=2, save_every=100, log_every=100)
    straight = tmp_path / "straight.pt"
    meta_train(MetaTrainConfig(steps=4, **kw), straight)
    resumed = tmp_path / "resumed.pt"
    meta_train(MetaTrainConfig(steps=4, time_budget_min=1e-9, **kw), resumed)  # stops after step 1
    assert read_checkpoint(resumed)["train"]["step"] == 1
    meta_train(MetaTrainConfig(steps=4, **kw), resumed, resume=True)
    a, b = read_checkpoint(straight), read_checkpoint(resumed)
    assert a["train"]["step"] == b["train"]["step"] == 4
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_init_from_starts_at_the_given_weights_and_checks_them(tmp_path):
    kw = dict(dataset="digits", size="T", meta_batch=1, batch_size=8, warmup=2, save_every=100, log_every=100)
    kw["pool_size"] = 4
    first = tmp_path / "first.pt"
    meta_train(MetaTrainConfig(steps=2, **kw), first)
    zero = tmp_path / "zero.pt"  # lr 0: the weights stay where they started
    meta_train(MetaTrainConfig(steps=1, lr=0.0, init_from=str(first), **kw), zero)
    a, b = read_checkpoint(first)["state_dict"], read_checkpoint(zero)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    fresh = tmp_path / "fresh.pt"
    meta_train(MetaTrainConfig(steps=1, lr=0.0, **kw), fresh)
    assert not all(torch.equal(a[k], v) for k, v in read_checkpoint(fresh)["state_dict"].items())
    with pytest.raises(ValueError, match="config differs"):
        meta_train(MetaTrainConfig(steps=1, init_from=str(first), graph_info=False, **kw), tmp_path / "x.pt")


def test_family_weights_draw_the_weighted_family_that_often():
    ghn = GHN(ghn_config("T", layers=1), DatasetInfo("digits", SHAPE, 10))
    pool = ArchPool(ghn, 12, seed=0, in_shape=SHAPE, num_classes=10)
    families = [pool[j][0].spec.family for j in range(len(pool))]
    target = families[0]
    w = pool.draw_weights({target: 5.0})
    assert w.tolist() == [5.0 if f == target else 1.0 for f in families]
    # an independent count: the share of draws that land on the weighted family
    share = families.count(target) * 5 / (families.count(target) * 5 + len(families) - families.count(target))
    idx = torch.multinomial(w, 20_000, replacement=True, generator=torch.Generator().manual_seed(0))
    drawn = sum(families[j] == target for j in idx.tolist()) / 20_000
    assert drawn == pytest.approx(share, abs=0.02)
    with pytest.raises(ValueError, match="unknown architecture families"):
        pool.draw_weights({"transformer": 2.0})
    with pytest.raises(ValueError, match="finite, >= 0"):
        pool.draw_weights({target: -1.0})
    others = {f: 0.0 for f in set(families)}
    with pytest.raises(ValueError, match="weight 0"):
        pool.draw_weights(others)


def test_family_weights_need_a_pool(tmp_path):
    cfg = MetaTrainConfig(dataset="digits", steps=1, meta_batch=1, pool_size=0, family_weights={"vit": 2.0})
    with pytest.raises(ValueError, match="need a fixed pool"):
        meta_train(cfg, tmp_path / "x.pt")


def test_a_failed_rank_leaves_no_process_group(tmp_path, monkeypatch):
    # torchrun's WORLD_SIZE makes meta_train join a group; a one-rank in-process group stands in for torchrun's
    monkeypatch.setenv("WORLD_SIZE", "2")
    real_init = dist.init_process_group
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend: real_init(backend, store=dist.HashStore(), rank=0, world_size=1))
    cfg = MetaTrainConfig(dataset="digits", steps=1, meta_batch=1, pool_size=0, family_weights={"vit": 2.0})
    with pytest.raises(ValueError, match="need a fixed pool"):
        meta_train(cfg, tmp_path / "x.pt")
    assert not dist.is_initialized()
