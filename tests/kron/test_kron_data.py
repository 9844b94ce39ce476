"""Kronecker datasets: shapes, normalisation, determinism, IDX reading and validation errors."""


import pytest
import torch

from quicktrain.kron.data import (
    KronDataset,
    batch_schedule,
    make_digit_pairs,
    make_fashion_pairs,
    make_teacher,
)


@pytest.mark.parametrize("dims", [(4, 5), (2, 3, 4)], ids=str)
def test_teacher_shapes_norms_determinism(dims):
    ds = make_teacher(30, dims, seed=3, noise=0.1)
    assert ds.n == 30 and ds.dims == dims and ds.x().shape == (30, ds.d)
    torch.testing.assert_close(ds.x().norm(dim=1), torch.ones(30, dtype=torch.float64))
    again = make_teacher(30, dims, seed=3, noise=0.1)
    torch.testing.assert_close(again.y, ds.y, rtol=0, atol=0)
    assert ds.y.std() > 0


def test_digit_pairs():
    ds = make_digit_pairs(200, seed=1)
    assert ds.dims == (64, 64) and ds.d == 4096 and ds.name == "digits"
    assert set(ds.y.tolist()) == {-1.0, 1.0}
    assert 0.3 < (ds.y > 0).double().mean() < 0.7
    torch.testing.assert_close(ds.x().norm(dim=1), torch.ones(200, dtype=torch.float64))
    big = make_digit_pairs(8, size=28, dtype=torch.float32)
    assert big.dims == (784, 784) and big.d == 784**2 and big.factors[0].dtype == torch.float32


def test_fashion_pairs_from_the_shared_loader(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        make_fashion_pairs(4, root=tmp_path)
    ds = make_fashion_pairs(20, seed=0)
    assert ds.dims == (784, 784) and ds.n == 20 and set(ds.y.tolist()) <= {-1.0, 1.0}
    torch.testing.assert_close(ds.x().norm(dim=1), torch.ones(20, dtype=torch.float64))


def test_batch_schedule():
    sched = batch_schedule(10, 3, 7, seed=0)
    assert len(sched) == 7 and all(b.shape == (3,) for b in sched)
    assert len(set(torch.cat(sched[:3]).tolist())) == 9  # one epoch: no repeats
    with pytest.raises(ValueError, match="exceeds the dataset size"):
        batch_schedule(4, 5, 1)


def test_dataset_validation():
    u, v, y = torch.randn(5, 2, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64), torch.zeros(5)
    with pytest.raises(ValueError, match="factor shape mismatch"):
        KronDataset((u, v), y.double())
    with pytest.raises(ValueError, match="targets y"):
        KronDataset((u, u), y)  # float32 y vs float64 factors
    bad = u.clone()
    bad[1, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite data: factor 0 has 1"):
        KronDataset((bad, u), y.double())
    with pytest.raises(ValueError, match="float32 or torch.float64"):
        KronDataset((u.int(), u.int()), y.int())
    ds = make_teacher(20, (3, 3))
    train, test = ds.split(5)
    assert train.n == 15 and test.n == 5
