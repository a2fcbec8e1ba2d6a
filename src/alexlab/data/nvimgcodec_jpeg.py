"""JPEG batches decoded by NVIDIA's nvImageCodec (`data.jpeg_decoder=nvimgcodec`).

Why: torchvision's nvJPEG call (`data.jpeg_decoder=torchvision`, the default) decodes on the SMs, the
same ones the training step needs. A100, H100 and H200 also carry hardware JPEG engines (NVJPG),
which nvImageCodec reaches (nvJPEG's hardware backend) and torchvision does not. Given the
engines, the SMs stay with the training step. `hw_load` (`data.hw_decoder_load`) is the share of
each batch handed to the engines; the rest, and what the engines refuse, go to nvImageCodec's CUDA
decoder; what that refuses comes back as None (the caller's CPU decoder takes it). Without CUDA
(the tests) the same code runs nvImageCodec's CPU decoder (libjpeg-turbo).

Install: `pip install nvidia-nvimgcodec-cu13 nvidia-nvjpeg` (`-cu12` and `nvidia-nvjpeg-cu12` for a
PyTorch built for CUDA 12).
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from alexlab.errors import ConfigError

INSTALL_HINT = ("pip install nvidia-nvimgcodec-cu13 nvidia-nvjpeg (for a PyTorch built for CUDA 12: "
                "nvidia-nvimgcodec-cu12 nvidia-nvjpeg-cu12)")
# nvImageCodec loads every extension in its folder at import, and each whose library is missing
# (JPEG 2000, TIFF) prints a warning; only these two are used here.
JPEG_EXTENSIONS = ("libnvjpeg_ext.so", "libjpeg_turbo_ext.so")


def _jpeg_extensions_only(package_dir: Path) -> None:
    """Point NVIMGCODEC_EXTENSIONS_PATH (unless the user set it) at a folder of links to the JPEG
    extensions of this installation. A linked nvJPEG extension looks for libnvjpeg beside the link,
    not beside its file, so the library is loaded here first, from the wheel's folder; locally, so the
    extension finds it by its soname and nothing else binds to it (loaded globally, it served
    torchvision's decode_jpeg too where torchvision was imported after it)."""
    if "NVIMGCODEC_EXTENSIONS_PATH" in os.environ:
        return
    source = package_dir / "extensions"
    wanted = [p for p in sorted(source.glob("*.so*")) if p.name.startswith(JPEG_EXTENSIONS)]
    major = (torch.version.cuda or "").split(".")[0]
    libraries = sorted(package_dir.parent.glob(f"*/lib/libnvjpeg.so.{major or '*'}"))
    if not wanted or not libraries:
        return  # an installation laid out otherwise: let nvImageCodec find its own
    ctypes.CDLL(str(libraries[-1]), mode=ctypes.RTLD_LOCAL)
    key = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / f"alexlab-nvimgcodec-{os.getuid()}-{key}"
    folder.mkdir(exist_ok=True)
    for path in wanted:
        try:
            (folder / path.name).symlink_to(path)
        except FileExistsError:  # made by an earlier process (the key fixes where it points)
            pass
    os.environ["NVIMGCODEC_EXTENSIONS_PATH"] = str(folder)


def import_nvimgcodec():
    """The nvidia.nvimgcodec module, or a ConfigError saying how to install it."""
    try:
        spec = importlib.util.find_spec("nvidia.nvimgcodec")
    except (ImportError, ValueError):  # no `nvidia` package, or the module blocked (None in sys.modules)
        spec = None
    if spec is None or spec.origin is None:
        raise ConfigError(f"data.jpeg_decoder=nvimgcodec needs NVIDIA's nvImageCodec: {INSTALL_HINT}; "
                          f"or use data.jpeg_decoder=torchvision")
    _jpeg_extensions_only(Path(spec.origin).parent)
    os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "1")  # errors only: a refused file is no news, the CPU takes it
    from nvidia import nvimgcodec
    return nvimgcodec


class NvImageCodecJpeg:
    """JPEG bytes (uint8 1-D CPU tensors) -> uint8 (3, H, W) images on `device`, one call per batch;
    None where nvImageCodec refuses a file.

    The decoded images live in nvImageCodec's own buffers (its library calls cuMemAlloc and
    cuMemFree, by the symbols in its binary; a cuMemFree waits for the whole GPU, training step
    included). So the buffers are kept and reused from batch to batch; before a call overwrites them, the stream they were
    handed out on is synchronised, so the work queued on them (the resize) is done. The images of
    one call are valid until the next call."""

    def __init__(self, device: torch.device, hw_load: float = 1.0):
        nvimgcodec = import_nvimgcodec()
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        kind = nvimgcodec.BackendKind
        if self.cuda:
            backends = [nvimgcodec.Backend(kind.GPU_ONLY), nvimgcodec.Backend(kind.HYBRID_CPU_GPU)]
            if hw_load > 0:
                backends.insert(0, nvimgcodec.Backend(kind.HW_GPU_ONLY, load_hint=float(hw_load)))
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        else:
            backends = [nvimgcodec.Backend(kind.CPU_ONLY)]
            device_id = nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY
        self.decoder = nvimgcodec.Decoder(device_id=device_id, backends=backends)
        # Planar RGB as torchvision's decoders give it; no EXIF rotation, as the CPU path (PIL) does none.
        self.params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB,
                                              sample_format=nvimgcodec.SampleFormat.P_RGB)
        self._buffers: list = []
        self._handed_out_on: torch.cuda.Stream | None = None

    def __call__(self, datas: list[torch.Tensor]) -> list[torch.Tensor | None]:
        if self._handed_out_on is not None:
            self._handed_out_on.synchronize()
        stream = torch.cuda.current_stream(self.device) if self.cuda else None
        reuse = self._buffers[:len(datas)] if len(self._buffers) >= len(datas) else None
        images = self.decoder.decode([d.numpy() for d in datas], images=reuse, params=self.params,
                                     cuda_stream=stream.cuda_stream if stream is not None else 0)
        if reuse is None and all(img is not None for img in images):
            self._buffers = list(images)
        self._handed_out_on = stream
        return [None if img is None else self._tensor(img) for img in images]

    def _tensor(self, image) -> torch.Tensor:
        if self.cuda:  # shares the buffer (__cuda_array_interface__); the tensor keeps the image alive
            return torch.as_tensor(image, device=self.device)
        return torch.from_numpy(np.asarray(image))  # a host image: shares its buffer too
