"""Datasets through the tensorflow-datasets API, offline.

``load`` returns a ``tf.data.Dataset`` of ``(image uint8 [H, W, C], label int64)`` from a prepared tfds dataset in
``data_dir`` (default: tfds' own, ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``); nothing is ever downloaded.

Fashion-MNIST prepares itself on first use from the Debian package ``dataset-fashion-mnist`` (the original IDX
files in ``/usr/share/datasets/fashion-mnist``): tfds' own ``fashion_mnist`` builder writes its usual files into
``data_dir``, so plain ``tfds.load("fashion_mnist", data_dir=...)`` works afterwards too. Other datasets (``mnist``,
``cifar10``, ...) load when their prepared files are present in ``data_dir``; otherwise the error says how to get them.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile

import numpy as np

from .compat import tf
from .core import log

__all__ = [
    "FASHION_MNIST_DIR",
    "DataNotFoundError",
    "builder",
    "describe",
    "eval_split",
    "load",
    "load_numpy",
    "pipeline",
    "prepare_fashion_mnist",
    "preprocess",
    "split_size",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# IDX file -> (magic number, number of items) of the original Fashion-MNIST release.
_FASHION_FILES = {
    "train-images-idx3-ubyte.gz": (2051, 60000),
    "train-labels-idx1-ubyte.gz": (2049, 60000),
    "t10k-images-idx3-ubyte.gz": (2051, 10000),
    "t10k-labels-idx1-ubyte.gz": (2049, 10000),
}
INSTALL_FASHION_MNIST = "sudo apt-get install dataset-fashion-mnist"


class DataNotFoundError(FileNotFoundError):
    """The dataset's files are not on this machine (the message says how to install or prepare them)."""


def _tfds():
    import tensorflow_datasets as tfds

    return tfds


def _default_data_dir() -> str:
    return _tfds().core.constants.DATA_DIR


class _LocalFiles:
    """Stands in for tfds' DownloadManager: ``download_and_extract`` maps each URL to an already extracted file."""

    def __init__(self, extracted: dict[str, str]):
        self._extracted = extracted  # original .gz file name -> extracted path

    def download_and_extract(self, urls):
        def local(url: str) -> str:
            name = url.rstrip("/").rsplit("/", 1)[-1]
            if name not in self._extracted:
                raise DataNotFoundError(f"the builder asked for {url!r}, which has no local copy; nothing downloads.")
            return self._extracted[name]

        return tf.nest.map_structure(local, urls)


def _check_idx(path: str, magic: int, count: int) -> None:
    with open(path, "rb") as f:
        header = f.read(8)
    got_magic, got_count = int.from_bytes(header[:4], "big"), int.from_bytes(header[4:8], "big")
    if (got_magic, got_count) != (magic, count):
        raise DataNotFoundError(
            f"{path} is not the expected IDX file (magic {got_magic}, {got_count} items; expected magic {magic}, "
            f"{count} items). Reinstall it: sudo apt-get install --reinstall dataset-fashion-mnist"
        )


def prepare_fashion_mnist(data_dir: str | os.PathLike | None = None, source_dir: str | None = None):
    """Prepare tfds' ``fashion_mnist`` in ``data_dir`` from the IDX files in ``source_dir`` (default
    ``FASHION_MNIST_DIR``); returns the prepared builder.

    A no-op when it is already prepared. Raises :class:`DataNotFoundError` (with the install command) when the
    Debian package's files are missing.
    """
    tfds = _tfds()
    source_dir = source_dir or FASHION_MNIST_DIR
    data_dir = os.fspath(data_dir) if data_dir is not None else _default_data_dir()
    b = tfds.builder("fashion_mnist", data_dir=data_dir)
    if b.is_prepared():
        return b
    missing = [name for name in _FASHION_FILES if not os.path.isfile(os.path.join(source_dir, name))]
    if missing:
        raise DataNotFoundError(
            f"Fashion-MNIST is not prepared in {data_dir} and its source files are missing from {source_dir} "
            f"({', '.join(missing)}). Install them with `{INSTALL_FASHION_MNIST}` (Debian/Ubuntu); nothing is "
            "downloaded from the network."
        )
    log.info(f"preparing tfds fashion_mnist in {data_dir} from {source_dir} (once, about a minute).")
    os.makedirs(data_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".fashion_mnist_src_") as tmp:
        extracted = {}
        for name, (magic, count) in _FASHION_FILES.items():
            out = os.path.join(tmp, name[: -len(".gz")])
            with gzip.open(os.path.join(source_dir, name), "rb") as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
            _check_idx(out, magic, count)
            extracted[name] = out
        split_generators = b._split_generators

        def local_split_generators(dl_manager):
            del dl_manager  # the builder's own manager would download; serve the local files instead
            return split_generators(_LocalFiles(extracted))

        b._split_generators = local_split_generators
        config = tfds.download.DownloadConfig(try_download_gcs=False)
        try:
            b.download_and_prepare(download_dir=os.path.join(tmp, "downloads"), download_config=config)
        except (OSError, ValueError):
            if not b.is_prepared():  # another process may have prepared it at the same time
                raise
        finally:
            del b._split_generators
    return b


def builder(name: str = "fashion_mnist", data_dir: str | os.PathLike | None = None):
    """The tfds builder of ``name`` in ``data_dir`` (Fashion-MNIST prepared from local files if needed)."""
    tfds = _tfds()
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset name must be a tfds name such as 'fashion_mnist', got {name!r}.")
    data_dir = os.fspath(data_dir) if data_dir is not None else _default_data_dir()
    try:
        b = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as exc:
        raise ValueError(
            f"unknown dataset {name!r}: give a tensorflow-datasets name (e.g. fashion_mnist, mnist, cifar10); "
            f"see tfds.list_builders(). ({str(exc).splitlines()[0]})"
        ) from None
    if b.name == "fashion_mnist" and not b.is_prepared() and not _mocked():
        b = prepare_fashion_mnist(data_dir)
    return b


def _mocked() -> bool:
    """True inside ``tfds.testing.mock_data``, where builders serve random examples without files."""
    return _tfds().core.DatasetBuilder.download_and_prepare.__name__ == "mock_download_and_prepare"


def _supervised_keys(b) -> tuple[str, str]:
    keys = b.info.supervised_keys
    if not keys or len(keys) != 2 or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"dataset {b.name!r} has no (image, label) supervised keys; ptq_keras.data loads those only.")
    return keys


def _as_dataset(b, split: str, **kwargs):
    try:
        return b.as_dataset(split=split, as_supervised=True, **kwargs)
    except AssertionError as exc:
        if "could not find data" not in str(exc):
            raise
        raise DataNotFoundError(
            f"dataset {b.name!r} is not prepared in {b.data_dir_root} and this machine does not download. Prepare "
            f"it where the network is reachable (`tfds build {b.name} --data_dir=DIR`, or "
            f"`tfds.builder('{b.name}', data_dir=DIR).download_and_prepare()`), then copy DIR/{b.name} into "
            f"{b.data_dir_root} or pass data_dir=DIR."
            + (f" Fashion-MNIST installs offline: {INSTALL_FASHION_MNIST}." if b.name != "fashion_mnist" else "")
        ) from None
    except (KeyError, ValueError):
        splits = sorted(b.info.splits.keys())
        if splits and str(split).split("[")[0] not in splits:
            raise ValueError(f"dataset {b.name!r} has no split {split!r}; choose one of {splits}.") from None
        raise


def describe(name: str = "fashion_mnist", data_dir: str | os.PathLike | None = None) -> tuple[tuple, int]:
    """``(image shape (H, W, C), number of classes)`` of a tfds image classification dataset."""
    b = builder(name, data_dir)
    image_key, label_key = _supervised_keys(b)
    return tuple(b.info.features[image_key].shape), int(b.info.features[label_key].num_classes)


def load(
    name: str = "fashion_mnist",
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    batch_size: int | None = None,
    shuffle: bool = False,
    *,
    seed: int | None = None,
    limit: int | None = None,
    shuffle_buffer: int = 10_000,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """A ``tf.data.Dataset`` of ``(image uint8 [H, W, C], label int64)`` pairs of ``split`` (any tfds split spec).

    ``limit`` keeps the first ``limit`` examples; ``shuffle`` shuffles them (with ``seed``, the order of each
    epoch is reproducible); ``batch_size`` batches. Never downloads: missing data raises
    :class:`DataNotFoundError` with the command that installs or prepares it.
    """
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}.")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}.")
    tfds = _tfds()
    b = builder(name, data_dir)
    _supervised_keys(b)
    read_config = tfds.ReadConfig(shuffle_seed=seed) if shuffle and seed is not None else None
    ds = _as_dataset(b, split, shuffle_files=shuffle, read_config=read_config)
    if limit is not None:
        ds = ds.take(limit)
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if batch_size is not None:
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.prefetch(tf.data.AUTOTUNE)


def split_size(name: str, split: str, data_dir: str | os.PathLike | None = None) -> int | None:
    """Number of examples of ``split`` (a plain split name); None where the metadata does not say (mock data)."""
    b = builder(name, data_dir)
    splits = b.info.splits
    if not splits:
        return None
    if split not in splits:
        raise ValueError(f"dataset {b.name!r} has no split {split!r}; choose one of {sorted(splits.keys())}.")
    return int(splits[split].num_examples)


def eval_split(name: str, data_dir: str | os.PathLike | None = None) -> str:
    """The split to evaluate on: ``test`` where the dataset has one, else ``validation`` (ImageNet)."""
    splits = builder(name, data_dir).info.splits
    if not splits:  # no metadata (tfds.testing.mock_data serves any split name)
        return "validation" if name.startswith("imagenet") else "test"
    for split in ("test", "validation"):
        if split in splits:
            return split
    raise ValueError(f"dataset {name!r} has neither a 'test' nor a 'validation' split; it has {sorted(splits)}.")


def preprocess(image: tf.Tensor, training: bool, size: int, seed=None) -> tf.Tensor:
    """The standard ImageNet preprocessing to ``size`` x ``size``, as float32 in [0, 1].

    Training: a random crop of 8%-100% of the area with aspect ratio 3/4-4/3 (Inception-style "random resized
    crop"), resized to ``size`` (bilinear), and a random horizontal flip. Evaluation: the shorter side resized to
    ``size * 256 / 224`` and the central ``size`` x ``size`` crop.
    """
    image = tf.convert_to_tensor(image)
    if training:
        begin, extent, _ = tf.image.sample_distorted_bounding_box(
            tf.shape(image), bounding_boxes=tf.zeros((1, 0, 4)), min_object_covered=0.0,
            aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
            use_image_if_no_bounding_boxes=True, seed=seed,
        )  # fmt: skip
        image = tf.slice(image, begin, extent)
        image = tf.image.resize(image, (size, size), method="bilinear")
        image = tf.image.random_flip_left_right(image, seed=seed)
    else:
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        scale = (size * 256.0 / 224.0) / tf.reduce_min(shape)
        image = tf.image.resize(image, tf.cast(tf.round(shape * scale), tf.int32), method="bilinear")
        image = tf.image.resize_with_crop_or_pad(image, size, size)
    return tf.cast(image, tf.float32) / 255.0


def pipeline(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    batch_size: int,
    training: bool,
    size: int,
    seed: int | None = None,
    limit: int | None = None,
) -> tf.data.Dataset:
    """Batches of ``(float32 [B, size, size, C] in [0, 1], label)`` streamed from tfds with :func:`preprocess`
    (random resized crop and flip when ``training``, resize and central crop otherwise): decoded and preprocessed
    in parallel and prefetched, so several accelerators are kept fed; ``training`` also shuffles (reproducibly
    with ``seed``). For datasets too large for :func:`load_numpy`, such as ``imagenet2012``."""
    ds = load(name, split, data_dir, shuffle=training, seed=seed, limit=limit)
    ds = ds.map(lambda x, y: (preprocess(x, training, size), y), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=seed is not None or not training)  # fmt: skip
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def load_numpy(
    name: str = "fashion_mnist",
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    *,
    limit: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(x uint8 [N, H, W, C], y int64 [N])`` of a whole split (or its first ``limit`` examples), in file order."""
    xs, ys = [], []
    for x, y in load(name, split, data_dir, batch_size=4096, limit=limit).as_numpy_iterator():
        xs.append(x)
        ys.append(y)
    if not xs:
        raise ValueError(f"split {split!r} of dataset {name!r} is empty.")
    return np.concatenate(xs).astype(np.uint8), np.concatenate(ys).astype(np.int64)
