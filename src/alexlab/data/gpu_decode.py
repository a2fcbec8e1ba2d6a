"""JPEG files to uint8 batches on the GPU: threads only read file bytes (data.workers of them, into
one pinned buffer per batch); the GPU decodes
them in batches (nvJPEG on the SMs through `torchvision.io.decode_jpeg(..., device="cuda")`, or
with `jpeg_decoder="nvimgcodec"` the GPU's hardware JPEG engines, see nvimgcodec_jpeg.py) and one Triton
kernel resizes every image of the batch at once (shorter side to `size`, centre crop), so the
CPU does almost nothing per image. A background thread prepares the next batches on a side CUDA
stream while the current training step runs.

The resize is the one `resize_square` does on the CPU (torchvision's antialiased bilinear resize,
then `center_crop`): same output size, same crop offsets, same filter; it differs from the CPU
path by at most one or two grey levels because the CPU's uint8 path rounds between its two passes.

Files that nvJPEG refuses (a PNG named .JPEG, CMYK, ...) are decoded on the CPU by `cpu_decode`
(bytes -> uint8 (3, H, W)) and resized by the same kernel.

With `cpu_share` > 0, the reading threads also decode that fraction of each batch's JPEGs on the CPU
(libjpeg-turbo through torchvision, `decode_on_cpu`), beside nvJPEG's share: on a machine with many
cores the two decoders add up. The CPU-decoded images go to the GPU whole and are resized with the rest.
"""
from __future__ import annotations

import atexit
import collections
import functools
import itertools
import math
import os
import queue
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from alexlab.data.datasets import BatchSource, to_device, use_file_system_sharing

RESIZE_BLOCK = 1024


@triton.jit
def _tri_weight(j, lo, center, invscale):
    """Bilinear (triangle) filter weight of input index lo + j for an output centred at `center`."""
    t = tl.abs((j + lo).to(tl.float32) - center + 0.5) * invscale
    return tl.maximum(1.0 - t, 0.0)


@triton.jit
def _resize_crop_kernel(src_ptr, offsets_ptr, meta_ptr, scale_ptr, out_ptr, S,
                        BLOCK: tl.constexpr):
    """out[n, c, oy, ox] = antialiased bilinear sample of image n, resized to (new_h, new_w) and
    cropped at (top, left). meta[n] = (h, w, top, left, taps_y, taps_x); scale[n] = (sy, sx)."""
    n = tl.program_id(1)
    pix = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = pix < S * S
    oy = pix // S
    ox = pix % S
    h = tl.load(meta_ptr + n * 6 + 0)
    w = tl.load(meta_ptr + n * 6 + 1)
    top = tl.load(meta_ptr + n * 6 + 2)
    left = tl.load(meta_ptr + n * 6 + 3)
    taps_y = tl.load(meta_ptr + n * 6 + 4)
    taps_x = tl.load(meta_ptr + n * 6 + 5)
    sy = tl.load(scale_ptr + n * 2 + 0)
    sx = tl.load(scale_ptr + n * 2 + 1)
    base = src_ptr + tl.load(offsets_ptr + n)
    # PyTorch's antialias rule: support = scale when shrinking, 1 when enlarging.
    support_y = tl.maximum(sy, 1.0)
    support_x = tl.maximum(sx, 1.0)
    inv_y = 1.0 / support_y
    inv_x = 1.0 / support_x
    center_y = sy * ((oy + top).to(tl.float32) + 0.5)
    center_x = sx * ((ox + left).to(tl.float32) + 0.5)
    lo_y = tl.maximum((center_y - support_y + 0.5).to(tl.int32), 0)
    hi_y = tl.minimum((center_y + support_y + 0.5).to(tl.int32), h)
    lo_x = tl.maximum((center_x - support_x + 0.5).to(tl.int32), 0)
    hi_x = tl.minimum((center_x + support_x + 0.5).to(tl.int32), w)
    total_y = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in range(0, taps_y):
        total_y += tl.where(lo_y + j < hi_y, _tri_weight(j, lo_y, center_y, inv_y), 0.0)
    total_x = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in range(0, taps_x):
        total_x += tl.where(lo_x + j < hi_x, _tri_weight(j, lo_x, center_x, inv_x), 0.0)
    acc_r = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK,), dtype=tl.float32)
    plane = h * w
    for jy in range(0, taps_y):
        y = lo_y + jy
        wy = tl.where(y < hi_y, _tri_weight(jy, lo_y, center_y, inv_y), 0.0) / tl.maximum(total_y, 1e-20)
        for jx in range(0, taps_x):
            x = lo_x + jx
            m = inside & (y < hi_y) & (x < hi_x)
            wx = tl.where(x < hi_x, _tri_weight(jx, lo_x, center_x, inv_x), 0.0) / tl.maximum(total_x, 1e-20)
            wgt = wy * wx
            at = base + y * w + x
            acc_r += wgt * tl.load(at, mask=m, other=0).to(tl.float32)
            acc_g += wgt * tl.load(at + plane, mask=m, other=0).to(tl.float32)
            acc_b += wgt * tl.load(at + 2 * plane, mask=m, other=0).to(tl.float32)
    out = out_ptr + n.to(tl.int64) * 3 * S * S + pix
    tl.store(out, tl.minimum(tl.maximum(acc_r + 0.5, 0.0), 255.0).to(tl.uint8), mask=inside)
    tl.store(out + S * S, tl.minimum(tl.maximum(acc_g + 0.5, 0.0), 255.0).to(tl.uint8), mask=inside)
    tl.store(out + 2 * S * S, tl.minimum(tl.maximum(acc_b + 0.5, 0.0), 255.0).to(tl.uint8), mask=inside)


def resize_geometry(h: int, w: int, size: int) -> tuple[int, int, int, int]:
    """(new_h, new_w, top, left) exactly as torchvision's resize(size) + center_crop(size)."""
    short, long = (h, w) if h <= w else (w, h)
    new_short, new_long = size, int(size * long / short)
    new_h, new_w = (new_short, new_long) if h <= w else (new_long, new_short)
    return new_h, new_w, int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))


def resize_square_batch(images: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """uint8 (3, H_i, W_i) images of any sizes, on one device -> uint8 (N, 3, size, size), one kernel."""
    device = images[0].device
    if all(img.shape == (3, size, size) and img.dtype == torch.uint8 for img in images):
        return torch.stack(images)  # already squares of this size (data.resized_jpegs): nothing to resample
    meta, scales, offsets, position = [], [], [], 0
    for img in images:
        if img.dim() != 3 or img.shape[0] != 3 or img.dtype != torch.uint8:
            raise ValueError(f"expected uint8 (3, H, W) images, got {img.dtype} {tuple(img.shape)}")
        h, w = img.shape[1:]
        new_h, new_w, top, left = resize_geometry(h, w, size)
        sy, sx = h / new_h, w / new_w
        # enough taps for the widest window: 2 * support + 2
        meta.append((h, w, top, left, int(math.ceil(2 * max(sy, 1.0))) + 2, int(math.ceil(2 * max(sx, 1.0))) + 2))
        scales.append((sy, sx))
        offsets.append(position)
        position += img.numel()
    src = torch.cat([img.reshape(-1) for img in images])
    meta_t = to_device(torch.tensor(meta, dtype=torch.int32), device)
    scale_t = to_device(torch.tensor(scales, dtype=torch.float32), device)
    offsets_t = to_device(torch.tensor(offsets, dtype=torch.int64), device)
    out = torch.empty(len(images), 3, size, size, dtype=torch.uint8, device=device)
    grid = (triton.cdiv(size * size, RESIZE_BLOCK), len(images))
    _resize_crop_kernel[grid](src, offsets_t, meta_t, scale_t, out, size, BLOCK=RESIZE_BLOCK, num_warps=8)
    return out


def is_jpeg(data: bytes | np.ndarray | torch.Tensor) -> bool:
    head = bytes(data[:3].tolist()) if not isinstance(data, bytes) else data[:3]
    return head == b"\xff\xd8\xff"


def decode_on_cpu(data: torch.Tensor, fallback: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """A JPEG's bytes -> uint8 (3, H, W) by torchvision's CPU decoder (libjpeg-turbo, as PIL's, with
    the same output on baseline and progressive RGB JPEGs; tests/test_fast_paths.py) and 25% faster
    than PIL here; anything else, or a file it refuses, through `fallback`."""
    from torchvision.io import ImageReadMode, decode_jpeg
    if is_jpeg(data):
        try:
            image = decode_jpeg(data, mode=ImageReadMode.RGB)
            if image.shape[0] == 3:
                return image
        except RuntimeError:
            pass
    return fallback(data)


def torchvision_jpeg(device: torch.device) -> Callable[[list[torch.Tensor]], list[torch.Tensor | None]]:
    """data.jpeg_decoder=torchvision: JPEG bytes -> uint8 (3, H, W) on `device` in one nvJPEG call
    (torchvision's libjpeg on a CPU); None for each file it refuses."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(datas: list[torch.Tensor]) -> list[torch.Tensor | None]:
        try:
            return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:  # one file spoiled the batch call: find it, keep the others on the GPU
            out: list[torch.Tensor | None] = []
            for data in datas:
                try:
                    out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    out.append(None)
            return out
    return decode


def decode_batch(datas: list[torch.Tensor], device: torch.device,
                 cpu_decode: Callable[[torch.Tensor], torch.Tensor],
                 jpeg_decoder: Callable[[list[torch.Tensor]], list[torch.Tensor | None]] | None = None
                 ) -> list[torch.Tensor]:
    """File bytes (uint8 1-D CPU tensors) -> uint8 (3, H, W) images on `device`. Images already
    decoded on the CPU (3-D, see read_batches) are copied over; the JPEGs are decoded in one call of
    `jpeg_decoder` (default: torchvision's nvJPEG); what it refuses, and anything not a JPEG, go
    through `cpu_decode`."""
    jpeg_decoder = jpeg_decoder or torchvision_jpeg(device)
    out: list[torch.Tensor | None] = [d.to(device, non_blocking=True) if d.dim() == 3 else None for d in datas]
    jpeg_idx = [i for i, d in enumerate(datas) if out[i] is None and is_jpeg(d)]
    if jpeg_idx:
        for i, img in zip(jpeg_idx, jpeg_decoder([datas[i] for i in jpeg_idx])):
            out[i] = img
    for i, img in enumerate(out):
        if img is None or img.shape[0] != 3:
            out[i] = cpu_decode(datas[i]).to(device)
    return out


Decoder = Callable[[torch.Tensor], torch.Tensor]


def host_copy(image: torch.Tensor, pin_memory: bool) -> torch.Tensor:
    """A contiguous copy of a CPU tensor (pinned with `pin_memory`, so that its copy to the GPU needs
    no staging), made by numpy in the calling thread. torch's own copy (Tensor.pin_memory()) runs
    OpenMP's parallel loop, and every reading thread that runs one keeps a team of
    torch.get_num_threads() threads of its own (itself and the rest): 16 reading threads on a 16-core
    machine would keep 16 x 15 more threads, spinning between batches (tests/test_fast_paths.py
    counts them)."""
    out = torch.empty(image.shape, dtype=image.dtype, pin_memory=pin_memory)
    np.copyto(out.numpy(), image.numpy())
    return out


def _read_files(buffer: torch.Tensor, sizes: Sequence[int], offsets: Sequence[int], paths: Sequence[str],
                positions: Sequence[int], decoders: Sequence[Decoder | None], decoded: list, pin: bool) -> None:
    view = buffer.numpy()
    for at in positions:
        path, offset, size = paths[at], offsets[at], sizes[at]
        with open(path, "rb", buffering=0) as f:
            got = f.readinto(memoryview(view[offset:offset + size]))
            if got != size or f.read(1):
                raise RuntimeError(f"{path} changed size while being read ({size} bytes expected)")
        if decoders[at] is not None:
            try:
                image = decoders[at](buffer[offset:offset + size])
            except Exception as err:
                raise RuntimeError(f"{path}: {type(err).__name__}: {err}") from err
            decoded[at] = host_copy(image, pin_memory=True) if pin else image


def read_batches(paths: Sequence[str], index_batches: list[list[int]], threads: int, pin: bool = False,
                 ahead: int = 2, decoders: Sequence[Sequence[Decoder | None]] | None = None
                 ) -> Iterator[list[torch.Tensor]]:
    """The bytes of each batch's files, as 1-D uint8 views of one buffer per batch (pinned with
    `pin`, so nvJPEG's copies to the GPU need no staging), read by `threads` threads, `ahead`
    batches ahead of the consumer. File reads release the GIL, so threads suffice and no byte
    crosses a process boundary. DataLoader worker processes sending the bytes back managed 12.8k
    files/s on the 16-core H200 machine; on the 2-core CPU machine, 4,096 files of 42 KB from the
    page cache: 13.9k files/s with 2 worker processes, 32.7k with 2 threads (bench/RESULTS.md).

    `decoders[b][j]`, where given and not None, decodes file j of batch b in the reading thread
    (JPEG decoders release the GIL too); that file then comes as its uint8 (3, H, W) image instead
    of its bytes. Each thread takes every `threads`-th file, so decoding a batch's last files
    spreads over all threads."""
    threads = max(1, int(threads))
    batches = iter(index_batches)
    decoders_of = iter(decoders) if decoders is not None else itertools.repeat(None)
    with ThreadPoolExecutor(threads, thread_name_prefix="jpeg-read") as pool:
        def start(batch):
            files = [paths[i] for i in batch]
            chosen = next(decoders_of) or [None] * len(files)
            sizes = [os.stat(f).st_size for f in files]
            offsets = [0, *itertools.accumulate(sizes)][:-1]
            buffer = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=pin)
            decoded = [None] * len(files)
            futures = [pool.submit(_read_files, buffer, sizes, offsets, files, range(j, len(files), threads),
                                   chosen, decoded, pin) for j in range(min(threads, len(files)))]
            return buffer, sizes, decoded, futures

        pending = collections.deque(start(b) for b in itertools.islice(batches, ahead))
        while pending:
            buffer, sizes, decoded, futures = pending.popleft()
            for future in futures:
                future.result()  # raises the reader's error, naming the file
            following = next(batches, None)
            if following is not None:
                pending.append(start(following))
            yield [image if image is not None else blob for image, blob in zip(decoded, buffer.split(sizes))]


class GpuJpegSource(BatchSource):
    """A split as (path, label) pairs, served as uint8 (N, 3, size, size) batches on `device`.

    Decoding runs `prefetch` batches ahead in a thread of this process (on a side CUDA stream), or,
    with `in_process=False`, in `processes` child processes, each with its own interpreter lock,
    CUDA context and JPEG decoder, which hand the batches over through CUDA IPC (`DecoderProcess`):
    child k decodes batches k, k + processes, ..., and the `threads` reading threads are shared
    out among them."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], size: int, threads: int,
                 device: torch.device, cpu_decode: Decoder, prefetch: int = 3,
                 cpu_files: set[int] = frozenset(), in_process: bool = True, cpu_share: float = 0.0,
                 jpeg_decoder: str = "torchvision", hw_decoder_load: float = 1.0, processes: int = 1):
        self.paths, self.size, self.threads, self.device = list(paths), size, threads, torch.device(device)
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.cpu_decode, self.prefetch, self.cpu_files = cpu_decode, prefetch, set(cpu_files)
        self.in_process, self.cpu_share = in_process, float(cpu_share)
        self.jpeg_decoder, self.hw_decoder_load = jpeg_decoder, float(hw_decoder_load)
        self.processes = max(1, int(processes))
        self._decoders: list[DecoderProcess] = []
        self._jpeg = None  # made where the decoding runs (in the child, for in_process=False)

    def jpeg_batch_decoder(self):
        if self._jpeg is None:
            if self.jpeg_decoder == "nvimgcodec":
                from alexlab.data.nvimgcodec_jpeg import NvImageCodecJpeg
                self._jpeg = NvImageCodecJpeg(self.device, self.hw_decoder_load)
            elif self.jpeg_decoder == "torchvision":
                self._jpeg = torchvision_jpeg(self.device)
            else:
                raise ValueError(f"jpeg_decoder must be torchvision or nvimgcodec, got {self.jpeg_decoder!r}")
        return self._jpeg

    def __len__(self) -> int:
        return len(self.paths)

    def decoders_for(self, batch: list[int]) -> list[Decoder | None]:
        """Who decodes each file of a batch in the reading threads (None: nvJPEG). The odd files
        (`cpu_files`) go to `cpu_decode`; of the others, the last round(cpu_share * n) to libjpeg."""
        chosen: list[Decoder | None] = [self.cpu_decode if i in self.cpu_files else None for i in batch]
        plain = [j for j, d in enumerate(chosen) if d is None]
        libjpeg = functools.partial(decode_on_cpu, fallback=self.cpu_decode)
        for j in plain[len(plain) - round(self.cpu_share * len(plain)):]:
            chosen[j] = libjpeg
        return chosen

    def _loader(self, index_batches):
        index_batches = [b.tolist() for b in index_batches]
        pin = self.device.type == "cuda"
        decoders = [self.decoders_for(b) for b in index_batches]
        return zip(read_batches(self.paths, index_batches, self.threads, pin, decoders=decoders), index_batches)

    def _prepare(self, datas, idx):
        images = resize_square_batch(decode_batch(datas, self.device, self.cpu_decode, self.jpeg_batch_decoder()),
                                     self.size)
        return images, to_device(self.labels[idx], self.device)

    def batches_of(self, index_batches) -> Iterator:
        if not self.in_process:
            index_batches = list(index_batches)
            if not self._decoders:
                threads = max(1, self.threads // self.processes)
                self._decoders = [DecoderProcess(self, threads) for _ in range(self.processes)]
            yield from _in_turn([d.batches_of(index_batches[k::len(self._decoders)])
                                 for k, d in enumerate(self._decoders)], len(index_batches))
            return
        if self.device.type != "cuda" or not self.prefetch:
            for datas, idx in self._loader(index_batches):
                yield self._prepare(datas, idx)
            return
        yield from self._prefetched(index_batches)

    def _prefetched(self, index_batches):
        """Decode on a side stream in a thread, `prefetch` batches ahead of the training step."""
        stream = torch.cuda.Stream(self.device)
        ready: queue.Queue = queue.Queue(self.prefetch)
        stop = threading.Event()

        def work():
            try:
                with torch.cuda.stream(stream):
                    for datas, idx in self._loader(index_batches):
                        images, labels = self._prepare(datas, idx)
                        event = torch.cuda.Event()
                        event.record(stream)
                        while not stop.is_set():
                            try:
                                ready.put((images, labels, event), timeout=0.1)
                                break
                            except queue.Full:
                                pass
                        if stop.is_set():
                            return
                ready.put(None)
            except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
                ready.put(err)

        thread = threading.Thread(target=work, daemon=True, name="gpu-jpeg-prefetch")
        thread.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                images, labels, event = item
                current = torch.cuda.current_stream(self.device)
                current.wait_event(event)
                images.record_stream(current)
                labels.record_stream(current)
                yield images, labels
        finally:
            stop.set()
            thread.join(timeout=30)


# Closed at exit, before multiprocessing's own exit handler (atexit runs the later-registered first):
# that one ends daemonic children with SIGTERM, which a decoder child ignores, and then waits for it
# forever (a test process once hung so after its last test, where a source was not yet collected).
_LIVE_DECODERS: "weakref.WeakSet[DecoderProcess]" = weakref.WeakSet()
atexit.register(lambda: [decoder.close() for decoder in list(_LIVE_DECODERS)])


def _in_turn(generators: list[Iterator], count: int) -> Iterator:
    """`count` items, item i from generators[i % len(generators)], then each generator run to its end
    (a DecoderProcess's epoch ends when its child says so); stopped early or failed, every generator
    is closed (each tells its child)."""
    try:
        for i in range(count):
            yield next(generators[i % len(generators)])
        for generator in generators:
            for _ in generator:
                raise RuntimeError("a JPEG decoder process served more batches than it was given")
    finally:
        for generator in generators:
            generator.close()


class DecoderProcess:
    """A child process that runs a GpuJpegSource's reading and decoding (in_process=True there) for
    the parent, one epoch (a list of index batches) per command, for the source's whole life.
    Batches come back through a queue, `prefetch` at most in flight, as CUDA IPC handles of the
    images (the parent copies them at once, so the child's memory is free again); the parent takes
    the labels from its own copy. The child ignores SIGTERM/SIGUSR2/SIGINT (the parent checkpoints and then ends it),
    and exits when told, or when its parent is gone."""

    def __init__(self, source: GpuJpegSource, threads: int):
        use_file_system_sharing()
        context = torch.multiprocessing.get_context("spawn")  # CUDA cannot be forked
        self.device, self.labels = source.device, source.labels
        state = {"paths": source.paths, "labels": source.labels.tolist(), "size": source.size,
                 "threads": threads, "device": str(source.device), "cpu_decode": source.cpu_decode,
                 "prefetch": 0, "cpu_files": source.cpu_files, "cpu_share": source.cpu_share,
                 "jpeg_decoder": source.jpeg_decoder, "hw_decoder_load": source.hw_decoder_load}
        self.commands, self.results = context.Queue(), context.Queue(max(1, source.prefetch))
        self.cancel, self.stop = context.Event(), context.Event()
        self.process = context.Process(target=_decoder_main,
                                       args=(state, self.commands, self.results, self.cancel, self.stop),
                                       daemon=True, name="gpu-jpeg-decoder")
        self.process.start()
        _LIVE_DECODERS.add(self)
        self.epochs = itertools.count()

    def _get(self):
        while True:
            try:
                return self.results.get(timeout=1.0)
            except queue.Empty:
                if not self.process.is_alive():
                    raise RuntimeError(f"the JPEG decoder process died (exit code {self.process.exitcode})") from None

    def batches_of(self, index_batches) -> Iterator:
        """The epoch's batches. The child is told at once, not when the first batch is asked for, so
        that several children start together; closing the iterator tells the child to stop."""
        served = self._served(index_batches)
        next(served)
        return served

    def _served(self, index_batches) -> Iterator:
        epoch = next(self.epochs)
        index_batches = [torch.as_tensor(b).tolist() for b in index_batches]
        self.commands.put((epoch, index_batches))
        finished, served = False, 0
        try:
            yield None  # told; from here on, closing this generator runs the `finally` below
            while True:
                tag, images, failure = self._get()
                if tag != epoch:  # left over from an abandoned epoch
                    continue
                if images is None:
                    finished = True
                    if failure is not None:  # the child's traceback
                        raise RuntimeError(f"the JPEG decoder process failed:\n{failure}")
                    return
                images = images.clone()  # ours: dropping the received tensor releases the child's block
                served += 1
                yield images, to_device(self.labels[index_batches[served - 1]], self.device)
        finally:
            if not finished and self.process.is_alive():  # stopped early: tell the child, take what it sent
                self.cancel.set()
                while True:
                    tag, images, _ = self._get()
                    if tag == epoch and images is None:
                        break
                self.cancel.clear()

    def close(self) -> None:
        if self.process.is_alive():
            # The event, not only the command: a child in an epoch whose batches the parent no longer
            # takes waits on a full queue and reads no command (a source kept alive to exit did so).
            self.stop.set()
            self.commands.put(None)
            _wait_for_exit(self.process, 10)
        if self.process.is_alive():  # it ignores SIGTERM (terminate()): see the class's docstring
            self.process.kill()
            _wait_for_exit(self.process, 10)

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _wait_for_exit(process, seconds: float) -> None:
    """Not Process.join(timeout): that waits for the child's end of a pipe to close, and the
    torch_shm_manager the child starts for file_system sharing holds it open after the child has
    exited (join then waited its whole timeout: 10 s of a 12 s exit)."""
    deadline = time.monotonic() + seconds
    while process.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)


def _decoder_main(state, commands, results, cancel, stop) -> None:
    """The child of DecoderProcess."""
    import signal
    import traceback
    for signum in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    use_file_system_sharing()
    source = GpuJpegSource(**state)
    parent = os.getppid()

    def send(item) -> bool:
        while os.getppid() == parent and not stop.is_set():
            try:
                results.put(item, timeout=1.0)
                return True
            except queue.Full:
                pass
        return False

    # What it sent and the parent never took must not hold up its exit (the queue's feeder joins).
    results.cancel_join_thread()
    while os.getppid() == parent and not stop.is_set():
        try:
            command = commands.get(timeout=1.0)
        except queue.Empty:
            continue
        if command is None:
            return
        epoch, index_batches = command
        try:
            for images, _ in source.batches_of([torch.tensor(b) for b in index_batches]):
                if cancel.is_set() or not send((epoch, images, None)):
                    break
                del images  # the parent holds it through IPC until it has made its copy
                if source.device.type == "cuda":
                    # Blocks the parent has released: freed now, not when this process's allocator
                    # runs out (it would first take the memory the training needs).
                    torch.cuda.ipc_collect()
            send((epoch, None, None))
        except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
            send((epoch, None, traceback.format_exc()))
