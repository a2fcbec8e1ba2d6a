"""The paper's pixel pipeline (sections 2 and 4.1), on whole batches, on whatever device holds them.

Every dataset hands over uint8 images already at `image_size` (ImageNet: shorter side 256, centre
crop 256). From there, the same code for every dataset:

    train: x/255 - mean image -> random `input_size` crop + mirror (data.crop_flip; else the centre
           crop) -> PCA lighting (data.pca_lighting) -> * pixel_scale
    eval:  x/255 - mean image -> centre crop, or the ten patches (eval.ten_crop) -> * pixel_scale

PCA lighting adds, to every pixel of an image, sum_i a_i * lambda_i * p_i with a_i ~ N(0, sigma),
drawn once per image per use, where (lambda_i, p_i) are the eigenpairs of the training set's pixel
covariance in [0, 1] units (the convention of fb.resnet.torch, whose eigenvalues PAPER.md quotes).
For greyscale data the "covariance" is the 1x1 pixel variance, so the noise is one random
brightness shift per image, a * sigma^2_pixels.

Randomness comes from a CPU generator seeded by (seed, epoch, step), so the sequence of crops,
mirrors and colour shifts is the same on CPU and GPU, with any number of workers, and after a resume.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from alexlab.data.datasets import to_device


def batch_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    # modulo 2**64, torch's seed range: a seed such as 20251128 overflowed it. torch's CPU generator keeps only the
    # low 32 bits (seeds 1 and 1 + 2**32 draw alike), so two (seed, epoch, step) can meet where their mixes agree
    # modulo 2**32: within a seed, not before epoch 4295 (1_000_003 is odd, steps per epoch far fewer); a review
    # found no two alike over seeds 0-49, 90 epochs of 10,000 steps. (A hash, as dropout_seed's, would change
    # every draw, and with them every recorded result.)
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 + step) % 2**64)


@dataclass
class PixelStats:
    """Mean image (C, S, S) and PCA of the pixel covariance, all in [0, 1] units."""
    mean_image: torch.Tensor
    eigval: torch.Tensor  # (C,)
    eigvec: torch.Tensor  # (C, C), columns are eigenvectors

    def to(self, device) -> "PixelStats":
        return PixelStats(self.mean_image.to(device), self.eigval.to(device), self.eigvec.to(device))


class StatsAccumulator:
    """Running sums over uint8 batches (N, C, S, S) for the mean image and the pixel covariance."""

    def __init__(self):
        self.count = 0
        self.image_sum = None
        self.pixel_sum = None
        self.pixel_outer = None
        self.pixels = 0

    def add(self, batch_uint8: torch.Tensor) -> None:
        x = batch_uint8.to(torch.float64) / 255.0
        if self.image_sum is None:
            c = x.shape[1]
            self.image_sum = torch.zeros(x.shape[1:], dtype=torch.float64)
            self.pixel_sum = torch.zeros(c, dtype=torch.float64)
            self.pixel_outer = torch.zeros(c, c, dtype=torch.float64)
        self.count += x.shape[0]
        self.image_sum += x.sum(0)
        flat = x.permute(1, 0, 2, 3).reshape(x.shape[1], -1)
        self.pixels += flat.shape[1]
        self.pixel_sum += flat.sum(1)
        self.pixel_outer += flat @ flat.T

    def result(self) -> PixelStats:
        if not self.count:
            raise ValueError("no images to compute statistics from")
        mean_pixel = self.pixel_sum / self.pixels
        cov = self.pixel_outer / self.pixels - torch.outer(mean_pixel, mean_pixel)
        eigval, eigvec = torch.linalg.eigh(cov)
        order = eigval.argsort(descending=True)
        return PixelStats((self.image_sum / self.count).float(), eigval[order].clamp_min(0).float(),
                          eigvec[:, order].float())


def crop_offsets(gen: torch.Generator, n: int, size: int, crop: int, random: bool):
    if not random:
        start = (size - crop) // 2
        return torch.full((n,), start), torch.full((n,), start)
    return (torch.randint(0, size - crop + 1, (n,), generator=gen),
            torch.randint(0, size - crop + 1, (n,), generator=gen))


def crop_batch(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, crop: int) -> torch.Tensor:
    """Per-image crops: x (N, C, S, S), offsets (N,) -> (N, C, crop, crop)."""
    if bool((top == top[0]).all() and (left == left[0]).all()):
        t, l = int(top[0]), int(left[0])
        return x[:, :, t:t + crop, l:l + crop]
    ar = torch.arange(crop, device=x.device)
    rows = (to_device(top, x.device)[:, None] + ar)[:, None, :, None]   # N,1,crop,1
    cols = (to_device(left, x.device)[:, None] + ar)[:, None, None, :]  # N,1,1,crop
    n = torch.arange(x.shape[0], device=x.device)[:, None, None, None]
    c = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return x[n, c, rows, cols]


def pca_noise(gen: torch.Generator, n: int, stats: PixelStats, sigma: float) -> torch.Tensor:
    """(N, C) colour offsets: p @ (a * lambda), a ~ N(0, sigma) per image and component."""
    alpha = torch.randn(n, stats.eigval.numel(), generator=gen) * sigma
    return (to_device(alpha, stats.eigval.device) * stats.eigval) @ stats.eigvec.T


class Augmenter:
    def __init__(self, stats: PixelStats, input_size: int, crop_flip: bool, pca_lighting: bool,
                 pca_sigma: float = 0.1, pixel_scale: float = 1.0):
        self.stats = stats
        self.input_size = input_size
        self.crop_flip = crop_flip
        self.pca_lighting = pca_lighting
        self.pca_sigma = pca_sigma
        self.pixel_scale = pixel_scale

    def _centred(self, x_uint8: torch.Tensor) -> torch.Tensor:
        return x_uint8.float() / 255.0 - self.stats.mean_image

    def train(self, x_uint8: torch.Tensor, gen: torch.Generator, offset: int = 0, total: int | None = None
              ) -> torch.Tensor:
        """x_uint8 holds images offset .. offset+N-1 of a batch of `total` (default N): the random draws
        are made for the whole batch and this part's are used, so a data parallel rank that loads
        only its part of the global batch augments it exactly as a single process would."""
        x = self._centred(x_uint8)
        n, size = x.shape[0], x.shape[-1]
        total = n if total is None else total
        part = slice(offset, offset + n)
        top, left = crop_offsets(gen, total, size, self.input_size, random=self.crop_flip)
        x = crop_batch(x, top[part], left[part], self.input_size)
        if self.crop_flip:
            flip = to_device(torch.rand(total, generator=gen)[part] < 0.5, x.device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.pca_lighting:
            x = x + pca_noise(gen, total, self.stats, self.pca_sigma)[part, :, None, None]
        return x * self.pixel_scale

    def eval(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """Centre crop: (N, C, crop, crop)."""
        x = self._centred(x_uint8)
        top, left = crop_offsets(None, x.shape[0], x.shape[-1], self.input_size, random=False)
        return crop_batch(x, top, left, self.input_size) * self.pixel_scale

    def ten_crop(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """The ten patches of section 4.1: four corners, centre, and their mirrors: (10, N, C, crop, crop)."""
        x = self._centred(x_uint8)
        size, crop = x.shape[-1], self.input_size
        far, mid = size - crop, (size - crop) // 2
        patches = [x[:, :, t:t + crop, l:l + crop] for t, l in ((0, 0), (0, far), (far, 0), (far, far), (mid, mid))]
        patches += [p.flip(-1) for p in patches]
        return torch.stack(patches) * self.pixel_scale
