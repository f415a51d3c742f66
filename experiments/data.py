"""Offline LightningDataModules for the experiments.

Every module here works without network access and gives a fixed
train / val / test split for a given ``seed``:

============================  ==================  =======  =========================================
class                         input_shape         classes  source
============================  ==================  =======  =========================================
``DigitsDataModule``          ``(1, 8, 8)``       10       scikit-learn ``load_digits`` (default)
``FashionMNISTDataModule``    ``(1, 28, 28)``     10       IDX files on disk (Fashion-MNIST / MNIST)
``MNIST1DDataModule``         ``(1, 40)``         10       ``mnist1d.data.make_dataset`` (generated)
``SyntheticDataModule``       ``(n_features,)``   n_cls    seeded Gaussian blobs (``make_blobs``)
============================  ==================  =======  =========================================

``input_shape`` (shape of one example, without the batch dimension) and
``num_classes`` are set in ``__init__`` so a model can be built before
``setup`` runs.  All the splitting, subsampling and DataLoader code lives in
:class:`SplitDataModule`; a subclass only implements :meth:`SplitDataModule.load`.
"""

from __future__ import annotations

import functools
import gzip
import os
import random
import struct
import zlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Sampler, TensorDataset

__all__ = [
    "LoadedArrays",
    "SplitDataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "MNIST1DDataModule",
    "SyntheticDataModule",
    "read_idx",
    "read_idx_header",
    "find_idx_file",
]


@dataclass
class LoadedArrays:
    """What :meth:`SplitDataModule.load` returns.

    ``x``/``y`` is the pool that train and val (and test, when no fixed test
    set is given) are drawn from.  ``x_test``/``y_test`` is an optional fixed
    test set (e.g. the official Fashion-MNIST ``t10k`` files); when it is given
    the test split is exactly that set and ``test_fraction`` is not used.
    """

    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor | None = None
    y_test: torch.Tensor | None = None
    #: inputs may be stored compactly (e.g. uint8 pixels); only the selected
    #: examples are converted to float32 and divided by ``scale``.
    scale: float = 1.0


def _split_count(fraction: float, n: int, name: str) -> int:
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {fraction}")
    return int(round(fraction * n))


def _seeded_split(
    idx: np.ndarray, labels: np.ndarray, n_out: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``idx`` into (rest, out) with ``len(out) == n_out``, stratified by label when possible."""
    if n_out == 0:
        return idx, idx[:0]
    if n_out >= len(idx):
        raise ValueError(f"cannot take {n_out} examples out of {len(idx)}")
    counts = np.bincount(labels)
    counts = counts[counts > 0]
    n_cls = len(counts)
    stratify = labels if (counts.min() >= 2 and n_out >= n_cls and len(idx) - n_out >= n_cls) else None
    rest, out = train_test_split(idx, test_size=n_out, random_state=seed, shuffle=True, stratify=stratify)
    return np.sort(rest), np.sort(out)


class EpochSeededSampler(Sampler[int]):
    """A shuffle drawn from ``(seed, epoch)``: Lightning calls ``set_epoch`` before each epoch, so a run resumed
    from a checkpoint replays exactly the order of the uninterrupted run (a loader whose generator is seeded once
    restarts from epoch 0's order whenever it is re-created)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n


class SplitDataModule(pl.LightningDataModule):
    """Base class: turns the tensors of :meth:`load` into train/val/test splits and DataLoaders.

    Args:
        batch_size: batch size of all three loaders.
        seed: fixes the split (stratified by class where possible), the
            ``limit_*`` subsamples and the order of the shuffled train loader.
        val_fraction: fraction of the pool held out for validation.
        test_fraction: fraction of the pool held out for test (ignored when the
            data set has a fixed test set).
        num_workers: DataLoader workers.
        limit_train: keep at most this many training examples (seeded subsample).
        limit_eval: keep at most this many val and test examples each.

    After :meth:`setup`, ``train_set``/``val_set``/``test_set`` are
    ``TensorDataset`` objects and ``split_indices`` maps ``"train"``, ``"val"``,
    ``"test"`` to the (sorted, disjoint) indices of each split into the
    concatenation of the pool and the fixed test set.
    """

    input_shape: tuple[int, ...]
    num_classes: int

    def __init__(
        self,
        batch_size: int = 128,
        seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        num_workers: int = 0,
        limit_train: int | None = None,
        limit_eval: int | None = None,
    ) -> None:
        super().__init__()
        if type(self).__init__ is SplitDataModule.__init__:
            self.save_hyperparameters()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.num_workers = int(num_workers)
        self.limit_train = None if limit_train is None else int(limit_train)
        self.limit_eval = None if limit_eval is None else int(limit_eval)
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None
        self.split_indices: dict[str, np.ndarray] = {}

    # -- to implement -----------------------------------------------------
    def load(self) -> LoadedArrays:
        """Return the full data as float32 inputs of shape ``(N, *input_shape)`` and int64 labels."""
        raise NotImplementedError

    # -- splitting ----------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return  # already built: splits do not depend on the stage
        arrays = self.load()
        x, y = arrays.x, arrays.y.long()
        if tuple(x.shape[1:]) != tuple(self.input_shape):
            raise ValueError(f"{type(self).__name__}: loaded inputs of shape {tuple(x.shape[1:])}, expected {self.input_shape}")
        n_pool = len(x)
        y_np = y.numpy()
        pool_idx = np.arange(n_pool)

        if arrays.x_test is None:
            n_test = _split_count(self.test_fraction, n_pool, "test_fraction")
            rest, test_idx = _seeded_split(pool_idx, y_np, n_test, self.seed)
            x_all, y_all = x, y
        else:
            assert arrays.y_test is not None
            rest = pool_idx
            test_idx = np.arange(n_pool, n_pool + len(arrays.x_test))
            x_all = torch.cat([x, arrays.x_test.to(x.dtype)])
            y_all = torch.cat([y, arrays.y_test.long()])
        n_val = _split_count(self.val_fraction, n_pool, "val_fraction")
        train_idx, val_idx = _seeded_split(rest, y_np[rest], n_val, self.seed + 1)

        rng = np.random.default_rng(self.seed)
        train_idx = self._subsample(train_idx, self.limit_train, rng)
        val_idx = self._subsample(val_idx, self.limit_eval, rng)
        test_idx = self._subsample(test_idx, self.limit_eval, rng)
        if len(train_idx) == 0:
            raise ValueError(f"{type(self).__name__}: empty training split")
        if int(y_all.min()) < 0 or int(y_all.max()) >= self.num_classes:
            raise ValueError(f"{type(self).__name__}: labels outside [0, {self.num_classes})")

        def inputs(idx: np.ndarray) -> torch.Tensor:
            sel = x_all[torch.from_numpy(idx)].to(torch.float32)
            return sel / arrays.scale if arrays.scale != 1.0 else sel

        self.split_indices = {"train": train_idx, "val": val_idx, "test": test_idx}
        self.train_set = TensorDataset(inputs(train_idx), y_all[train_idx])
        self.val_set = TensorDataset(inputs(val_idx), y_all[val_idx])
        self.test_set = TensorDataset(inputs(test_idx), y_all[test_idx])

    @staticmethod
    def _subsample(idx: np.ndarray, limit: int | None, rng: np.random.Generator) -> np.ndarray:
        if limit is None or limit >= len(idx):
            return idx
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        return np.sort(rng.choice(idx, size=limit, replace=False))

    # -- loaders --------------------------------------------------------------
    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a dataloader")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochSeededSampler(len(dataset), self.seed) if shuffle else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(input_shape={self.input_shape}, num_classes={self.num_classes}, "
            f"batch_size={self.batch_size}, seed={self.seed})"
        )


# ---------------------------------------------------------------------------
# scikit-learn digits (default data set)
# ---------------------------------------------------------------------------
class DigitsDataModule(SplitDataModule):
    """The 1797 8x8 handwritten digits shipped with scikit-learn (``load_digits``).

    Inputs ``(1, 8, 8)`` float32 in [0, 1] (pixel values 0..16 divided by 16), 10 classes. Arguments as in
    :class:`SplitDataModule`.
    """

    input_shape = (1, 8, 8)
    num_classes = 10

    def load(self) -> LoadedArrays:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.from_numpy(np.asarray(digits.images, dtype=np.float32) / 16.0).unsqueeze(1)
        y = torch.from_numpy(np.asarray(digits.target, dtype=np.int64))
        return LoadedArrays(x, y)


# ---------------------------------------------------------------------------
# IDX files (Fashion-MNIST, MNIST)
# ---------------------------------------------------------------------------
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_FASHION_HELP = (
    "Get the Fashion-MNIST IDX files with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; "
    "installs them in /usr/share/datasets/fashion-mnist), or point data_dir at a folder holding "
    "MNIST or Fashion-MNIST IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
    "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each optionally .gz)."
)


def _open_maybe_gz(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _read(path: str, n: int = -1, head: bool = False) -> bytes:
    """The first ``n`` bytes (all with ``-1``) of a plain or gzipped file; a damaged ``.gz`` names the file.

    ``head`` reads the IDX header: its 4th byte tells how many 4-byte dimensions follow.
    """
    try:
        with _open_maybe_gz(path) as f:
            raw = f.read(n)
            if head and len(raw) == 4:
                raw += f.read(4 * raw[3])
            return raw
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path}: truncated or corrupt gzip file ({type(e).__name__}: {e}); download it again, "
                         "or reinstall dataset-fashion-mnist") from None


def _parse_idx_header(head: bytes, path: str) -> tuple[np.dtype, tuple[int, ...]]:
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {head[:4]!r})")
    ndim = head[3]
    if len(head) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", head[4 : 4 + 4 * ndim])
    return _IDX_DTYPES[head[2]], tuple(int(s) for s in shape)


def read_idx_header(path: str) -> tuple[np.dtype, tuple[int, ...]]:
    """Return ``(dtype, shape)`` from the header of an IDX file (``.gz`` or plain) without reading the data."""
    return _parse_idx_header(_read(path, 4, head=True), path)


def read_idx(path: str) -> np.ndarray:
    """Read a whole IDX file (the MNIST / Fashion-MNIST format), gzip-compressed or not."""
    raw = _read(path)
    dtype, shape = _parse_idx_header(raw[: 4 + 4 * raw[3]] if len(raw) >= 4 else raw, path)
    offset = 4 + 4 * len(shape)
    count = int(np.prod(shape)) if shape else 1
    if len(raw) - offset < count * dtype.itemsize:
        raise ValueError(f"{path}: file is truncated ({len(raw) - offset} data bytes for shape {shape})")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=offset)
    return data.reshape(shape).astype(dtype.newbyteorder("="), copy=False)


@functools.lru_cache(maxsize=8)
def _read_idx_by_key(path: str, size: int, mtime_ns: int) -> torch.Tensor:
    return torch.from_numpy(read_idx(path).copy())


def _read_idx_cached(path: str) -> torch.Tensor:
    """``read_idx`` as a tensor, cached per (path, size, mtime): re-creating a datamodule does not re-read the file.

    The cached tensor is shared: callers must not modify it in place.
    """
    st = os.stat(path)
    return _read_idx_by_key(os.path.abspath(path), st.st_size, st.st_mtime_ns)


def find_idx_file(data_dir: str, split: str, kind: str) -> str:
    """Locate ``{split}-{kind}`` in ``data_dir`` (``split`` is ``train``/``t10k``, ``kind`` is ``images``/``labels``).

    Accepts the usual spellings: ``train-images-idx3-ubyte``, ``train-images.idx3-ubyte``, each with or without ``.gz``.
    """
    ndim = 3 if kind == "images" else 1
    for sep in ("-", "."):
        for ext in (".gz", ""):
            path = os.path.join(data_dir, f"{split}-{kind}{sep}idx{ndim}-ubyte{ext}")
            if os.path.isfile(path):
                return path
    raise FileNotFoundError(
        f"No {split}-{kind}-idx{ndim}-ubyte[.gz] file in {data_dir!r}. {_FASHION_HELP}"
    )


class FashionMNISTDataModule(SplitDataModule):
    """Fashion-MNIST (or MNIST) read from its IDX files; nothing is downloaded.

    Inputs ``(1, H, W)`` float32 in [0, 1] (``(1, 28, 28)`` for (Fashion-)MNIST), 10 classes.
    The test split is the official ``t10k`` set; val is a stratified, seeded
    ``val_fraction`` of the 60000 training images.  ``limit_train`` /
    ``limit_eval`` take seeded subsamples for quick runs.

    The files are looked for in ``data_dir`` (default: where Debian's
    ``dataset-fashion-mnist`` package puts them); a missing folder or file
    raises ``FileNotFoundError`` from ``__init__`` saying how to get them.
    """

    DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"

    def __init__(
        self,
        data_dir: str = DEFAULT_DIR,
        batch_size: int = 128,
        seed: int = 0,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        limit_train: int | None = None,
        limit_eval: int | None = None,
    ) -> None:
        super().__init__(batch_size, seed, val_fraction, 0.0, num_workers, limit_train, limit_eval)
        self.save_hyperparameters()
        self.data_dir = os.path.expanduser(str(data_dir))
        if not os.path.isdir(self.data_dir):
            raise FileNotFoundError(f"Fashion-MNIST data directory {self.data_dir!r} does not exist. {_FASHION_HELP}")
        self.files = {
            (split, kind): find_idx_file(self.data_dir, split, kind)
            for split in ("train", "t10k")
            for kind in ("images", "labels")
        }
        _, shape = read_idx_header(self.files[("train", "images")])
        if len(shape) != 3:
            raise ValueError(f"{self.files[('train', 'images')]}: expected (N, H, W) images, got shape {shape}")
        self.input_shape = (1, shape[1], shape[2])
        self.num_classes = 10

    def _read_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        images = _read_idx_cached(self.files[(split, "images")])
        labels = _read_idx_cached(self.files[(split, "labels")])
        if images.ndim != 3 or len(images) != len(labels):
            raise ValueError(f"{split}: images of shape {tuple(images.shape)} and {len(labels)} labels do not match")
        return images.unsqueeze(1), labels.long()

    def load(self) -> LoadedArrays:
        x, y = self._read_split("train")
        x_test, y_test = self._read_split("t10k")
        return LoadedArrays(x, y, x_test, y_test, scale=255.0 if x.dtype == torch.uint8 else 1.0)


# ---------------------------------------------------------------------------
# MNIST-1D (generated locally)
# ---------------------------------------------------------------------------
class MNIST1DDataModule(SplitDataModule):
    """MNIST-1D (Greydanus & Kobak), generated locally with ``mnist1d.data.make_dataset``.

    Never calls ``mnist1d.get_dataset`` (which downloads a pickle).  With the
    defaults (``num_samples=5000``, ``generation_seed=42``) this is the
    canonical MNIST-1D data set; generation takes about 1.3 s for 5000 samples.
    Inputs ``(1, 40)`` float32 (standardised by ``make_dataset``), 10 classes.
    The test split is ``make_dataset``'s own last ``1 - train_split`` part; val
    is a seeded, stratified ``val_fraction`` of the remaining pool.

    Needs the ``mnist1d`` package (``pip install mnist1d``; it depends on
    numpy, scipy, matplotlib and requests, not on torch).
    """

    def __init__(
        self,
        batch_size: int = 128,
        seed: int = 0,
        val_fraction: float = 0.15,
        num_workers: int = 0,
        num_samples: int = 5000,
        train_split: float = 0.8,
        generation_seed: int = 42,
        shuffle_seq: bool = False,
        limit_train: int | None = None,
        limit_eval: int | None = None,
    ) -> None:
        super().__init__(batch_size, seed, val_fraction, 0.0, num_workers, limit_train, limit_eval)
        self.save_hyperparameters()
        if num_samples < 10:
            raise ValueError(f"num_samples must be >= 10 (one per class), got {num_samples}")
        self.num_samples = int(num_samples)
        self.train_split = float(train_split)
        self.generation_seed = int(generation_seed)
        self.shuffle_seq = bool(shuffle_seq)
        self.input_shape = (1, 40)
        self.num_classes = 10

    def load(self) -> LoadedArrays:
        try:
            from mnist1d.data import get_dataset_args, make_dataset
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "MNIST1DDataModule needs the `mnist1d` package: `pip install mnist1d` "
                "(deps: numpy, scipy, matplotlib, requests; it does not pull torch)"
            ) from e
        args = get_dataset_args()
        args.num_samples = self.num_samples
        args.train_split = self.train_split
        args.seed = self.generation_seed
        args.shuffle_seq = self.shuffle_seq
        args.final_seq_length = self.input_shape[-1]
        # make_dataset seeds the global `random` and `np.random` RNGs: keep the caller's state.
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            data = make_dataset(args)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)

        def to_x(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.asarray(a, dtype=np.float32)).unsqueeze(1)

        def to_y(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.asarray(a, dtype=np.int64))

        return LoadedArrays(to_x(data["x"]), to_y(data["y"]), to_x(data["x_test"]), to_y(data["y_test"]))


# ---------------------------------------------------------------------------
# Synthetic Gaussian clusters
# ---------------------------------------------------------------------------
class SyntheticDataModule(SplitDataModule):
    """Seeded isotropic Gaussian clusters (``sklearn.datasets.make_blobs``), one per class.

    Inputs ``(n_features,)`` float32, ``n_classes`` classes; ``seed`` fixes both
    the generated points and the split.  Cluster centres are drawn uniformly in
    ``center_box``.
    """

    def __init__(
        self,
        n_samples: int = 2000,
        n_features: int = 16,
        n_classes: int = 4,
        cluster_std: float = 1.0,
        seed: int = 0,
        batch_size: int = 128,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        num_workers: int = 0,
        center_box: Sequence[float] = (-10.0, 10.0),
        limit_train: int | None = None,
        limit_eval: int | None = None,
    ) -> None:
        super().__init__(batch_size, seed, val_fraction, test_fraction, num_workers, limit_train, limit_eval)
        self.save_hyperparameters()
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        self.n_samples = int(n_samples)
        self.n_features = int(n_features)
        self.cluster_std = float(cluster_std)
        self.center_box = tuple(float(c) for c in center_box)
        self.input_shape = (self.n_features,)
        self.num_classes = int(n_classes)

    def load(self) -> LoadedArrays:
        from sklearn.datasets import make_blobs

        x, y = make_blobs(
            n_samples=self.n_samples,
            n_features=self.n_features,
            centers=self.num_classes,
            cluster_std=self.cluster_std,
            center_box=self.center_box,
            random_state=self.seed,
        )
        return LoadedArrays(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64)))
