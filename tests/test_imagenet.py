"""ImageNet on real files: a tiny ImageFolder of scikit-image's colour photographs plus every odd
kind of file ImageNet has, prepared through the command line and trained on with scale=tiny;
the layouts, the preparation's statistics against numpy, the decoding of each odd file, the
bad-file policy, resuming an interrupted preparation, and worker-count determinism."""
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from alexlab.data import build_data
from alexlab.data import imagenet
from alexlab.data.augment import batch_generator
from alexlab.errors import ConfigError
from conftest import ROOT, compose_cfg, run_cli, skip_without_nvimgcodec

skdata = pytest.importorskip("skimage.data")
from PIL import Image  # noqa: E402 - after the skip

SIZE = 32  # data.image_size in these tests: the small model's 27 px crops come from it
PHOTOS = {"n01440764": (skdata.astronaut, skdata.coffee), "n02102040": (skdata.chelsea, skdata.rocket),
          "n03000684": (skdata.immunohistochemistry, skdata.coffee)}
ODD = "n01440764"  # the class that holds the odd files


def photo(func, i, size=(60, 40)) -> Image.Image:
    """A real photograph, cropped a little differently per index, at a small size for speed."""
    im = Image.fromarray(func()).convert("RGB")
    w, h = im.size
    return im.crop((i * 7, i * 5, w - i * 3, h)).resize(size)


def jpeg_bytes(im: Image.Image, quality=90, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality, **kw)
    return buf.getvalue()


def write_odd_files(folder):
    """Each kind of file real ImageNet copies contain, with a photograph inside."""
    base = photo(skdata.astronaut, 5)
    base.convert("L").save(folder / "grey.JPEG", quality=90)
    base.convert("CMYK").save(folder / "cmyk.JPEG", quality=90)
    base.save(folder / "png_inside.JPEG", format="PNG")                # PNG content, .JPEG name
    base.save(folder / "progressive.JPEG", quality=90, progressive=True)
    exif = Image.Exif()
    exif[imagenet.EXIF_ORIENTATION] = 6                                # "rotate 90 degrees to display"
    base.save(folder / "exif_rotated.JPEG", quality=90, exif=exif)
    photo(skdata.chelsea, 0, size=(20, 12)).save(folder / "tiny.JPEG", quality=90)  # shorter side 12 < 32


def write_truncated(path):
    path.write_bytes(jpeg_bytes(photo(skdata.rocket, 1))[:-200])  # the end of the JPEG stream is missing


def write_dataset(root, per_class=3, odd=True, truncated=True):
    for split in ("train", "val"):
        for wnid, funcs in PHOTOS.items():
            (root / split / wnid).mkdir(parents=True)
            for i in range(per_class):
                photo(funcs[i % 2], i).save(root / split / wnid / f"{wnid}_{i}.JPEG", quality=90)
    if odd:
        write_odd_files(root / "train" / ODD)
    if truncated:
        write_truncated(root / "train" / ODD / "truncated.JPEG")
    return root


def data_cfg(root, *overrides):
    return compose_cfg("data=imagenet", f"data.root={root}", f"data.image_size={SIZE}", "data.workers=0",
                       "data.pixel_scale=1", *overrides).data


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A dataset with the odd files and one truncated file, prepared with on_bad_file=skip."""
    root = write_dataset(tmp_path_factory.mktemp("imagenet"))
    imagenet.prepare(data_cfg(root, "data.on_bad_file=skip"))
    return root


def prepared_images(source) -> torch.Tensor:
    return torch.cat([images for images, _ in source.batches(torch.arange(len(source)), 64)])


def run_prepare(*args, cwd):
    env = dict(os.environ, HOME=str(cwd))
    return subprocess.run([sys.executable, str(ROOT / "src" / "prepare.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_prepare_then_train_tiny_through_the_command_line(tmp_path):
    root = write_dataset(tmp_path / "imagenet")
    common = [f"data.root={root}", f"data.image_size={SIZE}", "data.workers=2"]
    # The default policy: the truncated file stops the preparation, named, with what to do.
    proc = run_prepare(*common, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "truncated.JPEG" in proc.stderr and "data.on_bad_file=skip" in proc.stderr
    # Training on that root stops at start-up with the same message, before any epoch.
    train_args = ["scale=tiny", "data=imagenet", *common, "data.pixel_scale=1", "logger=none", "eval.ten_crop=true"]
    proc = run_cli(*train_args, "hydra.run.dir=strict", cwd=tmp_path)
    assert proc.returncode == 2 and "truncated.JPEG" in proc.stderr and "epoch 1" not in proc.stderr
    # With skip, the index is reused (no second scan) and training runs on the good files.
    proc = run_prepare(*common, "data.on_bad_file=skip", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "nothing to do" in proc.stderr and "unreadable: 1" in proc.stderr
    proc = run_cli(*train_args, "data.on_bad_file=skip", "hydra.run.dir=run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    good_train = 3 * 3 + 6  # three photos per class plus the six odd files
    assert record["status"] == "completed" and record["images_seen"] == 2 * good_train
    assert [Path(f["path"]).name for f in record["skipped_files"]] == ["truncated.JPEG"]
    # The resized copies through the same two commands: written on a prepared root, then trained from.
    proc = run_prepare(*common, "data.on_bad_file=skip", "data.resized_jpegs=true", cwd=tmp_path)
    assert proc.returncode == 0 and f"{good_train + 9} of {good_train + 9} to write" in proc.stderr, proc.stderr
    proc = run_cli(*train_args, "data.on_bad_file=skip", "data.resized_jpegs=true", "hydra.run.dir=copies", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    copies = json.loads((tmp_path / "copies" / "results.json").read_text())
    assert copies["status"] == "completed" and copies["images_seen"] == record["images_seen"]


@pytest.mark.parametrize("argument,error", [
    ("/data/imagenet", "Error parsing override '/data/imagenet'"),
    ("data.rot=/data", "Could not override 'data.rot'."),
    # values run.py refuses: prepare.py once took them to a traceback, or silently (stats of all but five images)
    ("data.image_size=abc", "data.image_size must be a positive integer, got 'abc'"),
    ("data.stats_images=-5", "data.stats_images must be a positive integer or null (all), got -5"),
    ("data.classes=1.5", "data.classes must be a positive integer or null (all), got 1.5"),
    ("data.workers=-1", "data.workers must be an integer >= 0, got -1")])
def test_prepare_refuses_an_argument_it_cannot_read_with_its_usage(tmp_path, argument, error):
    """A path without data.root= (the likeliest slip) or a misspelt key: the error and the usage, no traceback."""
    proc = run_prepare(*([argument] if "=/" in argument or argument.startswith("/") else
                         [f"data.root={tmp_path}", argument]), cwd=tmp_path)
    assert proc.returncode == 2
    usage = ["usage: python src/prepare.py data.root=DIR [data.* overrides]"] if "override" in error else []
    assert proc.stderr.strip().splitlines() == [f"error: {error}", *usage]


def test_an_unprepared_root_is_one_clear_error_with_the_command(tmp_path):
    root = write_dataset(tmp_path, per_class=1, odd=False, truncated=False)
    with pytest.raises(ConfigError, match=r"not prepared: run `python src/prepare.py data.root=.* data.image_size=32`"):
        build_data(data_cfg(root), 27, torch.device("cpu"), tmp_path / "cache")
    # the command carries what decides where the files go and whether bad files stop it
    with pytest.raises(ConfigError, match=r"`python src/prepare.py data.root=\S+ data.image_size=32 "
                                          r"data.cache_dir=/elsewhere data.on_bad_file=skip`"):
        build_data(data_cfg(root, "data.cache_dir=/elsewhere", "data.on_bad_file=skip"), 27, torch.device("cpu"),
                   "/elsewhere")
    with pytest.raises(ConfigError, match="data.root is not set"):  # not the parent preset's root
        imagenet.prepare(compose_cfg("scale=imagenet").data)


def test_layout_labels_and_odd_file_notes(prepared):
    index = torch.load(prepared / ".alexlab" / imagenet.INDEX_NAME, weights_only=True)
    assert index["classes"] == sorted(PHOTOS) and index["val_layout"] == "folders"
    assert list(index["bad"]) == [f"train/{ODD}/truncated.JPEG"] and "truncated" in index["bad"][f"train/{ODD}/truncated.JPEG"]
    notes = {kind: [p.rsplit("/", 1)[1] for p in paths] for kind, paths in index["notes"].items()}
    assert notes == {"greyscale": ["grey.JPEG"], "cmyk": ["cmyk.JPEG"], "format_PNG": ["png_inside.JPEG"],
                     "progressive": ["progressive.JPEG"], "exif_orientation_not_applied": ["exif_rotated.JPEG"]}
    data = build_data(data_cfg(prepared, "data.on_bad_file=skip"), 27, torch.device("cpu"), None)
    assert data.num_classes == 3 and len(data.train) == 15 and len(data.val) == 9
    assert data.skipped_files == [{"path": str(prepared / "train" / ODD / "truncated.JPEG"),
                                   "reason": index["bad"][f"train/{ODD}/truncated.JPEG"]}]
    assert [label for _, label in data.val.samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    some = build_data(data_cfg(prepared, "data.on_bad_file=skip", "data.train_subset=5"), 27, torch.device("cpu"), None)
    assert len(some.train) == 5 and set(some.train.samples) <= set(data.train.samples)


def test_a_channel_count_the_photos_lack_is_bad_input(prepared):
    with pytest.raises(ConfigError, match=r"data.channels=1, but imagenet's images have 3 channel\(s\)"):
        build_data(data_cfg(prepared, "data.on_bad_file=skip", "data.channels=1"), 27, torch.device("cpu"), None)


def test_each_image_is_the_centre_square_of_the_photo_resized_by_pil(prepared):
    data = build_data(data_cfg(prepared, "data.on_bad_file=skip"), 27, torch.device("cpu"), None)
    for path, _ in data.train.samples:
        with Image.open(path) as im:
            im = im.convert("RGB")  # plain PIL: no EXIF rotation, as torchvision's ImageFolder
            w, h = im.size
            nw, nh = (SIZE, int(h * SIZE / w)) if w <= h else (int(w * SIZE / h), SIZE)
            want = np.asarray(im.resize((nw, nh), Image.Resampling.BILINEAR)).astype(int)
        top, left = round((nh - SIZE) / 2), round((nw - SIZE) / 2)
        got = imagenet.load_image(path, SIZE).permute(1, 2, 0).numpy().astype(int)
        # torchvision's antialiased bilinear and PIL's agree up to rounding; a crop off by one pixel gives tens
        diff = np.abs(got - want[top:top + SIZE, left:left + SIZE])
        assert diff.max() <= 2 and diff.mean() < 0.1, (path, diff.max(), diff.mean())


def test_odd_files_decode_to_the_right_rgb_pixels(prepared):
    folder = prepared / "train" / ODD
    base = np.asarray(photo(skdata.astronaut, 5))
    png, _ = imagenet.read_rgb(folder / "png_inside.JPEG")
    np.testing.assert_array_equal(png, base)  # decoded by content: lossless PNG gives the photo back
    grey, _ = imagenet.read_rgb(folder / "grey.JPEG")
    assert grey.shape == (40, 60, 3) and (grey == grey[..., :1]).all()  # replicated into R, G and B
    cmyk, _ = imagenet.read_rgb(folder / "cmyk.JPEG")
    assert np.abs(cmyk.astype(int) - base).mean() < 6  # PIL's CMYK conversion lands on the photo
    progressive, _ = imagenet.read_rgb(folder / "progressive.JPEG")
    assert np.abs(progressive.astype(int) - base).mean() < 6
    rotated, notes = imagenet.read_rgb(folder / "exif_rotated.JPEG")
    # EXIF orientation is recorded but not applied: the stored 60x40, not the displayed 40x60.
    assert rotated.shape == (40, 60, 3) and notes == ["exif_orientation_not_applied"]
    assert np.abs(rotated.astype(int) - base).mean() < 6
    tiny = imagenet.load_image(folder / "tiny.JPEG", SIZE)
    assert tiny.shape == (3, SIZE, SIZE)  # 20x12 upscaled: shorter side to 32, centre crop


def test_truncated_files_raise_even_if_a_library_turned_on_truncated_loading(prepared):
    from PIL import ImageFile
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with pytest.raises(OSError, match="truncated"):
            imagenet.read_rgb(prepared / "train" / ODD / "truncated.JPEG")
        assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def test_a_jpeg_whose_tail_was_zeroed_is_truncated_but_zeros_after_its_end_marker_are_not(tmp_path):
    """An interrupted or sparse copy of the right size: the second half of the file zeros. libjpeg decoded
    it (grey rows, a warning that PIL drops), so preparation took it for a good image. Zeros after the
    JPEG's end marker (padding some writers add) are not damage."""
    whole = jpeg_bytes(photo(skdata.astronaut, 1, size=(500, 375)), quality=95)  # at 90 PIL says truncated itself
    zeroed = whole[:len(whole) // 2] + bytes(len(whole) - len(whole) // 2)
    (tmp_path / "zeroed.JPEG").write_bytes(zeroed)
    with pytest.raises(OSError, match=r"truncated: its last \d+ bytes are zeros, with no JPEG end marker"):
        imagenet.read_rgb(tmp_path / "zeroed.JPEG")
    with pytest.raises(OSError, match="truncated"):
        imagenet.decode_bytes(torch.frombuffer(bytearray(zeroed), dtype=torch.uint8))
    (tmp_path / "padded.JPEG").write_bytes(whole + bytes(4096))
    padded, _ = imagenet.read_rgb(tmp_path / "padded.JPEG")
    assert np.array_equal(padded, imagenet.read_rgb(io.BytesIO(whole))[0])


def test_prepared_statistics_equal_numpy_on_the_prepared_images(prepared):
    cfg = data_cfg(prepared, "data.on_bad_file=skip")
    data = build_data(cfg, 27, torch.device("cpu"), None)
    x = prepared_images(data.train).numpy().astype(np.float64) / 255
    np.testing.assert_allclose(data.augmenter.stats.mean_image.numpy(), x.mean(0), atol=1e-6)
    cov = np.cov(x.transpose(1, 0, 2, 3).reshape(3, -1), bias=True)
    eigval, eigvec = np.linalg.eigh(cov)
    np.testing.assert_allclose(data.augmenter.stats.eigval.numpy(), eigval[::-1], rtol=1e-4)
    np.testing.assert_allclose(np.abs(data.augmenter.stats.eigvec.numpy()), np.abs(eigvec[:, ::-1]), atol=1e-4)
    # data.mean=channel: one mean per channel, the same statistics otherwise
    channel = build_data(data_cfg(prepared, "data.on_bad_file=skip", "data.mean=channel"), 27, torch.device("cpu"), None)
    np.testing.assert_allclose(channel.augmenter.stats.mean_image.numpy().ravel(), x.mean((0, 2, 3)), atol=1e-6)


def test_the_papers_transforms_on_the_prepared_images(prepared):
    data = build_data(data_cfg(prepared, "data.on_bad_file=skip", "data.pixel_scale=255"), 27, torch.device("cpu"), None)
    images = prepared_images(data.val)
    aug, n, crop = data.augmenter, len(images), 27
    centred = (images.numpy() / 255.0 - aug.stats.mean_image.numpy()) * 255  # raw pixel units minus the mean image
    np.testing.assert_allclose(aug.eval(images).numpy(), centred[:, :, 2:29, 2:29], atol=1e-3)
    far = SIZE - crop
    corners = [centred[:, :, t:t + crop, l:l + crop] for t, l in ((0, 0), (0, far), (far, 0), (far, far), (2, 2))]
    np.testing.assert_allclose(aug.ten_crop(images).numpy(), np.stack(corners + [c[..., ::-1] for c in corners]), atol=1e-3)
    out = aug.train(images, batch_generator(3, 1, 4)).numpy()
    gen = batch_generator(3, 1, 4)  # replay the draws: crop offsets, mirrors, then the PCA coefficients
    tops, lefts = torch.randint(0, far + 1, (n,), generator=gen), torch.randint(0, far + 1, (n,), generator=gen)
    flips = torch.rand(n, generator=gen) < 0.5
    alphas = torch.randn(n, 3, generator=gen).numpy() * 0.1
    lam, vec = aug.stats.eigval.numpy(), aug.stats.eigvec.numpy()
    for i in range(n):
        patch = centred[i, :, int(tops[i]):int(tops[i]) + crop, int(lefts[i]):int(lefts[i]) + crop]
        patch = patch[:, :, ::-1] if flips[i] else patch
        np.testing.assert_allclose(out[i], patch + 255 * (vec @ (alphas[i] * lam))[:, None, None], atol=1e-3)


def test_every_worker_count_gives_the_same_batches(prepared):
    order = torch.randperm(15, generator=batch_generator(0, 0, -1))
    runs = []
    for workers in (0, 2):
        data = build_data(data_cfg(prepared, "data.on_bad_file=skip", f"data.workers={workers}"), 27,
                          torch.device("cpu"), None)
        runs.append([(images, labels, data.augmenter.train(images, batch_generator(0, 0, step)))
                     for step, (images, labels) in enumerate(data.train.batches(order, 4, 1), 1)])
    assert len(runs[0]) == len(runs[1]) == 3  # 15 images in batches of 4, resumed at step 1
    for (a_img, a_lab, a_aug), (b_img, b_lab, b_aug) in zip(*runs):
        assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab) and torch.equal(a_aug, b_aug)


def test_class_subset_is_evenly_spaced_in_sorted_order(prepared):
    assert imagenet.pick_classes(1000, 100) == list(range(0, 1000, 10))
    assert imagenet.pick_classes(10, 3) == [0, 3, 6]
    with pytest.raises(ConfigError, match="data.classes=4"):
        imagenet.pick_classes(3, 4)
    cfg = data_cfg(prepared, "data.on_bad_file=skip", "data.classes=2")
    with pytest.raises(ConfigError, match="no pixel statistics .* data.classes=2"):
        build_data(cfg, 27, torch.device("cpu"), None)
    imagenet.prepare(cfg)  # only the statistics of the subset: the index is reused
    data = build_data(cfg, 27, torch.device("cpu"), None)
    assert data.num_classes == 2 and data.train.classes == ["n01440764", "n02102040"]
    assert len(data.train) == 3 + 6 + 3 and sorted({label for _, label in data.val.samples}) == [0, 1]
    x = prepared_images(data.train).numpy().astype(np.float64) / 255
    np.testing.assert_allclose(data.augmenter.stats.mean_image.numpy(), x.mean(0), atol=1e-6)


def test_flat_official_validation_with_kaggle_csv_or_devkit(tmp_path):
    root = tmp_path / "ILSVRC" / "Data" / "CLS-LOC"
    write_dataset(root, per_class=1, odd=False, truncated=False)
    wnids = sorted(PHOTOS)
    # Flatten val/ the official way: ILSVRC2012_val_<8 digits>.JPEG, wnids in a non-sorted order.
    truth = ["n03000684", "n01440764", "n02102040"]
    for i, wnid in enumerate(truth, 1):
        (root / "val" / wnid / f"{wnid}_0.JPEG").rename(root / "val" / f"ILSVRC2012_val_{i:08d}.JPEG")
        (root / "val" / wnid).rmdir()
    with pytest.raises(ConfigError, match="no labels were found"):
        imagenet.list_files(root)
    # Kaggle: LOC_val_solution.csv at the top of the download, three folders above CLS-LOC.
    rows = [f"ILSVRC2012_val_{i:08d},{w} 1 2 30 40 {w} 5 6 20 30" for i, w in enumerate(truth, 1)]
    (tmp_path / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    files = imagenet.list_files(root)
    assert files["val_layout"].startswith("csv") and files["classes"] == wnids
    assert [label for _, label in files["val"]] == [wnids.index(w) for w in truth]
    # The devkit: 1-based ILSVRC2012 IDs, mapped to wnids by meta.mat's leaf synsets.
    savemat = pytest.importorskip("scipy.io").savemat
    devkit = tmp_path / "ILSVRC2012_devkit_t12"
    (devkit / "data").mkdir(parents=True)
    ids = {"n02102040": 1, "n03000684": 2, "n01440764": 3}  # IDs are not in sorted-wnid order
    synsets = np.array([(k, w, w, "", 0) for w, k in ids.items()] + [(1001, "n00000001", "entity", "", 3)],
                       dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"),
                              ("num_children", "O")])
    savemat(str(devkit / "data" / "meta.mat"), {"synsets": synsets})
    (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ids[w]}\n" for w in truth))
    files = imagenet.list_files(root, val_labels=devkit)
    assert files["val_layout"].startswith("devkit")
    assert [label for _, label in files["val"]] == [wnids.index(w) for w in truth]
    # a mistyped data.val_labels is named as such, not as labels not found
    with pytest.raises(ConfigError, match=r"data.val_labels=.*typo.csv: no such file or folder"):
        imagenet.list_files(root, val_labels=tmp_path / "typo.csv")
    # a CSV row without its label: the row named, not an IndexError
    (tmp_path / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + rows[0] + "\nILSVRC2012_val_00000002,\n")
    with pytest.raises(ConfigError, match=r"LOC_val_solution.csv, line 3: 'ILSVRC2012_val_00000002' has an empty "
                                          r"PredictionString"):
        imagenet.list_files(root)


def test_a_corrected_val_labels_file_takes_effect_without_preparing_again(tmp_path):
    """The labels of flat validation files once stayed those the dataset was prepared with: a run
    given a corrected data.val_labels validated against the old ones, and prepare said nothing to do."""
    root = write_dataset(tmp_path / "imagenet", per_class=1, odd=False, truncated=False)
    truth = ["n03000684", "n01440764", "n02102040"]
    for i, wnid in enumerate(truth, 1):
        (root / "val" / wnid / f"{wnid}_0.JPEG").rename(root / "val" / f"ILSVRC2012_val_{i:08d}.JPEG")
        (root / "val" / wnid).rmdir()

    def labels_file(name, wnids):
        rows = "".join(f"ILSVRC2012_val_{i:08d},{w} 1 2 30 40\n" for i, w in enumerate(wnids, 1))
        (tmp_path / name).write_text("ImageId,PredictionString\n" + rows)
        return tmp_path / name
    wrong, right = labels_file("wrong.csv", ["n03000684"] * 3), labels_file("right.csv", truth)
    imagenet.prepare(data_cfg(root, f"data.val_labels={wrong}"))
    wnids = sorted(PHOTOS)
    for given, expected in ((wrong, ["n03000684"] * 3), (right, truth)):
        data = build_data(data_cfg(root, f"data.val_labels={given}"), 27, torch.device("cpu"), None)
        assert data.val.labels.tolist() == [wnids.index(w) for w in expected], given
    (tmp_path / "right.csv").write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n03000684 1 2 3 4\n")
    with pytest.raises(ConfigError, match="2 validation files have no label in csv .*right.csv"):
        build_data(data_cfg(root, f"data.val_labels={right}"), 27, torch.device("cpu"), None)


def test_a_class_without_images_is_one_clear_error(tmp_path):
    """An empty class folder became a class no image has, and every later class's label one more;
    a class whose every file is unreadable (left out by on_bad_file=skip), the same at training."""
    root = write_dataset(tmp_path / "imagenet", per_class=1, odd=False, truncated=False)
    (root / "train" / "n00000001").mkdir()
    with pytest.raises(ConfigError, match=r"1 class folder\(s\) in .*train hold no images: \['n00000001'\]"):
        imagenet.prepare(data_cfg(root))
    (root / "train" / "n00000001").rmdir()
    lost = root / "train" / "n02102040"
    (lost / "n02102040_0.JPEG").unlink()
    write_truncated(lost / "truncated.JPEG")
    cfg = data_cfg(root, "data.on_bad_file=skip")
    imagenet.prepare(cfg)
    with pytest.raises(ConfigError, match=r"every training file of 1 class\(es\) is unreadable .*\['n02102040'\]"):
        build_data(cfg, 27, torch.device("cpu"), None)


def test_hidden_files_are_not_images_and_a_dataset_changed_since_it_was_prepared_is_refused(tmp_path):
    """A copy made on macOS leaves `._<name>.JPEG` metadata files beside the images: they were read as
    unreadable images (and, in a flat val/, as files with no label). A class folder added after the
    preparation (a dataset prepared while half extracted) was ignored without a word; a validation split
    whose every file is unreadable made an empty split that failed later, obscurely."""
    root = write_dataset(tmp_path / "imagenet", per_class=2, odd=False, truncated=False)
    for image in list(root.glob("*/*/*.JPEG")):
        (image.parent / f"._{image.name}").write_bytes(b"\x00\x05\x16\x07 Mac OS X metadata")
    cfg = data_cfg(root)
    imagenet.prepare(cfg)  # on_bad_file=error: no metadata file counts as an unreadable image
    data = build_data(cfg, 27, torch.device("cpu"), None)
    assert (len(data.train), len(data.val), data.num_classes) == (2 * len(PHOTOS), 2 * len(PHOTOS), len(PHOTOS))
    (root / "train" / "n09999999").mkdir()
    photo(skdata.astronaut, 0).save(root / "train" / "n09999999" / "a.JPEG", quality=90)
    for again in (lambda: imagenet.prepare(cfg), lambda: build_data(cfg, 27, torch.device("cpu"), None)):
        with pytest.raises(ConfigError, match=r"train has changed since .*index.* \(3 class folders then, 4 now; new: "
                                              r"\['n09999999'\], gone: \[\]\): delete .* and run `python src/prepare.py"):
            again()
    shutil.rmtree(root / "train" / "n09999999")
    for image in root.glob("val/*/n*.JPEG"):  # every validation image unreadable, and skipped
        write_truncated(image)
    fresh = tmp_path / "fresh"
    shutil.copytree(root, fresh, ignore=shutil.ignore_patterns(".alexlab"))
    skip = data_cfg(fresh, "data.on_bad_file=skip")
    imagenet.prepare(skip)
    with pytest.raises(ConfigError, match=r"no readable val image left in .* \(6 indexed, 6 unreadable\)"):
        build_data(skip, 27, torch.device("cpu"), None)


def test_an_interrupted_preparation_or_more_workers_give_the_same_statistics(tmp_path, monkeypatch):
    root = write_dataset(tmp_path / "a", odd=False, truncated=False)
    monkeypatch.setattr(imagenet, "SCAN_BATCH", 2)
    monkeypatch.setattr(imagenet, "CHECKPOINT_EVERY", 2)
    imagenet.prepare(data_cfg(root))
    whole = torch.load(root / ".alexlab" / imagenet.stats_name(data_cfg(root)), weights_only=True)
    shutil.rmtree(root / ".alexlab")

    real_getitem = imagenet._ScanBatch.__getitem__

    def stop_at_batch_3(self, b):  # Ctrl-C in the middle of the scan, at files 6 and 7
        if b == 3:
            raise KeyboardInterrupt
        return real_getitem(self, b)

    monkeypatch.setattr(imagenet._ScanBatch, "__getitem__", stop_at_batch_3)
    with pytest.raises(KeyboardInterrupt):
        imagenet.prepare(data_cfg(root))
    partial = torch.load(root / ".alexlab" / "prepare-index.partial", weights_only=True)
    assert partial["done"] == 6 and not (root / ".alexlab" / imagenet.INDEX_NAME).exists()
    monkeypatch.setattr(imagenet._ScanBatch, "__getitem__", real_getitem)
    imagenet.prepare(data_cfg(root))
    resumed = torch.load(root / ".alexlab" / imagenet.stats_name(data_cfg(root)), weights_only=True)
    for key in ("mean_image", "eigval", "eigvec"):
        assert torch.equal(whole[key], resumed[key]), key
    assert not (root / ".alexlab" / "prepare-index.partial").exists()
    # Workers sum their batches; the batches are added in order, so two workers give the same bits.
    two = data_cfg(root, "data.workers=2", f"data.prepared_dir={tmp_path / 'two'}")
    imagenet.prepare(two)
    parallel = torch.load(tmp_path / "two" / imagenet.stats_name(two), weights_only=True)
    for key in ("mean_image", "eigval", "eigvec"):
        assert torch.equal(whole[key], parallel[key]), key


@pytest.mark.parametrize("decode,share,decoder", [("gpu", 0.0, "torchvision"), ("gpu_process", 0.0, "torchvision"),
                                                   ("gpu", 0.5, "torchvision"), ("gpu", 0.0, "nvimgcodec"),
                                                   ("gpu_process", 0.0, "nvimgcodec")])
def test_gpu_decode_serves_the_cpu_paths_images_odd_files_included(prepared, decode, share, decoder):
    """data.decode=gpu: nvJPEG in batches (on a CPU machine torchvision's CPU decoder stands in) and the
    Triton resize kernel (Triton's interpreter here); gpu_process: the same in a child process;
    data.cpu_decode_share: part of each batch decoded by libjpeg in the reading threads;
    data.jpeg_decoder=nvimgcodec: nvImageCodec instead of torchvision (its hardware decoder on an
    H100, its CPU decoder here). The odd files go to PIL, so every image equals the CPU path's
    within the resize kernel's rounding (and, on CUDA, nvJPEG's)."""
    if decoder == "nvimgcodec":
        skip_without_nvimgcodec()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cpu = build_data(data_cfg(prepared, "data.on_bad_file=skip", "data.decode=cpu"), 27, torch.device("cpu"), None)
    gpu = build_data(data_cfg(prepared, "data.on_bad_file=skip", f"data.decode={decode}",
                              f"data.cpu_decode_share={share}", f"data.jpeg_decoder={decoder}"), 27, device, None)
    source = gpu.train.whole
    assert type(source).__name__ == "GpuJpegSource" and gpu.val.whole is source
    assert (len(gpu.train), len(gpu.val)) == (len(cpu.train), len(cpu.val))
    assert source.in_process == (decode == "gpu") and source.cpu_share == share
    assert source.jpeg_decoder == decoder and source.processes == 1
    assert len(source.cpu_files) == 3  # the CMYK, greyscale and progressive files
    order = torch.randperm(len(cpu.train), generator=batch_generator(0, 0, -1))
    # the validation split's batches come from the same source, after the training split's files
    pairs = [*zip(cpu.train.batches(order, 4), gpu.train.batches(order, 4)),
             *zip(cpu.val.batches(torch.arange(len(cpu.val)), 4), gpu.val.batches(torch.arange(len(gpu.val)), 4))]
    assert len(pairs) == math.ceil(len(cpu.train) / 4) + math.ceil(len(cpu.val) / 4)
    for (a, a_labels), (b, b_labels) in pairs:
        assert torch.equal(a_labels, b_labels.cpu())
        diff = (a.int() - b.cpu().int()).abs()
        if device.type == "cpu":
            assert diff.max() <= 1, diff.flatten(1).max(1).values
        else:  # nvJPEG upsamples chroma differently from libjpeg: 19 levels at colour edges seen on an H200
            assert diff.max() <= 32 and diff.float().mean() < 1.5, diff.flatten(1).max(1).values


@pytest.mark.parametrize("name", ["cpu_decode_share", "hw_decoder_load"])
@pytest.mark.parametrize("share", ["1.5", "-0.1", "true", "half"])
def test_a_decode_share_outside_0_to_1_is_one_clear_error(prepared, name, share):
    with pytest.raises(ConfigError, match=f"data.{name} must be a number from 0 to 1, got"):
        build_data(data_cfg(prepared, "data.on_bad_file=skip", f"data.{name}={share}"), 27,
                   torch.device("cpu"), None)


@pytest.mark.parametrize("value", ["0", "-2", "1.5", "two", "true"])
def test_decode_processes_that_are_not_a_positive_integer_are_one_clear_error(prepared, value):
    with pytest.raises(ConfigError, match="data.decode_processes must be a positive integer, got"):
        build_data(data_cfg(prepared, "data.on_bad_file=skip", f"data.decode_processes={value}"), 27,
                   torch.device("cpu"), None)


def test_decode_processes_reach_the_gpu_source_and_are_said_idle_elsewhere(prepared, caplog):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = build_data(data_cfg(prepared, "data.on_bad_file=skip", "data.decode=gpu_process",
                               "data.decode_processes=4"), 27, device, None)
    assert data.train.whole is data.val.whole  # one set of decoder processes serves both splits
    assert data.train.whole.processes == 4 and not data.train.whole.in_process
    with caplog.at_level("WARNING", logger="alexlab"):
        data = build_data(data_cfg(prepared, "data.on_bad_file=skip", "data.decode=cpu", "data.decode_processes=4"),
                          27, torch.device("cpu"), None)
    assert type(data.train).__name__ == "ImageFolderSource"
    assert "data.decode_processes=4 applies to data.decode=gpu_process; data.decode=cpu here" in caplog.text


def test_an_unknown_missing_or_idle_jpeg_decoder_is_said_clearly(prepared, monkeypatch, caplog):
    with pytest.raises(ConfigError, match="data.jpeg_decoder must be torchvision or nvimgcodec, got 'nvjpeg'"):
        build_data(data_cfg(prepared, "data.on_bad_file=skip", "data.jpeg_decoder=nvjpeg"), 27,
                   torch.device("cpu"), None)
    with caplog.at_level("WARNING", logger="alexlab"):  # the CPU path decodes with PIL: said, not silently ignored
        data = build_data(data_cfg(prepared, "data.on_bad_file=skip", "data.decode=cpu", "data.jpeg_decoder=nvimgcodec"),
                          27, torch.device("cpu"), None)
    assert type(data.train).__name__ == "ImageFolderSource"
    assert "data.jpeg_decoder=nvimgcodec applies to data.decode=gpu or gpu_process" in caplog.text
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)  # as if not installed: its import fails
    with pytest.raises(ConfigError, match=r"needs NVIDIA's nvImageCodec: pip install nvidia-nvimgcodec-cu13"):
        build_data(data_cfg(prepared, "data.on_bad_file=skip", "data.decode=gpu", "data.jpeg_decoder=nvimgcodec"),
                   27, torch.device("cuda" if torch.cuda.is_available() else "cpu"), None)


def test_resized_copies_are_the_training_images_as_jpegs_and_training_reads_only_them(prepared, tmp_path, caplog):
    """data.resized_jpegs=true: prepare.py writes each image as training sees it before augmentation,
    as a baseline RGB JPEG (the odd files too), and training reads those: it runs with the originals
    gone. Missing copies are one error with the command; an interrupted run writes only what is missing."""
    root = tmp_path / "imagenet"
    shutil.copytree(prepared, root)  # its .alexlab/ comes along: prepared, with on_bad_file=skip
    cfg = data_cfg(root, "data.on_bad_file=skip", "data.resized_jpegs=true")
    with pytest.raises(ConfigError, match=r"copies are missing .* run `python src/prepare.py .*data.resized_jpegs=true`"):
        build_data(cfg, 27, torch.device("cpu"), None)
    imagenet.prepare(cfg)
    folder = root / ".alexlab" / f"jpeg-{SIZE}px-q95"
    originals = build_data(data_cfg(root, "data.on_bad_file=skip"), 27, torch.device("cpu"), None)
    assert len(originals.train) == 15 and len(originals.val) == 9
    for split in (originals.train, originals.val):
        for path, _ in split.samples:
            with Image.open(folder / Path(path).relative_to(root)) as im:
                assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (SIZE, SIZE))
                assert not im.info.get("progressive")
                got = np.asarray(im)
            want = imagenet.load_image(path, SIZE).permute(1, 2, 0).numpy()  # the CPU path's training image
            np.testing.assert_array_equal(got, np.asarray(Image.open(io.BytesIO(jpeg_bytes(Image.fromarray(want), quality=95)))))
            assert np.abs(got.astype(int) - want).mean() < 6  # JPEG's rounding (at 32 px every edge is sharp)
    assert not (folder / "train" / ODD / "truncated.JPEG").exists()
    # One copy lost: preparing again writes that one only.
    lost = folder / Path(originals.val.samples[4][0]).relative_to(root)
    lost.unlink()
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*.JPEG")}
    with caplog.at_level("INFO", logger="alexlab"):
        imagenet.prepare(cfg)
    assert "1 of 24 to write" in caplog.text and lost.is_file()
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    # The originals gone: training needs only the copies.
    shutil.move(root / "train", tmp_path / "originals_elsewhere")
    shutil.move(root / "val", tmp_path / "val_elsewhere")
    copies = build_data(cfg, 27, torch.device("cpu"), None)
    assert [label for _, label in copies.train.samples] == [label for _, label in originals.train.samples]
    images = prepared_images(copies.train)
    for (path, _), image in zip(copies.train.samples, images):
        assert Path(path).is_relative_to(folder)
        assert torch.equal(image, imagenet.to_chw(np.asarray(Image.open(path))))  # the copy itself, not resized again
    with pytest.raises(ConfigError, match="data.resized_quality must be an integer from 1 to 100"):
        imagenet.prepare(data_cfg(root, "data.resized_jpegs=true", "data.resized_quality=0"))


def test_gpu_decode_takes_every_resized_copy(prepared):
    """The copies are all baseline RGB JPEGs, so data.decode=gpu sends none of them to PIL, and serves
    the CPU path's images (within the resize kernel's rounding on a CPU; here no resize is needed)."""
    cfg = ("data.on_bad_file=skip", "data.resized_jpegs=true")
    imagenet.prepare(data_cfg(prepared, *cfg))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cpu = build_data(data_cfg(prepared, *cfg, "data.decode=cpu"), 27, torch.device("cpu"), None)
    gpu = build_data(data_cfg(prepared, *cfg, "data.decode=gpu"), 27, device, None)
    assert gpu.train.whole.cpu_files == set()
    assert gpu.train.whole.paths == [p for p, _ in cpu.train.samples + cpu.val.samples]
    order = torch.arange(len(cpu.train))
    for (a, _), (b, _) in zip(cpu.train.batches(order, 8), gpu.train.batches(order, 8)):
        diff = (a.int() - b.cpu().int()).abs()
        assert diff.max() <= (0 if device.type == "cpu" else 32)


def test_a_first_preparation_writes_the_copies_of_the_chosen_classes_from_its_own_scan(tmp_path, caplog):
    """With data.resized_jpegs=true from the start, the scan that indexes the files writes the copies
    from its own decoding (each file is decoded once): the copy pass after it finds nothing to do.
    Only the chosen classes get copies; bad files none."""
    root = write_dataset(tmp_path / "imagenet", per_class=2)
    cfg = data_cfg(root, "data.on_bad_file=skip", "data.resized_jpegs=true", "data.classes=2", "data.workers=2")
    with caplog.at_level("INFO", logger="alexlab"):
        imagenet.prepare(cfg)
    folder = root / ".alexlab" / f"jpeg-{SIZE}px-q95"
    data = build_data(cfg, 27, torch.device("cpu"), None)  # reads the copies: all are there
    wanted = sorted(str(Path(p).relative_to(folder)) for split in (data.train, data.val) for p, _ in split.samples)
    assert len(wanted) == 2 * 2 + 6 + 2 * 2  # two classes: their photos, the odd files, their validation photos
    assert "resized copies in" in caplog.text and f"0 of {len(wanted)} to write" in caplog.text
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*.JPEG")) == wanted  # n03000684 has none
    for rel in wanted:  # the same bytes as the copy pass writes from the original
        again = tmp_path / "again.JPEG"
        imagenet.write_resized_copy(root / rel, again, SIZE, 95)
        assert (folder / rel).read_bytes() == again.read_bytes(), rel


def read_only_view(source: Path, view: Path) -> bool:
    """`view` as a read-only mount of `source` (as root: a bind mount, since permissions do not stop
    root), or `source` made read-only by permissions (as another user); False where neither works."""
    view.mkdir()
    if os.geteuid() != 0:
        view.rmdir()
        view.symlink_to(source)
        for path in [source, *source.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
        return True
    done = subprocess.run(["mount", "--bind", str(source), str(view)], capture_output=True)
    if done.returncode != 0:
        return False
    if subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], capture_output=True).returncode != 0:
        subprocess.run(["umount", str(view)])
        return False
    return True


def test_a_read_only_root_prepared_in_place_gets_a_new_size_in_the_cache(tmp_path):
    """The shared-dataset case: someone prepared the root in place (root/.alexlab), and a user who
    cannot write there asks for another image size: the index is reused, the new statistics go to the
    cache folder (writing them beside the index once failed with a traceback after a whole scan), and
    training finds each size's statistics where they are."""
    root = write_dataset(tmp_path / "imagenet", per_class=1, odd=False, truncated=False)
    imagenet.prepare(data_cfg(root))
    view = tmp_path / "read-only"
    if not read_only_view(root, view):
        pytest.skip("no read-only mount here (not permitted)")
    try:
        assert not imagenet._writable(view / ".alexlab")
        cache = tmp_path / "cache"
        out = imagenet.prepare(data_cfg(view, "data.image_size=24"), cache)
        assert out.parent == cache and (out / imagenet.INDEX_NAME).is_file()
        assert sorted(p.name for p in (view / ".alexlab").glob("stats-*")) == ["stats-32px-classesall-imagesall.pt"]
        for size in (24, SIZE):
            data = build_data(data_cfg(view, f"data.image_size={size}"), 20, torch.device("cpu"), cache)
            assert data.stats_path.parent == (out if size == 24 else view / ".alexlab")
            assert next(iter(data.train.batches(torch.arange(2), 2)))[0].shape[-1] == size
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(view)])
