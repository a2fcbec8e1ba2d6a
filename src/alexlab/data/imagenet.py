"""ImageNet (ILSVRC-2012) from the files people actually have: layouts, decoding, the bad-file
policy, and the one-time preparation (file index + the training set's pixel statistics).

Layouts under `data.root`:
    train/<wnid>/*.JPEG                     always (the official train tar, unpacked per class)
    val/<wnid>/*.JPEG                       ImageFolder validation, or
    val/ILSVRC2012_val_00000001.JPEG ...    the official flat validation set, labelled by
        LOC_val_solution.csv (Kaggle; looked for in root and up to 3 folders above it), or the
        devkit (ILSVRC2012_devkit_t12/data/: ILSVRC2012_validation_ground_truth.txt + meta.mat),
        or `data.val_labels=PATH` (the CSV or the devkit folder).
Class indices follow the sorted wnids of train/ (torchvision's ImageFolder order, which its
weights use). `data.classes=N` keeps N classes evenly spaced in that order: positions
floor(i * K / N), i = 0..N-1, of the K sorted wnids (1000 -> 100 keeps every 10th wnid), relabelled
0..N-1. No randomness, so every machine picks the same subset.

Preparation (`python src/prepare.py data.root=DIR`) decodes every file once, fully, and writes
into `<root>/.alexlab/` (or, where root is read-only, `<data.cache_dir>/imagenet-<hash of root>/`):
    index.pt            paths, labels, sizes of train and val, the unreadable files, the odd files
    stats-*.pt          mean image (3, S, S) and RGB covariance eigenpairs of the training images
                        at data.image_size, for the chosen classes
    prepare-*.partial   running position and partial sums, so an interrupted run continues
    jpeg-256px-q95/     with data.resized_jpegs=true: each training and validation image as the
                        network sees it before augmentation (shorter side to data.image_size, centre
                        crop), re-encoded as a baseline JPEG of quality data.resized_quality, under
                        its path relative to root. Training then reads these instead of the
                        originals: about a third of the bytes and of the pixels to decode. The
                        paper's authors stored their 256x256 images the same way.
Training never scans: it loads these, and stops at once with the command to run when they are missing.

Decoding (`read_rgb`) is by content, not extension (ImageNet has a PNG named .JPEG), fully (a
truncated file raises; PIL's LOAD_TRUNCATED_IMAGES is forced off), to RGB (greyscale replicated,
CMYK converted by PIL), and does NOT apply EXIF orientation, as PIL's open and torchvision's
ImageFolder do not: the same pixels the torchvision weights were trained on.
"""
from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from alexlab.data.augment import PixelStats, StatsAccumulator
from alexlab.data.datasets import (IMAGE_EXTENSIONS, BatchSource, SplitOf, check_data_sizes, resize_square,
                                   subset_positions, use_file_system_sharing)
from alexlab.errors import ConfigError, require_integer, require_number
from alexlab.io import atomic_torch_save, atomic_write_bytes

log = logging.getLogger("alexlab")
INDEX_NAME = "index.pt"
INDEX_VERSION = 1
EXIF_ORIENTATION = 0x0112
CHECKPOINT_EVERY = 5000  # files between two partial-progress saves (about a minute of scanning)
SCAN_BATCH = 32          # files per worker task during the scan


# ---------------------------------------------------------------- decoding

ZERO_TAIL = 1024  # zero bytes ending a JPEG with no end marker before them: an interrupted or sparse copy


def read_rgb(path) -> tuple[np.ndarray, list[str]]:
    """The whole file as RGB uint8 (H, W, 3), plus what was odd about it (see the module doc). `path`: a
    file's path, or a file object (BytesIO) of its bytes."""
    from PIL import Image, ImageFile
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # some library turned it on: truncated files would pass, grey-filled
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        log.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES was on; turned it off so truncated files are errors")
    notes = []
    data = path.getvalue() if isinstance(path, io.BytesIO) else Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.format == "JPEG":  # libjpeg decodes zeros as image data with a warning only, which PIL drops
            kept = data.rstrip(b"\0")
            if len(data) - len(kept) >= ZERO_TAIL and not kept.endswith(b"\xff\xd9"):
                raise OSError(f"image file is truncated: its last {len(data) - len(kept)} bytes are zeros, with no "
                              "JPEG end marker before them (an interrupted or sparse copy)")
        if im.format != "JPEG":
            notes.append(f"format_{im.format}")
        if im.info.get("progressive") or im.info.get("progression"):
            notes.append("progressive")
        if im.mode in ("1", "L", "LA", "I", "I;16", "F"):
            notes.append("greyscale")
        elif im.mode == "CMYK":
            notes.append("cmyk")
        if im.getexif().get(EXIF_ORIENTATION, 1) != 1:
            notes.append("exif_orientation_not_applied")
        rgb = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    return rgb, notes


def to_chw(rgb: np.ndarray) -> torch.Tensor:
    """read_rgb's (H, W, 3) array as a uint8 (3, H, W) tensor."""
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def square(rgb: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (3, size, size): shorter side to `size` (up or down), centre crop. The one conversion
    of training images (CPU decoding) and of the images the statistics are computed from."""
    return resize_square(to_chw(rgb)[None], size)[0]


def load_image(path, size: int) -> torch.Tensor:
    """A file as uint8 (3, size, size): decoded, squared."""
    rgb, _ = read_rgb(path)
    return square(rgb, size)


def decode_bytes(data: torch.Tensor) -> torch.Tensor:
    """A file's bytes (uint8 1-D tensor) -> uint8 (3, H, W), exactly as read_rgb decodes files: the
    GPU pipeline's decoder for the files nvJPEG is not given (see GPU_DECODER_SKIPS)."""
    rgb, _ = read_rgb(io.BytesIO(data.numpy().tobytes()))
    return to_chw(rgb)


# Odd files (index notes) that data.decode=gpu hands to the CPU decoder: nvJPEG's colour conversion
# of CMYK and greyscale, and its support of progressive files, are not PIL's.
GPU_DECODER_SKIPS = ("cmyk", "greyscale", "progressive")


def resolve_decode(cfg, device: torch.device) -> str:
    """data.decode: auto -> gpu when training on CUDA with Triton installed, else cpu. gpu_process:
    as gpu, with the decoding in data.decode_processes child processes (alexlab.data.gpu_decode.DecoderProcess)."""
    decode = cfg.get("decode", "auto")
    if decode not in ("auto", "cpu", "gpu", "gpu_process"):
        raise ConfigError(f"data.decode must be auto, cpu, gpu or gpu_process, got {decode!r}")
    try:
        import triton  # noqa: F401
        has_triton = True
    except ImportError:
        has_triton = False
    if decode == "auto":
        return "gpu" if device.type == "cuda" and has_triton else "cpu"
    if decode != "cpu" and not has_triton:
        raise ConfigError(f"data.decode={decode} needs Triton (it comes with PyTorch's CUDA wheels); use data.decode=cpu")
    if decode != "cpu" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"data.decode={decode} needs a CUDA device (training runs on {device}); use data.decode=cpu")
    return decode


class ImageFolderSource(torch.utils.data.Dataset, BatchSource):
    """A list of (path, label) decoded by DataLoader workers into uint8 (3, size, size).

    Workers only decode and resize; the order and every random draw are made in the main process,
    so any `workers` value yields the same batches, bit for bit."""

    def __init__(self, samples: list[tuple[str, int]], size: int, workers: int, classes: list[str]):
        self.samples, self.size, self.workers, self.classes = samples, size, workers, classes

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([label for _, label in self.samples], dtype=torch.int64)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            image = load_image(path, self.size)
        except Exception as err:  # it decoded at preparation: say which file changed since
            raise OSError(f"{path}: {type(err).__name__}: {err} (it decoded when the dataset was prepared; "
                          f"has the file changed since?)") from err
        return image, label

    def batches_of(self, index_batches) -> Iterator:
        if self.workers:
            use_file_system_sharing()
        loader = torch.utils.data.DataLoader(self, batch_sampler=[b.tolist() for b in index_batches],
                                             num_workers=self.workers, pin_memory=torch.cuda.is_available())
        yield from loader


# ---------------------------------------------------------------- layouts

def _images_in(folder: Path) -> list[Path]:
    """Image files by name; not hidden ones (macOS leaves a `._name.JPEG` of metadata beside every file it
    copies: each read as an unreadable image, and in a flat val/ as a file with no label)."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def check_index_current(index: dict, root: Path, out: Path, cfg) -> None:
    """The training class folders the index was made from are still those under root/train (one listing
    of a thousand names): a dataset prepared while half extracted, or another one mounted at the same
    path, would otherwise train on the old index without a word."""
    train_dir = root / "train"
    if not train_dir.is_dir():
        return  # data.resized_jpegs with the originals moved away: the index is all there is
    now = [d.name for d in _class_dirs(train_dir)]
    if now != list(index["classes"]):
        gone, new = sorted(set(index["classes"]) - set(now)), sorted(set(now) - set(index["classes"]))
        raise ConfigError(f"{train_dir} has changed since {out / INDEX_NAME} was made ({len(index['classes'])} "
                          f"class folders then, {len(now)} now; new: {new[:3]}{' ...' if len(new) > 3 else ''}, "
                          f"gone: {gone[:3]}{' ...' if len(gone) > 3 else ''}): delete {out} and run "
                          f"`{prepare_command(cfg)}` to index it again")


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def find_val_labels(root: Path, given) -> tuple[str, dict[str, str]]:
    """(how, {file stem: wnid}) for the flat validation layout."""
    candidates = [Path(os.path.expanduser(str(given)))] if given else \
        [d / "LOC_val_solution.csv" for d in (root, *list(root.parents)[:3])] + [root / "ILSVRC2012_devkit_t12"]
    if given and not candidates[0].exists():
        raise ConfigError(f"data.val_labels={given}: no such file or folder (LOC_val_solution.csv or the unpacked "
                          "ILSVRC2012_devkit_t12/)")
    for path in candidates:
        if path.is_file() and path.suffix == ".csv":
            return f"csv {path}", read_loc_csv(path)
        if path.is_dir() and (path / "data" / "meta.mat").is_file():
            return f"devkit {path}", read_devkit(path)
    raise ConfigError(
        f"{root / 'val'} holds the flat official validation files but no labels were found: put "
        f"LOC_val_solution.csv (Kaggle) or the unpacked ILSVRC2012_devkit_t12/ in {root}, or set "
        f"data.val_labels=PATH (either of them), or sort val/ into val/<wnid>/ folders")


def read_loc_csv(path: Path) -> dict[str, str]:
    """Kaggle's LOC_val_solution.csv: ImageId,PredictionString; the first token is the wnid."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "ImageId" not in rows[0] or "PredictionString" not in rows[0]:
        raise ConfigError(f"{path}: expected the columns ImageId,PredictionString")
    labels = {}
    for line, row in enumerate(rows, 2):  # line 1 is the header
        tokens = (row.get("PredictionString") or "").split()
        if not tokens:
            raise ConfigError(f"{path}, line {line}: {row.get('ImageId')!r} has an empty PredictionString "
                              "(its first word is the label's wnid)")
        labels[row["ImageId"]] = tokens[0]
    return labels


def read_devkit(devkit: Path) -> dict[str, str]:
    """ILSVRC2012_devkit_t12: line i of the ground truth is the 1-based ILSVRC2012_ID of
    ILSVRC2012_val_{i:08d}; meta.mat maps the IDs of its 1000 leaf synsets to wnids (as
    torchvision's parse_devkit_archive reads it)."""
    try:
        from scipy.io import loadmat
    except ImportError as err:
        raise ConfigError("reading the devkit's meta.mat needs scipy (pip install scipy), or use "
                          "LOC_val_solution.csv via data.val_labels") from err
    synsets = loadmat(str(devkit / "data" / "meta.mat"), squeeze_me=True)["synsets"]
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    truth = devkit / "data" / "ILSVRC2012_validation_ground_truth.txt"
    if not truth.is_file():
        raise ConfigError(f"{truth} is missing from the devkit")
    ids = [int(line) for line in truth.read_text().split()]
    return {f"ILSVRC2012_val_{i:08d}": id_to_wnid[k] for i, k in enumerate(ids, 1)}


def list_files(root: Path, val_labels=None) -> dict:
    """Every image file of both splits with its wnid index, in a fixed order (class, then name)."""
    train_dir, val_dir = root / "train", root / "val"
    for d in (train_dir, val_dir):
        if not d.is_dir():
            raise ConfigError(f"no {d}: expected {root}/train/<wnid>/*.JPEG and {root}/val/ (see README, ImageNet)")
    class_dirs = _class_dirs(train_dir)
    if not class_dirs:
        raise ConfigError(f"no class folders in {train_dir} (expected {train_dir}/<wnid>/*.JPEG)")
    images = {d.name: _images_in(d) for d in class_dirs}
    empty = [name for name, files in images.items() if not files]
    if empty:  # it would be a class no image has, and every later class's label one more
        raise ConfigError(f"{len(empty)} class folder(s) in {train_dir} hold no images: {empty[:5]}"
                          f"{' ...' if len(empty) > 5 else ''}; remove them or put their images in")
    classes = list(images)
    index_of = {c: i for i, c in enumerate(classes)}
    train = [(str(p.relative_to(root)), index_of[name]) for name, files in images.items() for p in files]
    flat = _images_in(val_dir)
    if flat:
        how, labels = find_val_labels(root, val_labels)
        val = [(str(p.relative_to(root)), c) for p, c in zip(flat, flat_val_labels(flat, labels, how, index_of))]
    else:
        how = "folders"
        val_pairs = [(p, d.name) for d in _class_dirs(val_dir) for p in _images_in(d)]
        _check_known(sorted({w for _, w in val_pairs}), index_of, "folders")
        val = [(str(p.relative_to(root)), index_of[w]) for p, w in val_pairs]
    if not val:
        raise ConfigError(f"no images found under {val_dir}")
    return {"classes": classes, "val_layout": how, "train": train, "val": val}


def flat_val_labels(files: list[Path], labels: dict[str, str], how: str, index_of: dict[str, int]) -> list[int]:
    """The class index of each flat validation file, by its stem in `labels` (a csv's or the devkit's)."""
    unlabelled = [p.name for p in files if p.stem not in labels]
    if unlabelled:
        raise ConfigError(f"{len(unlabelled)} validation files have no label in {how} (first: {unlabelled[0]})")
    _check_known(sorted({labels[p.stem] for p in files}), index_of, how)
    return [index_of[labels[p.stem]] for p in files]


def _check_known(wnids: list[str], index_of: dict[str, int], how: str) -> None:
    unknown = [w for w in wnids if w not in index_of]
    if unknown:
        raise ConfigError(f"validation classes ({how}) with no folder in train/: {unknown[:5]}"
                          f"{' ...' if len(unknown) > 5 else ''}")


def reread_val_labels(index: dict, root: Path, given) -> None:
    """With data.val_labels set and flat validation files, their labels come from that file at each
    load (cheap: no image is read), not from the preparation: a corrected file takes effect at once,
    where the index once kept the labels it was prepared with."""
    if not given or index["val_layout"] == "folders":
        return
    how, labels = find_val_labels(root, given)
    files = [Path(p) for p in index["val"]["paths"]]
    new = torch.tensor(flat_val_labels(files, labels, how, {c: i for i, c in enumerate(index["classes"])}),
                       dtype=torch.int64)
    changed = int((new != index["val"]["labels"]).sum())
    if changed:
        log.info("validation labels read from %s: %d of %d differ from those at preparation (%s)",
                 how, changed, len(new), index["val_layout"])
    index["val"]["labels"], index["val_layout"] = new, how


def pick_classes(num_classes: int, wanted) -> list[int]:
    """The class subset: `wanted` of `num_classes` sorted wnids at positions floor(i * K / N)."""
    if wanted is None:
        return list(range(num_classes))
    wanted = int(wanted)
    if not 1 <= wanted <= num_classes:
        raise ConfigError(f"data.classes={wanted}: must be between 1 and the {num_classes} classes found")
    return [i * num_classes // wanted for i in range(wanted)]


# ---------------------------------------------------------------- where prepared files live

def _root(cfg) -> Path:
    from omegaconf import OmegaConf
    if OmegaConf.is_missing(cfg, "root") or cfg.root in (None, "", "none"):
        raise ConfigError("data.root is not set: data.root=/path/to/imagenet")
    return Path(os.path.expanduser(str(cfg.root))).resolve()


DEFAULT_CACHE_DIR = "~/.cache/alexlab"


def prepared_dirs(cfg, cache_dir) -> list[Path]:
    """Where the prepared files may be, in the order looked at: data.prepared_dir if set, else
    <root>/.alexlab, then <cache_dir>/imagenet-<hash of the resolved root>."""
    root = _root(cfg)
    if cfg.get("prepared_dir"):
        return [Path(os.path.expanduser(str(cfg.prepared_dir)))]
    cache = Path(os.path.expanduser(str(cache_dir or DEFAULT_CACHE_DIR)))
    return [root / ".alexlab", cache / f"imagenet-{hashlib.sha1(str(root).encode()).hexdigest()[:12]}"]


def stats_name(cfg) -> str:
    classes = cfg.get("classes") or "all"
    n = cfg.get("stats_images") or "all"
    return f"stats-{int(cfg.image_size)}px-classes{classes}-images{n}.pt"


def prepare_command(cfg) -> str:
    parts = ["python src/prepare.py", f"data.root={cfg.root}"]
    parts += [f"data.{k}={cfg.get(k)}" for k in ("image_size", "classes", "stats_images", "prepared_dir", "val_labels")
              if cfg.get(k) is not None and not (k == "image_size" and int(cfg.get(k)) == 256)]
    if cfg.get("cache_dir") and str(cfg.cache_dir) != DEFAULT_CACHE_DIR:  # where the prepared files may be
        parts.append(f"data.cache_dir={cfg.cache_dir}")
    if cfg.get("on_bad_file") == "skip":  # else it would stop at the unreadable files again
        parts.append("data.on_bad_file=skip")
    if cfg.get("resized_jpegs"):
        parts.append("data.resized_jpegs=true")
        if int(cfg.resized_quality) != 95:
            parts.append(f"data.resized_quality={cfg.resized_quality}")
    return " ".join(parts)


# ---------------------------------------------------------------- the scan

class _ScanBatch(torch.utils.data.Dataset):
    """For the scan, item b = the files of batch b, decoded fully in a worker: their sizes, notes
    and errors, and the partial statistics sums of those that feed the statistics. Summing in the
    workers keeps the main process from being the bottleneck; adding the partial sums in batch
    order keeps the result the same for every worker count. With `copies` (folder, quality, mask),
    the resized copy of each masked file is written too, from the same decoding."""

    def __init__(self, root: Path, paths: list[str], resize: list[bool], size: int, batches: list[list[int]],
                 copies: tuple[Path, int, list[bool]] | None = None):
        self.root, self.paths, self.resize, self.size, self.batches = root, paths, resize, size, batches
        self.copies = copies

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, b):
        records, images = [], []
        for i in self.batches[b]:
            try:
                rgb, notes = read_rgb(self.root / self.paths[i])
            except Exception as err:  # noqa: BLE001 - any failure to decode is a bad file, named later
                records.append((i, (0, 0), [], f"{type(err).__name__}: {err}"))
                continue
            records.append((i, (rgb.shape[1], rgb.shape[0]), notes, None))
            copy = self.copies and self.copies[2][i] and not (self.copies[0] / self.paths[i]).is_file()
            if self.resize[i] or copy:
                image = square(rgb, self.size)
                if self.resize[i]:
                    images.append(image)
                if copy:
                    write_jpeg(image, self.copies[0] / self.paths[i], self.copies[1])
        acc = StatsAccumulator()
        if images:
            acc.add(torch.stack(images))
        return records, dict(vars(acc))


def _add_sums(acc: StatsAccumulator, part: dict) -> None:
    if not part["count"]:
        return
    if acc.image_sum is None:
        acc.__dict__.update({k: v.clone() if torch.is_tensor(v) else v for k, v in part.items()})
        return
    for key in ("count", "image_sum", "pixel_sum", "pixel_outer", "pixels"):
        setattr(acc, key, getattr(acc, key) + part[key])


def _first(x):
    return x


def scan(root: Path, paths: list[str], resize: list[bool], size: int, workers: int, partial: Path,
         desc: str, copies: tuple[Path, int, list[bool]] | None = None) -> dict:
    """Decode every file once, in batches of SCAN_BATCH; accumulate the statistics of those marked
    `resize`. Progress goes to `partial` every CHECKPOINT_EVERY files; a later call with the same
    file list continues from there (the same batches, summed in the same order: the same result)."""
    from tqdm import tqdm
    key = hashlib.sha1("\n".join(paths).encode() + bytes(resize) + str(size).encode()).hexdigest()
    state = {"key": key, "done": 0, "sizes": torch.zeros(len(paths), 2, dtype=torch.int32),
             "bad": {}, "notes": {}, "acc": {}}
    if partial.is_file():
        saved = torch.load(partial, weights_only=True)
        if saved.get("key") == key:
            state = saved
            log.info("continuing an interrupted scan: %d of %d files were done", state["done"], len(paths))
    acc = StatsAccumulator()
    acc.__dict__.update(state["acc"])
    if workers:
        use_file_system_sharing()
    batches = [list(range(i, min(i + SCAN_BATCH, len(paths)))) for i in range(state["done"], len(paths), SCAN_BATCH)]
    loader = torch.utils.data.DataLoader(_ScanBatch(root, paths, resize, size, batches, copies), batch_size=None,
                                         num_workers=workers, collate_fn=_first)
    last_saved = state["done"]
    with tqdm(total=len(paths), initial=state["done"], desc=desc, unit="img", mininterval=2) as bar:
        for records, sums in loader:
            _add_sums(acc, sums)
            for i, wh, notes, error in records:
                state["sizes"][i] = torch.tensor(wh)
                if error:
                    state["bad"][paths[i]] = error
                for note in notes:
                    state["notes"].setdefault(note, []).append(paths[i])
            state["done"] = records[-1][0] + 1
            bar.update(len(records))
            if state["done"] - last_saved >= CHECKPOINT_EVERY and state["done"] < len(paths):
                state["acc"] = dict(vars(acc))
                atomic_torch_save(state, partial)
                last_saved = state["done"]
    state["acc"] = dict(vars(acc))
    state["accumulator"] = acc
    return state


def stats_selection(paths: list[str], labels: list[int], bad: dict, classes: list[int], limit) -> list[bool]:
    """Which training files feed the statistics: the chosen classes; with data.stats_images, a fixed
    random subset of those (seed 0); never a bad file."""
    chosen = set(classes)
    candidates = [i for i, label in enumerate(labels) if label in chosen]
    candidates = [candidates[int(k)] for k in subset_positions(len(candidates), limit)]
    mask = [False] * len(paths)
    for i in candidates:
        mask[i] = paths[i] not in bad
    return mask


def prepare(cfg, cache_dir=None) -> Path:
    """Index the dataset and compute the statistics for this config, unless already there.
    Returns the prepared folder. Raises ConfigError for unreadable files unless data.on_bad_file=skip."""
    root = _root(cfg)
    check_options(cfg)
    size, workers = int(cfg.image_size), int(cfg.workers)
    existing = find_prepared(cfg, cache_dir)
    out = existing or _writable_dir(cfg, cache_dir)
    more = existing is not None and (not (existing / stats_name(cfg)).is_file()
                                     or (cfg.get("resized_jpegs") and not resized_dir(existing, cfg).is_dir()))
    if more and not _writable(existing):  # prepared by someone else, read-only: what is new goes to the cache
        out = _writable_dir(cfg, cache_dir)
        if out != existing:
            log.info("%s is not writable: its index is copied to %s, and what this config adds goes there", existing, out)
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes((existing / INDEX_NAME).read_bytes(), out / INDEX_NAME)  # as it is: read below
            existing = out
    out.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    index = torch.load(out / INDEX_NAME, weights_only=True) if existing else None
    if index is not None:
        check_index_current(index, root, out, cfg)
    if index is None:
        files = list_files(root, cfg.get("val_labels"))
        log.info("preparing %s (%d classes, %d training and %d validation files, validation labels: %s) into %s",
                 root, len(files["classes"]), len(files["train"]), len(files["val"]), files["val_layout"], out)
        train_paths, train_labels = [p for p, _ in files["train"]], [c for _, c in files["train"]]
        paths = train_paths + [p for p, _ in files["val"]]
        picked = pick_classes(len(files["classes"]), cfg.get("classes"))
        resize = stats_selection(train_paths, train_labels, {}, picked, cfg.get("stats_images")) + [False] * len(files["val"])
        copies = None
        if cfg.get("resized_jpegs"):  # written from the scan's decoding: each file is decoded once
            chosen = set(picked)
            copies = (resized_dir(out, cfg), int(cfg.resized_quality),
                      [label in chosen for _, label in files["train"] + files["val"]])
        state = scan(root, paths, resize, size, workers, out / "prepare-index.partial", "scanning", copies)
        index = _make_index(root, files, state, time.perf_counter() - tic)
        atomic_torch_save(index, out / INDEX_NAME)
        (out / "prepare-index.partial").unlink(missing_ok=True)
        _save_stats(out / stats_name(cfg), state["accumulator"], cfg)
        log.info("wrote %s and %s in %.1f s (%.1f ms per file)", out / INDEX_NAME, stats_name(cfg),
                 index["prepare_s"], 1000 * index["prepare_s"] / len(paths))
    elif not (out / stats_name(cfg)).is_file():
        train = index["train"]
        picked = pick_classes(len(index["classes"]), cfg.get("classes"))
        mask = stats_selection(train["paths"], train["labels"].tolist(), index["bad"], picked, cfg.get("stats_images"))
        chosen = [p for p, m in zip(train["paths"], mask) if m]
        log.info("computing pixel statistics at %d px from %d training images (%s)", size, len(chosen), stats_name(cfg))
        partial = out / (stats_name(cfg) + ".partial")
        state = scan(root, chosen, [True] * len(chosen), size, workers, partial, "statistics")
        if state["bad"]:
            raise ConfigError(f"files that decoded at preparation no longer do: {_listing(state['bad'])}")
        _save_stats(out / stats_name(cfg), state["accumulator"], cfg)
        partial.unlink(missing_ok=True)
    else:
        log.info("%s is already prepared for this configuration (%s)%s", root, out,
                 "" if cfg.get("resized_jpegs") else "; nothing to do")
    log.info(summary(index, size))
    check_bad_files(index, cfg)
    if cfg.get("resized_jpegs"):
        write_resized_copies(cfg, index, root, resized_dir(out, cfg), workers)
    return out


def _writable(folder: Path) -> bool:
    """Whether a file can be made in `folder`: tried, since os.access says yes to root on a read-only mount."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _writable_dir(cfg, cache_dir) -> Path:
    first, *rest = prepared_dirs(cfg, cache_dir)
    try:
        first.mkdir(parents=True, exist_ok=True)
        if _writable(first):
            return first
    except OSError:
        pass
    if not rest:
        raise ConfigError(f"cannot write to data.prepared_dir={first}")
    log.info("%s is not writable; the prepared files go to %s", first, rest[0])
    return rest[0]


def find_prepared(cfg, cache_dir) -> Path | None:
    """The first prepared folder (one with an index) that holds this config's statistics (and resized
    copies, where asked for); else the first with an index; None where there is none. (A read-only root
    prepared in place gets the statistics of another image size in the cache folder.)"""
    found = [d for d in prepared_dirs(cfg, cache_dir) if (d / INDEX_NAME).is_file()]
    complete = [d for d in found if (d / stats_name(cfg)).is_file()
                and (not cfg.get("resized_jpegs") or resized_dir(d, cfg).is_dir())]
    return (complete or found or [None])[0]


def _make_index(root: Path, files: dict, state: dict, seconds: float) -> dict:
    n_train = len(files["train"])
    index = {"version": INDEX_VERSION, "root": str(root), "classes": files["classes"],
             "val_layout": files["val_layout"], "bad": state["bad"], "notes": state["notes"], "prepare_s": seconds}
    for split, lo, hi in (("train", 0, n_train), ("val", n_train, n_train + len(files["val"]))):
        index[split] = {"paths": [p for p, _ in files[split]],
                        "labels": torch.tensor([c for _, c in files[split]], dtype=torch.int64),
                        "sizes": state["sizes"][lo:hi].clone()}
    return index


def _save_stats(path: Path, acc: StatsAccumulator, cfg) -> None:
    stats = acc.result()
    atomic_torch_save({"mean_image": stats.mean_image, "eigval": stats.eigval, "eigvec": stats.eigvec,
                       "images": acc.count, "image_size": int(cfg.image_size), "classes": cfg.get("classes"),
                       "stats_images": cfg.get("stats_images")}, path)


def summary(index: dict, size: int) -> str:
    """One line per kind of odd file, so nothing about the dataset changes unseen."""
    lines = [f"{len(index['train']['paths'])} training, {len(index['val']['paths'])} validation files, "
             f"{len(index['classes'])} classes; unreadable: {len(index['bad'])}"]
    for kind, paths in sorted(index["notes"].items()):
        lines.append(f"  {kind}: {len(paths)} (first: {paths[0]})")
    sizes = torch.cat([index["train"]["sizes"], index["val"]["sizes"]])
    small = int(((sizes.min(1).values < size) & (sizes.min(1).values > 0)).sum())
    lines.append(f"  shorter side under {size} px (upscaled): {small}")
    return "\n".join(lines)


def _listing(bad: dict, limit: int = 10) -> str:
    items = [f"{p} ({reason})" for p, reason in sorted(bad.items())]
    return "; ".join(items[:limit]) + (f"; and {len(items) - limit} more" if len(items) > limit else "")


def check_options(cfg) -> None:
    """The data values preparation and loading use: prepare.py runs no training config check."""
    check_data_sizes(cfg)
    if cfg.get("on_bad_file", "error") not in ("error", "skip"):
        raise ConfigError(f"data.on_bad_file must be error or skip, got {cfg.get('on_bad_file')!r}")
    check_resized_options(cfg)
    for name in ("cpu_decode_share", "hw_decoder_load"):
        require_number(f"data.{name}", cfg.get(name, 0.0), "a number from 0 to 1", lambda v: 0 <= v <= 1)
    if cfg.get("jpeg_decoder", "torchvision") not in ("torchvision", "nvimgcodec"):
        raise ConfigError(f"data.jpeg_decoder must be torchvision or nvimgcodec, got {cfg.get('jpeg_decoder')!r}")
    require_integer("data.decode_processes", cfg.get("decode_processes", 1), 1)


def check_bad_files(index: dict, cfg) -> list[dict]:
    """The unreadable files as [{path, reason}]; an error naming them unless data.on_bad_file=skip."""
    if index["bad"] and cfg.get("on_bad_file", "error") != "skip":
        raise ConfigError(f"{len(index['bad'])} unreadable file(s) under {index['root']}: {_listing(index['bad'])}. "
                          f"Replace them and delete the prepared folder to rescan, or set data.on_bad_file=skip "
                          f"to leave them out (they are then listed in results.json)")
    return [{"path": str(Path(index["root"]) / p), "reason": r} for p, r in sorted(index["bad"].items())]


# ---------------------------------------------------------------- resized copies (data.resized_jpegs)

def resized_dir(out: Path, cfg) -> Path:
    return out / f"jpeg-{int(cfg.image_size)}px-q{int(cfg.resized_quality)}"


def check_resized_options(cfg) -> None:
    if not isinstance(cfg.get("resized_jpegs", False), bool):
        raise ConfigError(f"data.resized_jpegs must be true or false, got {cfg.get('resized_jpegs')!r}")
    require_integer("data.resized_quality", cfg.get("resized_quality", 95), 1, most=100)


def write_jpeg(image: torch.Tensor, target: Path, quality: int) -> None:
    """A uint8 (3, H, W) image written atomically as a baseline RGB JPEG: the CPU decodes it with
    libjpeg and the GPU with nvJPEG, whatever the original file was (CMYK, greyscale, progressive, PNG)."""
    from PIL import Image
    encoded = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(encoded, "JPEG", quality=quality)
    atomic_write_bytes(encoded.getvalue(), target)


def write_resized_copy(source, target: Path, size: int, quality: int) -> None:
    """`source` as training sees it before augmentation (`square`), as a JPEG at `target`."""
    rgb, _ = read_rgb(source)
    write_jpeg(square(rgb, size), target, quality)


def write_resized_copies(cfg, index: dict, root: Path, folder: Path, workers: int) -> None:
    """The copies of every image this config trains and validates on that is not there yet (so an
    interrupted run continues: each copy is written whole or not at all). A first preparation
    writes them during its scan; on a root prepared before, this scans the missing ones for them."""
    check_resized_options(cfg)
    wanted = [rel for split in ("train", "val") for rel, _ in split_samples(index, cfg, split)]
    missing = [rel for rel in wanted if not (folder / rel).is_file()]
    log.info("resized copies in %s: %d of %d to write", folder, len(missing), len(wanted))
    if not missing:
        return
    tic = time.perf_counter()
    partial = folder.parent / (folder.name + ".partial")
    state = scan(root, missing, [False] * len(missing), int(cfg.image_size), workers, partial, "resized copies",
                 (folder, int(cfg.resized_quality), [True] * len(missing)))
    if state["bad"]:
        raise ConfigError(f"files that decoded at preparation no longer do: {_listing(state['bad'])}")
    partial.unlink(missing_ok=True)
    log.info("wrote %d resized copies in %.1f s", len(missing), time.perf_counter() - tic)


# ---------------------------------------------------------------- loading for training

def split_samples(index: dict, cfg, split: str) -> list[tuple[str, int]]:
    """(path relative to root, label) of the files a config uses from one split: its classes,
    relabelled 0..N-1, without the bad files, then its fixed random subset (seed 0)."""
    picked = pick_classes(len(index["classes"]), cfg.get("classes"))
    relabel = {old: new for new, old in enumerate(picked)}
    entry = index[split]
    samples = [(p, relabel[int(c)]) for p, c in zip(entry["paths"], entry["labels"].tolist())
               if int(c) in relabel and p not in index["bad"]]
    # the statistics stay those of the prepared classes
    return [samples[int(i)] for i in subset_positions(len(samples), cfg.get(f"{split}_subset"), f"{split}_subset")]


def load_imagenet(cfg, cache_dir=None, device: torch.device = torch.device("cpu")):
    """(train, val, num_classes, stats, stats_path, skipped files) from the prepared folder.
    The splits decode on the CPU (ImageFolderSource) or on the GPU (GpuJpegSource): data.decode."""
    check_options(cfg)
    decode = resolve_decode(cfg, device)
    jpeg_decoder = cfg.get("jpeg_decoder", "torchvision")
    if jpeg_decoder == "nvimgcodec" and decode != "cpu":
        from alexlab.data.nvimgcodec_jpeg import import_nvimgcodec
        import_nvimgcodec()  # not installed: one message here, not a failure in the decoding thread
    elif jpeg_decoder == "nvimgcodec":
        log.warning("data.jpeg_decoder=nvimgcodec applies to data.decode=gpu or gpu_process; "
                    "data.decode=%s here, so PIL decodes on the CPU", cfg.get("decode", "auto"))
    if cfg.get("decode_processes", 1) > 1 and decode != "gpu_process":
        log.warning("data.decode_processes=%s applies to data.decode=gpu_process; data.decode=%s here, "
                    "so it is not used", cfg.get("decode_processes"), cfg.get("decode", "auto"))
    out = find_prepared(cfg, cache_dir)
    if out is None:
        raise ConfigError(f"{_root(cfg)} is not prepared: run `{prepare_command(cfg)}` once first (it decodes "
                          f"every file to find unreadable ones and computes the mean image; see README, ImageNet)")
    index = torch.load(out / INDEX_NAME, weights_only=True)
    if index.get("version") != INDEX_VERSION:
        raise ConfigError(f"{out / INDEX_NAME} is from another version of alexlab: delete {out} and prepare again")
    root = _root(cfg)  # paths in the index are relative: a copied or moved dataset keeps its <root>/.alexlab
    index["root"] = str(root)
    check_index_current(index, root, out, cfg)
    reread_val_labels(index, root, cfg.get("val_labels"))
    skipped = check_bad_files(index, cfg)
    stats_path = out / stats_name(cfg)
    if not stats_path.is_file():
        raise ConfigError(f"no pixel statistics for data.image_size={cfg.image_size}, data.classes={cfg.get('classes')}, "
                          f"data.stats_images={cfg.get('stats_images')} in {out}: run `{prepare_command(cfg)}` "
                          f"(the index is reused; only the statistics are computed)")
    saved = torch.load(stats_path, weights_only=True)
    stats = PixelStats(saved["mean_image"], saved["eigval"], saved["eigvec"])
    picked = pick_classes(len(index["classes"]), cfg.get("classes"))
    readable = {c for p, c in zip(index["train"]["paths"], index["train"]["labels"].tolist()) if p not in index["bad"]}
    lost = [index["classes"][i] for i in picked if i not in readable]
    if lost:  # a class with no image to learn from, which validation would still ask for
        raise ConfigError(f"every training file of {len(lost)} class(es) is unreadable (left out by "
                          f"data.on_bad_file=skip): {lost[:5]}{' ...' if len(lost) > 5 else ''}")
    size, workers = int(cfg.image_size), int(cfg.workers)
    names = [index["classes"][i] for i in picked]
    base, odd = root, {p for kind in GPU_DECODER_SKIPS for p in index["notes"].get(kind, [])}
    if cfg.get("resized_jpegs"):  # every copy is a baseline RGB JPEG, so nvJPEG takes them all
        base, odd = resized_dir(out, cfg), set()
    splits = {}
    for split in ("train", "val"):
        samples = split_samples(index, cfg, split)
        if cfg.get("resized_jpegs"):
            missing = [rel for rel, _ in samples if not (base / rel).is_file()]
            if missing:
                raise ConfigError(f"data.resized_jpegs=true: {len(missing)} of the {len(samples)} {split} copies are "
                                  f"missing from {base} (first: {missing[0]}): run `{prepare_command(cfg)}`")
        splits[split] = [(str(base / rel), label) for rel, label in samples]
        if not samples:  # every file unreadable and left out (data.on_bad_file=skip): nothing to train or test on
            raise ConfigError(f"no readable {split} image left in {root} ({len(index[split]['paths'])} indexed, "
                              f"{sum(p in index['bad'] for p in index[split]['paths'])} unreadable)")
    if decode == "cpu":
        train, val = (ImageFolderSource(samples, size, workers, names) for samples in splits.values())
    else:  # one source for both splits: see SplitOf
        from alexlab.data.gpu_decode import GpuJpegSource
        samples = splits["train"] + splits["val"]
        paths, labels = [p for p, _ in samples], [c for _, c in samples]
        to_cpu = {str(base / p) for p in odd}
        both = GpuJpegSource(paths, labels, size, workers, device, decode_bytes,
                             cpu_files={i for i, p in enumerate(paths) if p in to_cpu},
                             in_process=decode == "gpu", cpu_share=cfg.get("cpu_decode_share", 0.0),
                             jpeg_decoder=jpeg_decoder, hw_decoder_load=cfg.get("hw_decoder_load", 1.0),
                             processes=cfg.get("decode_processes", 1))
        train, val = SplitOf(both, 0, len(splits["train"])), SplitOf(both, len(splits["train"]), len(splits["val"]))
    return train, val, len(picked), stats, stats_path, skipped
