import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from quicktrain import data
from quicktrain.data.bundled import FASHION_MNIST_DIR, read_idx


def test_digits_splits_shapes_labels_and_normalisation():
    s = data.get_dataset("digits")
    assert [len(d) for d in (s.train, s.val, s.test)] == [1257, 180, 360]
    assert s.in_shape == (1, 8, 8) and s.num_classes == 10
    for split in (s.train, s.val, s.test):
        x, y = split.tensors
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert y.min() == 0 and y.max() == 9
    all_x = torch.cat([d.tensors[0] for d in (s.train, s.val, s.test)])
    assert abs(all_x.mean().item()) < 1e-3 and abs(all_x.std().item() - 1) < 1e-2


def test_digits_is_deterministic_and_seed_moves_only_the_val_split():
    a, b, c = data.get_dataset("digits"), data.get_dataset("digits"), data.get_dataset("digits", seed=1)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert torch.equal(a.test.tensors[0], c.test.tensors[0])
    assert not torch.equal(a.val.tensors[0], c.val.tensors[0])
    # the splits partition the 1,797 images: same multiset of labels and same pixel sums as the whole set
    from sklearn.datasets import load_digits

    labels = torch.cat([d.tensors[1] for d in (a.train, a.val, a.test)])
    assert torch.equal(torch.bincount(labels), torch.bincount(torch.from_numpy(load_digits().target)))
    sums = torch.cat([d.tensors[0].flatten(1).sum(1) for d in (a.train, a.val, a.test)]).double()
    whole = (torch.from_numpy(load_digits().images).double() / 16 - 0.3053) / 0.3760
    assert torch.allclose(sums.sort().values, whole.flatten(1).sum(1).sort().values, atol=1e-3)


def test_fashion_mnist_real_files():
    assert FASHION_MNIST_DIR.is_dir(), "install with: apt-get install dataset-fashion-mnist (./dev.sh does it)"
    s = data.get_dataset("fashion-mnist")
    assert [len(d) for d in (s.train, s.val, s.test)] == [55000, 5000, 10000]
    assert s.in_shape == (1, 28, 28)
    y = torch.cat([s.train.tensors[1], s.test.tensors[1]])
    assert y.min() == 0 and y.max() == 9 and torch.bincount(s.test.tensors[1]).tolist() == [1000] * 10
    again = data.get_dataset("fashion-mnist")
    assert torch.equal(s.val.tensors[1], again.val.tensors[1])


def _write_idx(path, array, gz):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(payload)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip_and_fashion_from_user_dir(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, (5200, 28, 28)), "t10k": rng.integers(0, 256, (30, 28, 28))}
    for split, array in images.items():
        suffix = ".gz" if gz else ""
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte{suffix}", array, gz)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte{suffix}", np.arange(len(array)) % 10, gz)
    assert np.array_equal(read_idx(tmp_path / f"t10k-images-idx3-ubyte{'.gz' if gz else ''}"), images["t10k"])
    s = data.get_dataset("fashion-mnist", root=tmp_path)
    assert [len(d) for d in (s.train, s.val, s.test)] == [200, 5000, 30]


def test_corrupt_and_missing_fashion_files_say_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.get_dataset("fashion-mnist", root=tmp_path)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04junk")
    with pytest.raises(ValueError, match="bad magic number"):
        read_idx(tmp_path / "bad")
    _write_idx(tmp_path / "short", np.zeros((3, 2, 2)), gz=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short")


def test_unknown_dataset_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown dataset 'cifar1'.*digits.*fashion-mnist"):
        data.get_dataset("cifar1")


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100"])
def test_torchvision_sets_need_a_directory_and_never_download_implicitly(tmp_path, name):
    with pytest.raises(ValueError, match="--data-dir"):
        data.get_dataset(name)
    with pytest.raises(FileNotFoundError, match="--download"):
        data.get_dataset(name, root=tmp_path)
    assert not any(tmp_path.iterdir())


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog", "eel"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    s = data.get_dataset(f"folder:{tmp_path}")
    assert s.num_classes == 3 and s.in_shape == (3, 32, 32)
    assert len(s.train) + len(s.val) + len(s.test) == 30 and len(s.test) == 6
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.get_dataset(f"folder:{tmp_path / 'nope'}")


def _tree(root, split, classes, count=3, seed=0):
    rng = np.random.default_rng(seed)
    for cls, shade in classes.items():
        (root / split / cls).mkdir(parents=True)
        for i in range(count):
            pixels = np.clip(rng.normal(shade, 5, (9, 9, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / split / cls / f"{i}.png")


def test_image_folder_splits_share_the_class_index_of_train(tmp_path):
    """test/ lacks class 'b': its 'c' images must keep train's label 2, not shift to 1."""
    _tree(tmp_path, "train", {"a": 20, "b": 120, "c": 230}, count=10)
    _tree(tmp_path, "test", {"a": 20, "c": 230})
    _tree(tmp_path, "val", {"b": 120, "c": 230}, seed=1)
    s = data.get_dataset(f"folder:{tmp_path}")
    assert s.num_classes == 3 and len(s.train) == 30 and len(s.val) == 6 and len(s.test) == 6
    for split in (s.train, s.val, s.test):
        images, labels = split.tensors
        brightness = images.mean(dim=(1, 2, 3))
        for label in labels.unique():  # a class's images keep their shade whatever the split: same class, same label
            shade = brightness[labels == label].mean()
            train_shade = s.train.tensors[0][s.train.tensors[1] == label].mean()
            assert abs(shade - train_shade) < 0.2
    assert s.test.tensors[1].tolist() == [0, 0, 0, 2, 2, 2]


def test_image_folder_decoding_matches_pil_resize_and_standardises_with_train_statistics(tmp_path):
    _tree(tmp_path, "train", {"a": 40, "b": 200}, count=4)
    _tree(tmp_path, "test", {"a": 40})
    s = data.get_dataset(f"folder:{tmp_path}")
    raw = Image.open(tmp_path / "test" / "a" / "0.png").convert("RGB").resize((32, 32), Image.BILINEAR)
    expected = torch.from_numpy(np.asarray(raw, dtype=np.float32) / 255).permute(2, 0, 1)
    train_raw = torch.stack([
        torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((32, 32), Image.BILINEAR), np.float32) / 255)
        .permute(2, 0, 1) for p in sorted((tmp_path / "train").glob("*/*.png"))
    ])
    mean, std = train_raw.mean(dim=(0, 2, 3)), train_raw.std(dim=(0, 2, 3))
    torch.testing.assert_close(s.test.tensors[0][0], (expected - mean[:, None, None]) / std[:, None, None],
                               atol=2e-2, rtol=0)


def test_adapter_repeats_grey_channels_and_resizes_up():
    x = torch.randn(2, 1, 8, 8)
    y = data.Adapter((1, 8, 8), (3, 32, 32))(x)
    assert y.shape == (2, 3, 32, 32) and torch.equal(y[:, 0], y[:, 2])
    assert torch.allclose(y.mean(dim=(2, 3))[:, 0], x.mean(dim=(2, 3))[:, 0], atol=0.2)
    assert data.Adapter((1, 8, 8), (1, 8, 8))(x) is x
    with pytest.raises(ValueError, match="3-channel images to a 1-channel"):
        data.Adapter((3, 8, 8), (1, 8, 8))
    with pytest.raises(ValueError, match="shrink"):
        data.Adapter((1, 28, 28), (1, 8, 8))
    with pytest.raises(ValueError, match="expected a batch"):
        data.Adapter((1, 8, 8), (3, 32, 32))(torch.randn(2, 1, 9, 9))


def test_select_classes_keeps_labels_and_head_size():
    s = data.select_classes(data.get_dataset("digits"), data.parse_classes("5-7,9"))
    for split in (s.train, s.val, s.test):
        assert set(split.tensors[1].tolist()) == {5, 6, 7, 9}
    assert s.num_classes == 10 and len(s.test) < 360
    with pytest.raises(ValueError, match="subset of 0..9"):
        data.select_classes(s, [12])
    with pytest.raises(ValueError, match="cannot read classes"):
        data.parse_classes("a-b")
