"""The experiment datamodules: offline, right shapes and classes, disjoint seeded splits."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from experiments.data import (
    DigitsDataModule,
    FashionMNISTDataModule,
    MNIST1DDataModule,
    SyntheticDataModule,
    find_idx_file,
    read_idx,
    read_idx_header,
)

FASHION_DIR = FashionMNISTDataModule.DEFAULT_DIR


def _fashion_available() -> bool:
    try:
        for split in ("train", "t10k"):
            for kind in ("images", "labels"):
                find_idx_file(FASHION_DIR, split, kind)
    except FileNotFoundError:
        return False
    return True


def _digits(**kw):
    return DigitsDataModule(**kw)


def _mnist1d(**kw):
    pytest.importorskip("mnist1d", reason="mnist1d is not installed (pip install mnist1d)")
    return MNIST1DDataModule(num_samples=1000, **kw)


def _synthetic(**kw):
    return SyntheticDataModule(n_samples=600, n_features=12, n_classes=5, **kw)


def _fashion(**kw):
    if not _fashion_available():
        pytest.skip(
            f"Fashion-MNIST IDX files not found in {FASHION_DIR} "
            "(apt-get install dataset-fashion-mnist to run this test)"
        )
    return FashionMNISTDataModule(limit_train=2000, limit_eval=500, **kw)


# name -> (factory, input_shape, num_classes, is_image_in_unit_range)
MODULES = {
    "digits": (_digits, (1, 8, 8), 10, True),
    "mnist1d": (_mnist1d, (1, 40), 10, False),
    "synthetic": (_synthetic, (12,), 5, False),
    "fashion_mnist": (_fashion, (1, 28, 28), 10, True),
}


@pytest.fixture(params=list(MODULES))
def module_spec(request):
    return MODULES[request.param]


def _all_xy(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = dataset.tensors
    return x, y


def test_shapes_and_classes_known_before_setup(module_spec):
    factory, shape, n_cls, _ = module_spec
    dm = factory(batch_size=32, seed=0)
    assert dm.input_shape == shape
    assert dm.num_classes == n_cls
    assert dm.train_set is None  # nothing loaded yet


def test_loaders_give_right_batches(module_spec):
    factory, shape, n_cls, unit_range = module_spec
    dm = factory(batch_size=32, seed=0)
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        x, y = next(iter(loader))
        assert x.shape == (32, *shape)
        assert x.dtype == torch.float32
        assert y.dtype == torch.int64 and y.shape == (32,)
        assert torch.isfinite(x).all()
        if unit_range:
            assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    _, y_train = _all_xy(dm.train_set)
    assert set(y_train.unique().tolist()) == set(range(n_cls))  # every class appears in train
    for ds in (dm.val_set, dm.test_set):
        _, y = _all_xy(ds)
        assert int(y.min()) >= 0 and int(y.max()) < n_cls


def test_splits_are_disjoint_and_nonempty(module_spec):
    factory, *_ = module_spec
    dm = factory(seed=0)
    dm.setup("fit")
    idx = {k: set(v.tolist()) for k, v in dm.split_indices.items()}
    assert all(len(v) > 0 for v in idx.values())
    assert not idx["train"] & idx["val"]
    assert not idx["train"] & idx["test"]
    assert not idx["val"] & idx["test"]
    assert len(dm.train_set) == len(idx["train"])
    assert len(dm.val_set) == len(idx["val"])
    assert len(dm.test_set) == len(idx["test"])


def test_deterministic_given_seed(module_spec):
    factory, *_ = module_spec
    a, b, c = factory(seed=3), factory(seed=3), factory(seed=4)
    for dm in (a, b, c):
        dm.setup("fit")
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(a.split_indices[split], b.split_indices[split])
    for ds_a, ds_b in ((a.train_set, b.train_set), (a.val_set, b.val_set), (a.test_set, b.test_set)):
        torch.testing.assert_close(ds_a.tensors[0], ds_b.tensors[0])
        torch.testing.assert_close(ds_a.tensors[1], ds_b.tensors[1])
    # the shuffled train order is seeded too
    xa, ya = next(iter(a.train_dataloader()))
    xb, yb = next(iter(b.train_dataloader()))
    torch.testing.assert_close(xa, xb)
    torch.testing.assert_close(ya, yb)
    # another seed gives another split
    assert not np.array_equal(a.split_indices["train"], c.split_indices["train"])


def test_setup_is_idempotent():
    dm = DigitsDataModule(seed=0)
    dm.setup("fit")
    train = dm.train_set
    dm.setup("test")
    assert dm.train_set is train


def test_digits_split_sizes():
    dm = DigitsDataModule(seed=0, val_fraction=0.15, test_fraction=0.15)
    dm.setup()
    sizes = {k: len(v) for k, v in dm.split_indices.items()}
    assert sum(sizes.values()) == 1797
    assert sizes["val"] == round(0.15 * 1797) and sizes["test"] == round(0.15 * 1797)


def test_synthetic_respects_arguments():
    dm = SyntheticDataModule(n_samples=300, n_features=3, n_classes=3, seed=1, val_fraction=0.2, test_fraction=0.1)
    dm.setup()
    assert dm.input_shape == (3,) and dm.num_classes == 3
    assert sum(len(v) for v in dm.split_indices.values()) == 300
    assert len(dm.test_set) == 30 and len(dm.val_set) == 60


def test_mnist1d_does_not_touch_global_rng_or_disk(tmp_path, monkeypatch):
    pytest.importorskip("mnist1d", reason="mnist1d is not installed (pip install mnist1d)")
    monkeypatch.chdir(tmp_path)  # get_dataset() would write ./mnist1d_data.pkl here
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    dm = MNIST1DDataModule(num_samples=200, seed=0)
    dm.setup()
    assert np.random.rand() == expected_np and random.random() == expected_py
    assert os.listdir(tmp_path) == []
    assert len(dm.test_set) == 40  # make_dataset's own 80/20 train/test split


def test_limit_train_subsamples():
    dm = DigitsDataModule(seed=0, limit_train=100, limit_eval=50)
    dm.setup()
    assert len(dm.train_set) == 100 and len(dm.val_set) == 50 and len(dm.test_set) == 50


def test_fashion_missing_dir_error_is_helpful(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        FashionMNISTDataModule(data_dir=str(missing))
    msg = str(err.value)
    assert str(missing) in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "MNIST" in msg and "data_dir" in msg


def test_fashion_missing_file_error_is_helpful(tmp_path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as err:
        FashionMNISTDataModule(data_dir=str(tmp_path))
    assert "train-labels" in str(err.value)
    assert "apt-get install dataset-fashion-mnist" in str(err.value)


def _write_idx(path, array: np.ndarray) -> None:
    import gzip
    import struct

    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def test_idx_reader_on_mnist_style_files(tmp_path):
    """A user's own MNIST IDX files (plain or gzipped, either spelling) load through the same reader."""
    rng = np.random.default_rng(0)
    images = {s: rng.integers(0, 256, size=(n, 6, 5), dtype=np.uint8) for s, n in (("train", 120), ("t10k", 30))}
    labels = {s: (np.arange(len(images[s])) % 10).astype(np.uint8) for s in images}
    _write_idx(tmp_path / "train-images.idx3-ubyte", images["train"])  # Kaggle-style name, not gzipped
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels["train"])
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", images["t10k"])
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels["t10k"])
    np.testing.assert_array_equal(read_idx(str(tmp_path / "train-images.idx3-ubyte")), images["train"])
    assert read_idx_header(str(tmp_path / "train-labels-idx1-ubyte.gz")) == (np.dtype(np.uint8), (120,))

    dm = FashionMNISTDataModule(data_dir=str(tmp_path), batch_size=8, val_fraction=0.25)
    assert dm.input_shape == (1, 6, 5)
    dm.setup()
    assert len(dm.test_set) == 30 and len(dm.val_set) == 30 and len(dm.train_set) == 90
    x_test, y_test = dm.test_set.tensors
    torch.testing.assert_close(x_test, torch.from_numpy(images["t10k"]).float().div(255).unsqueeze(1))
    torch.testing.assert_close(y_test, torch.from_numpy(labels["t10k"]).long())


def test_idx_reader_rejects_garbage(tmp_path):
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(b"\x01\x02\x03\x04garbage")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(str(bad))
