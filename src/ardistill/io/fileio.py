"""Atomic file writes and checksums: a file is either absent or complete, never half-written."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


class DiskFullError(OSError):
    """A write failed because the file system is full (or over quota); the message says what to do."""

    def __str__(self) -> str:
        return str(self.strerror)  # one line, without "[Errno 28]"


_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full_error(path: str | os.PathLike, err: BaseException) -> DiskFullError | None:
    """A one-line DiskFullError for ``err`` when it is a full disk, else None.

    OSError carries errno ENOSPC / EDQUOT; torch.save reports the same as a RuntimeError from its zip
    writer ("PytorchStreamWriter failed writing file ...: file write failed") and safetensors as its
    own error ("StorageFull"), without an errno, so those are recognised by the message.
    """
    text = str(err)
    full = (isinstance(err, OSError) and err.errno in _FULL) or any(
        m in text for m in ("file write failed", "No space left on device", "StorageFull", "Disk quota exceeded"))
    if not full:
        return None
    folder = Path(path).parent
    try:
        free = shutil.disk_usage(folder).free
        left = f" ({free / 2**20:.1f} MiB left)"
    except OSError:
        left = ""
    return DiskFullError(errno.ENOSPC, f"no space left on the device of {folder}{left} while writing "
                         f"{Path(path).name}; nothing complete was lost: free space and run the command again (it "
                         f"resumes; training commands with --resume)")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temp file onto ``path`` (same folder, fsynced).

    A full disk raises ``DiskFullError`` naming the file (the temp file is removed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise disk_full_error(path, e) or e
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions open() would
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        full = disk_full_error(path, e) if isinstance(e, Exception) else None
        if full is not None:
            raise full from e
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    def w(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    return atomic_write(path, w)


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | os.PathLike, what: str = "file") -> dict:
    """Read JSON with an error that names the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from e


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
