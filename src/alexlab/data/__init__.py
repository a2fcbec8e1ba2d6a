"""Data: pick the dataset named by the data config, compute (or load) its pixel statistics,
and hand back the two splits with the augmenter that turns their uint8 batches into model inputs."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alexlab.data.augment import Augmenter, PixelStats, StatsAccumulator
from alexlab.data.datasets import TensorSource, load_in_memory
from alexlab.errors import ConfigError
from alexlab.io import atomic_torch_save

DATASETS = ("fashion_mnist", "cifar10", "synthetic", "imagenet")


@dataclass
class Data:
    train: object
    val: object
    num_classes: int
    augmenter: Augmenter
    stats_path: Path | None
    skipped_files: list = field(default_factory=list)  # [{path, reason}]: unreadable files left out (data.on_bad_file=skip)


def majority_error(split) -> float:
    """The error, in percent, of always guessing a split's most frequent class: chance level where the
    classes are unbalanced (a validation subset), for the report's check of runs that did not learn."""
    counts = torch.bincount(torch.as_tensor(split.labels).flatten().cpu())
    return 100.0 * (1.0 - counts.max().item() / max(1, counts.sum().item()))


def build_data(data_cfg, input_size: int, device: torch.device, cache_dir: str | os.PathLike | None = None) -> Data:
    if data_cfg.name not in DATASETS:
        raise ConfigError(f"data.name must be one of {DATASETS}, got {data_cfg.name!r}")
    if int(data_cfg.image_size) < input_size:
        raise ConfigError(f"data.image_size={data_cfg.image_size} is smaller than the model's input "
                          f"{input_size}: the crops are taken from the image")
    skipped = []
    if data_cfg.name == "imagenet":  # statistics come from the one-time preparation (src/prepare.py)
        from alexlab.data.imagenet import load_imagenet
        train, val, num_classes, stats, stats_path, skipped = load_imagenet(data_cfg, cache_dir, device)
    else:
        train, val, num_classes = load_in_memory(data_cfg)
        stats, stats_path = pixel_stats(data_cfg, train, cache_dir)
    channels = stats.mean_image.shape[0]  # the data's, ImageNet's included
    if channels != data_cfg.channels:  # the model's conv1 is built for data.channels
        raise ConfigError(f"data.channels={data_cfg.channels}, but {data_cfg.name}'s images have {channels} channel(s)")
    mean = data_cfg.get("mean", "image")
    if mean == "channel":  # one mean per colour channel instead of the paper's mean image
        stats = PixelStats(stats.mean_image.mean((1, 2), keepdim=True), stats.eigval, stats.eigvec)
    elif mean != "image":
        raise ConfigError(f"data.mean must be image or channel, got {mean!r}")
    if isinstance(train, TensorSource):
        train, val = train.to(device), val.to(device)
    augmenter = Augmenter(stats.to(device), input_size, crop_flip=bool(data_cfg.crop_flip),
                          pca_lighting=bool(data_cfg.pca_lighting), pca_sigma=float(data_cfg.pca_sigma),
                          pixel_scale=float(data_cfg.pixel_scale))
    return Data(train, val, num_classes, augmenter, stats_path, skipped)


def pixel_stats(data_cfg, train, cache_dir) -> tuple[PixelStats, Path | None]:
    """Mean image and RGB (or grey) covariance PCA of the training split, cached by the training
    pixels themselves (a hash of the uint8 tensor) and the options that pick the images counted:
    a change to the loading or resizing code gives other pixels, so other statistics, never stale
    ones (the cache was once keyed by the options alone, and old statistics were reused)."""
    key_fields = {k: str(data_cfg.get(k)) for k in ("name", "root", "image_size", "train_subset", "stats_images",
                                                     "channels", "train_size", "num_classes")}
    pixels = hashlib.blake2b(train.images.contiguous().numpy().data, digest_size=16).hexdigest()
    key = hashlib.sha1(json.dumps(key_fields | {"pixels": pixels}, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(os.path.expanduser(str(cache_dir))) / f"stats-{data_cfg.name}-{key}.pt" if cache_dir else None
    if path is not None and path.is_file():
        try:
            saved = torch.load(path, weights_only=True)
            return PixelStats(saved["mean_image"], saved["eigval"], saved["eigvec"]), path
        except Exception as err:  # noqa: BLE001 - a cache: a damaged file (a disk filled up, say) is computed again
            logging.getLogger("alexlab").warning("%s is damaged (%s): the statistics are computed again",
                                                 path, type(err).__name__)
    if path is not None:  # said before the statistics are computed, not after
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            problem = None if os.access(path.parent, os.W_OK) else "not writable"
        except OSError as err:
            problem = f"{type(err).__name__}: {err.strerror}"
        if problem:
            raise ConfigError(f"data.cache_dir={cache_dir} cannot hold the pixel statistics ({problem}): name a "
                              "directory this run can write to, or data.cache_dir=null to keep none")
    acc = StatsAccumulator()
    n = len(train)
    limit = data_cfg.get("stats_images")
    order = torch.arange(n) if not limit or limit >= n else \
        torch.randperm(n, generator=torch.Generator().manual_seed(0))[:int(limit)]
    for images, _ in train.batches(order, 1024):
        acc.add(images.cpu())
    stats = acc.result()
    if path is not None:
        atomic_torch_save({"mean_image": stats.mean_image, "eigval": stats.eigval, "eigvec": stats.eigvec,
                           "fields": key_fields}, path)
    return stats, path
