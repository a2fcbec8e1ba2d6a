"""Data: the IDX reader against torchvision's, the paper's transforms against direct numpy slicing,
PCA lighting against numpy's covariance, on real images."""
import gzip
import os
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from alexlab.data import build_data
from alexlab.data.augment import Augmenter, PixelStats, StatsAccumulator, batch_generator
from alexlab.data.datasets import read_idx
from alexlab.errors import ConfigError
from conftest import FASHION_DIR, compose_cfg, requires_fashion


@requires_fashion
def test_idx_reader_matches_torchvision(tmp_path):
    from torchvision.datasets.mnist import read_image_file, read_label_file
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(FASHION_DIR / f"{name}.gz") as src, open(tmp_path / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    images = read_idx(FASHION_DIR / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28)
    np.testing.assert_array_equal(images, read_image_file(str(tmp_path / "t10k-images-idx3-ubyte")).numpy())
    np.testing.assert_array_equal(labels, read_label_file(str(tmp_path / "t10k-labels-idx1-ubyte")).numpy())
    assert np.bincount(labels).tolist() == [1000] * 10  # the published test set is balanced


@requires_fashion
@pytest.mark.parametrize("damage", ["cut in half", "bytes overwritten", "empty"])
def test_a_damaged_idx_file_is_bad_input_naming_the_file(tmp_path, damage):
    good = (FASHION_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes()
    bad = {"cut in half": good[:len(good) // 2], "bytes overwritten": good[:20] + bytes(200) + good[220:],
           "empty": b""}[damage]
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(bad)
    with pytest.raises(ConfigError, match="t10k-labels-idx1-ubyte.gz"):
        read_idx(path)


@requires_fashion
def test_fashion_mnist_files_that_do_not_match_are_bad_input_naming_them(tmp_path):
    """The test split's labels file swapped for the training split's (60,000 labels for 10,000 images):
    it once failed later with an IndexError, or, where the counts allowed, trained on wrong labels."""
    import shutil
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        shutil.copy(FASHION_DIR / name, tmp_path / name)
    shutil.copy(FASHION_DIR / "train-labels-idx1-ubyte.gz", tmp_path / "t10k-labels-idx1-ubyte.gz")
    cfg = compose_cfg("scale=tiny", f"data.root={tmp_path}")
    with pytest.raises(ConfigError, match=r"t10k-images-idx3-ubyte.gz holds 10000 images but .*"
                                          r"t10k-labels-idx1-ubyte.gz 60000 labels"):
        build_data(cfg.data, int(cfg.model.input_size), torch.device("cpu"), tmp_path / "cache")


@requires_fashion
def test_colour_channels_asked_of_grey_data_is_bad_input(tmp_path):
    cfg = compose_cfg("scale=tiny", "data.channels=3")  # conv1 would be built for 3 channels and fail at the first step
    with pytest.raises(ConfigError, match=r"data.channels=3, but fashion_mnist's images have 1 channel\(s\)"):
        build_data(cfg.data, int(cfg.model.input_size), torch.device("cpu"), tmp_path)


@requires_fashion
def test_fashion_mnist_loads_resized_with_grey_stats(tmp_path):
    cfg = compose_cfg("scale=tiny")
    data = build_data(cfg.data, int(cfg.model.input_size), torch.device("cpu"), tmp_path)
    assert data.num_classes == 10 and len(data.train) == 1024 and len(data.val) == 512
    assert data.train.images.shape[1:] == (1, 30, 30) and data.train.images.dtype == torch.uint8
    # Grey data: the 1x1 "covariance" is the pixel variance over the training subset.
    pixels = data.train.images.double() / 255
    assert data.augmenter.stats.eigval.shape == (1,)
    assert data.augmenter.stats.eigval.item() == pytest.approx(pixels.var(unbiased=False).item(), rel=1e-5)
    assert data.stats_path.is_file()  # cached for the next run


@requires_fashion
def test_a_subset_larger_than_the_split_says_so(caplog):
    """data.train_subset=100000 took the 60,000 images there without a word."""
    cfg = compose_cfg("scale=tiny", "data.train_subset=100000", "data.val_subset=10000")
    with caplog.at_level("WARNING", logger="alexlab"):
        data = build_data(cfg.data, 27, torch.device("cpu"), None)
    assert len(data.train) == 60000 and len(data.val) == 10000
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "data.train_subset=100000, but there are 60000: all 60000 are used"]


def test_missing_data_says_how_to_get_it(tmp_path):
    cfg = compose_cfg("scale=tiny", f"data.root={tmp_path}", "data.download=false")
    with pytest.raises(ConfigError, match="apt-get install dataset-fashion-mnist"):
        build_data(cfg.data, 27, torch.device("cpu"), None)


@requires_fashion
def test_data_already_in_torchvisions_folders_loads_without_downloading(tmp_path):
    """data.download=false once refused torchvision's own folder layout (root/FashionMNIST/raw, as a
    download leaves it; CIFAR-10's cifar-10-batches-py the same way) without looking into it: the
    offline user, who sets it, could not use the files they had copied."""
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(FASHION_DIR / f"{name}.gz") as packed, open(raw / name, "wb") as out:
            shutil.copyfileobj(packed, out)
    cfg = compose_cfg("scale=tiny", f"data.root={tmp_path}", "data.download=false")
    data = build_data(cfg.data, 27, torch.device("cpu"), None)
    expected = compose_cfg("scale=tiny")  # the Debian package's files
    reference = build_data(expected.data, 27, torch.device("cpu"), None)
    assert torch.equal(data.train.images, reference.train.images) and torch.equal(data.val.labels, reference.val.labels)


def real_photos(size=40):
    """Real colour photographs shipped inside scikit-image, resized to a common square."""
    skdata = pytest.importorskip("skimage.data")
    from alexlab.data.datasets import resize_square
    images = [torch.from_numpy(np.ascontiguousarray(f())).permute(2, 0, 1)[None]
              for f in (skdata.astronaut, skdata.chelsea, skdata.coffee)]
    return torch.cat([resize_square(im, size) for im in images])


def test_stats_match_numpy_on_real_photos():
    photos = real_photos()
    acc = StatsAccumulator()
    acc.add(photos[:2])
    acc.add(photos[2:])
    stats = acc.result()
    x = photos.numpy().astype(np.float64) / 255
    np.testing.assert_allclose(stats.mean_image.numpy(), x.mean(0), atol=1e-6)
    cov = np.cov(x.transpose(1, 0, 2, 3).reshape(3, -1), bias=True)
    eigval, eigvec = np.linalg.eigh(cov)
    np.testing.assert_allclose(stats.eigval.numpy(), eigval[::-1], rtol=1e-4)
    # Eigenvectors are defined up to sign.
    np.testing.assert_allclose(np.abs(stats.eigvec.numpy()), np.abs(eigvec[:, ::-1]), atol=1e-4)


def photo_augmenter(photos, crop_flip=True, pca=True):
    acc = StatsAccumulator()
    acc.add(photos)
    return Augmenter(acc.result(), 32, crop_flip=crop_flip, pca_lighting=pca, pca_sigma=0.1, pixel_scale=1.0)


def test_train_transform_is_a_crop_a_mirror_and_a_colour_shift_of_the_centred_image():
    photos = real_photos()
    aug = photo_augmenter(photos)
    out = aug.train(photos, batch_generator(0, 0, 0))
    # Replay the generator to get the draws it used, then recompute with numpy.
    gen = batch_generator(0, 0, 0)
    n = len(photos)
    tops, lefts = torch.randint(0, 9, (n,), generator=gen), torch.randint(0, 9, (n,), generator=gen)
    flips = torch.rand(n, generator=gen) < 0.5
    alphas = torch.randn(n, 3, generator=gen) * 0.1
    centred = photos.numpy() / 255.0 - aug.stats.mean_image.numpy()
    lam, vec = aug.stats.eigval.numpy(), aug.stats.eigvec.numpy()
    for i in range(n):
        t, l = int(tops[i]), int(lefts[i])
        patch = centred[i, :, t:t + 32, l:l + 32]
        if flips[i]:
            patch = patch[:, :, ::-1]
        patch = patch + (vec @ (alphas[i].numpy() * lam))[:, None, None]
        np.testing.assert_allclose(out[i].numpy(), patch, atol=1e-5)


def test_a_part_of_a_batch_is_augmented_as_in_the_whole_batch():
    """What a data parallel rank does: it holds images 1..2 of a batch of 3 and must get the same
    crops, mirrors and colour shifts as a single process that holds all three."""
    photos = real_photos()
    aug = photo_augmenter(photos)
    whole = aug.train(photos, batch_generator(4, 1, 7))
    part = aug.train(photos[1:3], batch_generator(4, 1, 7), offset=1, total=len(photos))
    assert len(photos) == 3 and torch.equal(part, whole[1:3])


def test_switches_off_give_the_centre_crop_and_seeds_differ():
    photos = real_photos()
    plain = photo_augmenter(photos, crop_flip=False, pca=False)
    torch.testing.assert_close(plain.train(photos, batch_generator(0, 0, 0)), plain.eval(photos))
    np.testing.assert_allclose(plain.eval(photos).numpy(),
                               (photos.numpy() / 255.0 - plain.stats.mean_image.numpy())[:, :, 4:36, 4:36], atol=1e-6)
    full = photo_augmenter(photos)
    a = full.train(photos, batch_generator(0, 0, 0))
    torch.testing.assert_close(a, full.train(photos, batch_generator(0, 0, 0)))
    assert not torch.allclose(a, full.train(photos, batch_generator(1, 0, 0)))


def test_ten_crop_is_four_corners_centre_and_mirrors():
    photos = real_photos()
    aug = photo_augmenter(photos)
    patches = aug.ten_crop(photos).numpy()
    centred = photos.numpy() / 255.0 - aug.stats.mean_image.numpy()
    expected = [centred[:, :, 0:32, 0:32], centred[:, :, 0:32, 8:40], centred[:, :, 8:40, 0:32],
                centred[:, :, 8:40, 8:40], centred[:, :, 4:36, 4:36]]
    expected += [e[..., ::-1] for e in expected]
    assert patches.shape == (10, 3, 3, 32, 32)
    for got, want in zip(patches, expected):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_paper_eigenvalues_give_the_papers_noise_scale():
    # With the eigenpairs PAPER.md quotes, the colour shift has the scale sigma * lambda per component.
    stats = PixelStats(torch.zeros(3, 4, 4), torch.tensor([0.2175, 0.0188, 0.0045]),
                       torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140],
                                     [-0.5836, -0.6948, 0.4203]]))
    aug = Augmenter(stats, 4, crop_flip=False, pca_lighting=True, pca_sigma=0.1)
    shifts = aug.train(torch.zeros(20000, 3, 4, 4, dtype=torch.uint8), batch_generator(0, 0, 0))[:, :, 0, 0]
    projected = shifts.double() @ stats.eigvec.double()  # back onto the principal axes
    np.testing.assert_allclose(projected.std(0).numpy(), (0.1 * stats.eigval).numpy(), rtol=0.03)


def test_synthetic_data_has_the_configured_shape(tmp_path):
    cfg = compose_cfg("data=synthetic", "data.train_size=64", "data.val_size=32")
    data = build_data(cfg.data, 27, torch.device("cpu"), tmp_path)
    assert data.train.images.shape == (64, 3, 32, 32) and len(data.val) == 32
    assert int(data.train.labels.max()) < data.num_classes == 10


def test_cached_stats_follow_the_pixels_not_only_the_options(tmp_path):
    """Same options, other pixels (as after a change to the resize code): the statistics are
    computed afresh, not read from the cache; the same pixels again: read from the cache."""
    from alexlab.data import pixel_stats
    from alexlab.data.datasets import TensorSource
    cfg = OmegaConf.create({"name": "synthetic", "image_size": 8, "channels": 3})
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8, generator=gen)
    labels = torch.zeros(20, dtype=torch.int64)
    first, first_path = pixel_stats(cfg, TensorSource(images, labels), tmp_path)
    changed = images.clone()
    changed[:, 0] //= 2  # darker red channel
    second, second_path = pixel_stats(cfg, TensorSource(changed, labels), tmp_path)
    assert second_path != first_path
    expected_red = changed[:, 0].double().mean() / 255
    assert second.mean_image[0].double().mean().item() == pytest.approx(expected_red.item(), rel=1e-6)
    again, again_path = pixel_stats(cfg, TensorSource(images, labels), tmp_path)
    assert again_path == first_path and torch.equal(again.mean_image, first.mean_image)
    assert len(list(tmp_path.glob("stats-*.pt"))) == 2
    # a damaged cache file (a disk that filled up) is computed again, not a crash (UnpicklingError)
    first_path.write_bytes(b"not a torch file")
    mended, mended_path = pixel_stats(cfg, TensorSource(images, labels), tmp_path)
    assert mended_path == first_path and torch.equal(mended.mean_image, first.mean_image)
    assert torch.equal(torch.load(first_path, weights_only=True)["mean_image"], first.mean_image)


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_a_cache_dir_that_cannot_be_a_directory_is_bad_input_before_the_statistics(tmp_path, where):
    (tmp_path / "a_file").write_text("")
    cache_dir = tmp_path / "a_file" if where == "a file" else tmp_path / "a_file" / "cache"
    cfg = compose_cfg("data=synthetic", "data.train_size=64", "data.val_size=32")
    with pytest.raises(ConfigError, match=f"data.cache_dir={cache_dir} cannot hold the pixel statistics"):
        build_data(cfg.data, 27, torch.device("cpu"), cache_dir)
    assert build_data(cfg.data, 27, torch.device("cpu"), None).stats_path is None  # null: nothing cached


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_get_the_mode_a_plain_open_would(tmp_path, umask):
    """mkstemp makes its file 0600, and the rename kept that: results, checkpoints and a shared prepared
    ImageNet folder's index, statistics and resized copies were unreadable to the group whatever the umask."""
    import stat
    from alexlab.data.imagenet import write_jpeg
    from alexlab.io import atomic_torch_save, atomic_write_json
    previous = os.umask(umask)
    try:
        with open(tmp_path / "plain", "w"):
            pass
        atomic_write_json({"a": 1}, tmp_path / "results.json")
        atomic_torch_save({"a": 1}, tmp_path / "checkpoint.pt")
        write_jpeg(torch.zeros(3, 8, 8, dtype=torch.uint8), tmp_path / "copy.JPEG", 95)
    finally:
        os.umask(previous)
    wanted = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert wanted == 0o666 & ~umask
    for name in ("results.json", "checkpoint.pt", "copy.JPEG"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == wanted, name
