"""Datasets as sources of uint8 image batches at `data.image_size`, plus their labels.

Small datasets (Fashion-MNIST, CIFAR-10, synthetic) live in memory as one uint8 tensor, resized
once at load; ImageNet's files are decoded by DataLoader workers (alexlab.data.imagenet, shorter
side to image_size, centre crop, through the same resize_square). Either way
`batches(order, batch_size, start_step)` yields (uint8 images, labels).
"""
from __future__ import annotations

import gzip
import logging
import os
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from alexlab.errors import ConfigError, require_integer

FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


def use_file_system_sharing() -> None:
    """Before DataLoader workers start: with the default file-descriptor strategy, workers handing
    back many tensors ran out of descriptors on the GPU machine ("Bad file descriptor", then a hang).
    Harmless on a CPU."""
    torch.multiprocessing.set_sharing_strategy("file_system")


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor (random draws, labels, kernel arguments) on `device` without making the
    host wait: a copy from pageable memory waits until the stream's earlier work (the previous
    training step) is done; one from pinned memory is queued like a kernel."""
    if torch.device(device).type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def check_data_sizes(data) -> None:
    """The data config's sizes and counts, for training (train.check_config) and for ImageNet's
    preparation (imagenet.check_options, which prepare.py runs without the training check) alike. A
    typo such as train_subset=-5 would otherwise slice off five images and train on the rest."""
    for key in ("image_size", "channels"):
        require_integer(f"data.{key}", data.get(key), 1)
    for key in ("classes", "train_subset", "val_subset", "stats_images"):
        require_integer(f"data.{key}", data.get(key), 1, null_means="all")
    for key, least in (("train_size", 1), ("val_size", 1), ("num_classes", 2)):  # data=synthetic's
        if key in data:
            require_integer(f"data.{key}", data[key], least)
    require_integer("data.workers", data.get("workers", 0), 0)


class BatchSource:
    """What every split offers the trainer: `batches(order, batch_size, start_step)` cuts the
    epoch's order into batches (resuming at `start_step`); subclasses serve `batches_of`."""

    def batches(self, order: torch.Tensor, batch_size: int, start: int = 0) -> Iterator:
        return self.batches_of(order[start * batch_size:].split(batch_size))

    def batches_of(self, index_batches) -> Iterator:
        """(uint8 images, labels) for each tensor of indices."""
        raise NotImplementedError


class SplitOf(BatchSource):
    """Items start .. start + length of a source that holds several splits: with data.decode=gpu_process
    the training and validation splits share one source, so its decoder processes (a CUDA context
    and an nvJPEG each) serve both instead of the validation split's own idling while training runs."""

    def __init__(self, whole: BatchSource, start: int, length: int):
        self.whole, self.start, self.length = whole, start, length
        self.labels = whole.labels[start:start + length]

    def __len__(self) -> int:
        return self.length

    def batches_of(self, index_batches) -> Iterator:
        return self.whole.batches_of([torch.as_tensor(idx) + self.start for idx in index_batches])


class TensorSource(BatchSource):
    """A whole split in memory: images (N, C, S, S) uint8, labels (N,) int64."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device) -> "TensorSource":
        return TensorSource(self.images.to(device), self.labels.to(device))

    def batches_of(self, index_batches) -> Iterator:
        for idx in index_batches:
            idx = to_device(idx, self.images.device)
            yield self.images[idx], self.labels[idx]


def resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, size, size): shorter side to `size`, centre crop (section 2).
    The one resize of every dataset: in-memory splits at load, ImageFolder images one by one."""
    from torchvision.transforms.v2 import functional as TF
    if images.shape[-2:] == (size, size):
        return images
    # Chunks bound the float copy that the antialiased resize makes of a whole split.
    return torch.cat([TF.center_crop(TF.resize(chunk, size, antialias=True), size) for chunk in images.split(4096)])


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): magic 0x0000 0x08 ndim, big-endian dims, uint8 data."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise ConfigError(f"{path} cannot be read ({err}): a damaged or partial download? Fetch it again") from err
    if raw[:2] != b"\x00\x00" or raw[2:3] != b"\x08":
        raise ConfigError(f"{path} is not an IDX uint8 file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ConfigError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {data.size}")
    return data.reshape(dims)


def load_fashion_mnist(cfg) -> tuple[dict, int]:
    root = Path(os.path.expanduser(str(cfg.root)))
    if all((root / f).is_file() for files in FASHION_FILES.values() for f in files):
        arrays = {split: (read_idx(root / img), read_idx(root / lab)) for split, (img, lab) in FASHION_FILES.items()}
        for split, (img, lab) in FASHION_FILES.items():  # a file swapped or cut short would mislabel, or fail later
            images, labels = arrays[split]
            if len(images) != len(labels) or labels.size and labels.max() > 9:
                raise ConfigError(f"{root / img} holds {len(images)} images but {root / lab} {len(labels)} labels "
                                  f"(from 0 to {labels.max() if labels.size else '-'}; Fashion-MNIST has 10 classes): "
                                  "mismatched files? Fetch them again")
    else:
        arrays = _download_torchvision("FashionMNIST", cfg, root,
                                       "apt-get install dataset-fashion-mnist (Debian/Ubuntu), which puts the "
                                       "four .gz files in /usr/share/datasets/fashion-mnist, or set data.root=DIR")
    return {split: (torch.from_numpy(img.copy())[:, None], torch.from_numpy(lab.astype(np.int64)))
            for split, (img, lab) in arrays.items()}, 10


def load_cifar10(cfg) -> tuple[dict, int]:
    root = Path(os.path.expanduser(str(cfg.root)))
    arrays = _download_torchvision("CIFAR10", cfg, root, "a machine with internet, or copy the "
                                   "cifar-10-batches-py folder into data.root")
    return {split: (torch.from_numpy(img.copy()).permute(0, 3, 1, 2).contiguous(),
                    torch.as_tensor(np.asarray(lab), dtype=torch.int64))
            for split, (img, lab) in arrays.items()}, 10


def _download_torchvision(name: str, cfg, root: Path, how: str) -> dict:
    """torchvision's dataset in `root`: read where its files are there (checked by their md5), else
    downloaded when data.download is true."""
    import torchvision
    download = bool(cfg.get("download", True))
    try:
        cls = getattr(torchvision.datasets, name)
        out = {}
        for split, train in (("train", True), ("val", False)):
            ds = cls(str(root), train=train, download=download)
            data = ds.data.numpy() if torch.is_tensor(ds.data) else ds.data
            out[split] = (data, np.asarray(ds.targets))
        return out
    except Exception as err:  # noqa: BLE001 - any failure ends in the one message below
        # torchvision's message is several lines ("Error downloading x.gz:", "Tried ..., got:", the cause)
        said = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        failed = f"download failed: {type(err).__name__}: {said[:300]}" if download else \
            "data.download=false, and torchvision found no complete copy there"
    raise ConfigError(f"no {name} data in {root} ({failed}). To get it: {how}.")


def load_synthetic(cfg) -> tuple[dict, int]:
    """Random images with a faint per-class pattern, so that a model can learn something."""
    gen = torch.Generator().manual_seed(12345)
    c, s, k = int(cfg.channels), int(cfg.image_size), int(cfg.num_classes)
    templates = torch.rand(k, c, s, s, generator=gen)
    out = {}
    for split, n in (("train", int(cfg.train_size)), ("val", int(cfg.val_size))):
        labels = torch.randint(0, k, (n,), generator=gen)
        noise = torch.rand(n, c, s, s, generator=gen)
        out[split] = (((0.3 * templates[labels] + 0.7 * noise) * 255).round().to(torch.uint8), labels)
    return out, k


def subset_positions(count: int, limit, name: str = "") -> torch.Tensor:
    """Sorted positions of a fixed random `limit` of `count` items (seed 0: the same on every
    machine), as data.train_subset / val_subset / stats_images pick; all of them without a limit.
    name: the option, for the warning where it asks for more than there are."""
    if not limit or int(limit) >= count:
        if limit and int(limit) > count and name:
            logging.getLogger("alexlab").warning("data.%s=%s, but there are %d: all %d are used", name, limit, count, count)
        return torch.arange(count)
    return torch.randperm(count, generator=torch.Generator().manual_seed(0))[:int(limit)].sort().values


def _subset(images, labels, n, name):
    idx = subset_positions(len(labels), n, name)
    if len(idx) == len(labels):
        return images, labels
    return images[idx], labels[idx]


def load_in_memory(cfg) -> tuple[TensorSource, TensorSource, int]:
    loaders = {"fashion_mnist": load_fashion_mnist, "cifar10": load_cifar10, "synthetic": load_synthetic}
    splits, num_classes = loaders[cfg.name](cfg)
    size = int(cfg.image_size)
    train = _subset(*splits["train"], cfg.get("train_subset"), "train_subset")
    val = _subset(*splits["val"], cfg.get("val_subset"), "val_subset")
    return (TensorSource(resize_square(train[0], size), train[1]),
            TensorSource(resize_square(val[0], size), val[1]), num_classes)
