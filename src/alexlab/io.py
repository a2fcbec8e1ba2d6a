"""Atomic writes: a reader sees the old file or the new one, never half of one. And a run directory's
lock: one process trains in it at a time."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import sys
import tempfile
from pathlib import Path


def lock_directory(directory, name: str = ".run.lock") -> tuple[int | None, int]:
    """Take an exclusive lock on directory/name without waiting: (its descriptor, 0) when taken, held
    until the descriptor is closed or the process ends, however it ends (none is left behind); (None, the
    holder's pid) when another process holds it; (None, 0) on a file system without locks."""
    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = os.pread(fd, 20, 0).decode(errors="replace").strip()
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None, int(holder) if holder.isdigit() else -1
        if err.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
            return None, 0
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd, 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic(path, write) -> None:
    handling = sys.exc_info()[1]  # an error being handled around this call is not one of this write's
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; give it the mode open() would (results, checkpoints and a shared
        # prepared ImageNet folder readable by the group, as the umask allows)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        cause = _os_error_in(err, handling)
        if cause is not None and not cause.filename:  # torch.save says "enforce fail ... unexpected pos" over a full disk
            raise OSError(cause.errno, f"cannot write {path}: {cause.strerror}") from err
        raise


def _os_error_in(err: BaseException, stop: BaseException | None) -> OSError | None:
    """The first OSError in an exception's chain (itself, what caused it, what it was raised while
    handling), up to `stop`."""
    seen = {id(stop)}
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def atomic_write_bytes(data: bytes, path) -> None:
    _atomic(path, lambda f: f.write(data))


def atomic_write_json(obj, path) -> None:
    _atomic(path, lambda f: f.write(json.dumps(obj, indent=2, default=str).encode()))


def atomic_torch_save(obj, path) -> None:
    import torch  # here, so that reading and writing JSON does not import torch
    _atomic(path, lambda f: torch.save(obj, f))


def atomic_savefig(fig, path, **kwargs) -> None:
    """A matplotlib figure, as PNG (the format by the name would be taken from the temporary file's)."""
    _atomic(path, lambda f: fig.savefig(f, format="png", **kwargs))
