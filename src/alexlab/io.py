"""Atomic writes: a reader sees the old file or the new one, never half of one."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def _atomic(path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(data: bytes, path) -> None:
    _atomic(path, lambda f: f.write(data))


def atomic_write_json(obj, path) -> None:
    _atomic(path, lambda f: f.write(json.dumps(obj, indent=2, default=str).encode()))


def atomic_torch_save(obj, path) -> None:
    import torch  # here, so that reading and writing JSON does not import torch
    _atomic(path, lambda f: torch.save(obj, f))
