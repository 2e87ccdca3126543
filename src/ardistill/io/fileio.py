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
# messages that only a full disk (or quota) gives, from writers that drop the errno (safetensors)
_FULL_MESSAGES = ("No space left on device", "StorageFull", "Disk quota exceeded")
# Other writers say only that the write failed: torch.save's zip writer ("[enforce fail at inline_container.cc:...]
# . unexpected pos N vs M", "PytorchStreamWriter failed writing file ...: file write failed"), numpy's tofile
# ("N requested and M written"). Such an error is a full disk when the file system is (nearly) full.
NEARLY_FULL_BYTES = 1 << 20  # free space below this (or below 16 blocks) counts as a full file system


def space_exhausted(path: str | os.PathLike) -> bool:
    """Whether the file system holding ``path`` (or its nearest existing parent) has (almost) no room left.

    True when its free space (for this user) is under ``NEARLY_FULL_BYTES`` or 16 blocks, or when it has no
    free inodes; False when that cannot be told (no such file system, one that reports no size).
    """
    p = _existing(Path(path))
    try:
        st = os.statvfs(p)
    except (OSError, AttributeError):  # AttributeError: no statvfs (Windows)
        try:
            usage = shutil.disk_usage(p)
        except OSError:
            return False
        return usage.total > 0 and usage.free < NEARLY_FULL_BYTES
    if st.f_blocks == 0:  # a pseudo file system
        return False
    free = st.f_bavail * st.f_frsize
    return free < max(NEARLY_FULL_BYTES, 16 * st.f_frsize) or (st.f_files > 0 and st.f_favail == 0)


def is_disk_full(path: str | os.PathLike, err: BaseException) -> bool:
    """Whether ``err``, raised while writing ``path``, means that its file system is full (or over quota).

    Call it before removing what the failed write left, so that the space it took still counts.
    An OSError with errno ENOSPC / EDQUOT or a message only a full disk gives (safetensors: "No space left
    on device", "StorageFull") is one; any other OSError or RuntimeError (torch.save's "unexpected pos"
    enforce-fail, numpy's short write "N requested and M written") is one when the file system of ``path``
    is (nearly) full; anything else (a KeyboardInterrupt, a TypeError of an unpicklable object) is not.
    """
    if not isinstance(err, Exception):
        return False
    if isinstance(err, OSError) and err.errno in _FULL:
        return True
    if any(m in str(err) for m in _FULL_MESSAGES):
        return True
    writer_error = isinstance(err, (OSError, RuntimeError)) or type(err).__name__ == "SafetensorError"
    return writer_error and space_exhausted(path)


def full_disk_error(path: str | os.PathLike) -> DiskFullError:
    """The one-line DiskFullError for a failed write of ``path``: which file, how much is left, what to do."""
    path = Path(path)
    try:
        left = f" ({shutil.disk_usage(_existing(path.parent)).free / 2**20:.1f} MiB free now)"
    except OSError:
        left = ""
    return DiskFullError(errno.ENOSPC, f"no space left on the device of {path.parent}{left} while writing "
                         f"{path.name}; nothing complete was lost: free space and run the command again (it "
                         f"resumes; training commands with --resume)")


def disk_full_error(path: str | os.PathLike, err: BaseException) -> DiskFullError | None:
    """A one-line DiskFullError for ``err`` (raised while writing ``path``) when it is a full disk, else None.

    ``is_disk_full`` says which errors are; call this before removing what the failed write left.
    """
    if isinstance(err, DiskFullError):
        return err
    return full_disk_error(path) if is_disk_full(path, err) else None


def _existing(p: Path) -> Path:
    while not p.exists() and p.parent != p:
        p = p.parent
    return p


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], fsync: bool = True) -> Path:
    """Call ``write(tmp_path)`` then rename the temp file onto ``path`` (same folder, fsynced).

    A full disk (``is_disk_full``) raises ``DiskFullError`` naming the file; the temp file is removed
    whatever the error, so no half-written file is left. ``fsync=False`` skips the fsyncs (for many
    small files that are cheap to make again: still complete or absent, unless the machine crashes).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise disk_full_error(path, e) or e
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions open() would
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        full = isinstance(e, DiskFullError) or is_disk_full(path, e)  # before the temp file frees its space
        if os.path.exists(tmp):
            os.unlink(tmp)
        if full:
            raise (e if isinstance(e, DiskFullError) else full_disk_error(path)) from e
        raise
    if fsync:
        _fsync_dir(path.parent)
    return path


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy a file or a folder to ``dst`` so that ``dst`` is either absent or a complete copy.

    A folder is copied to a hidden sibling and renamed (an existing ``dst`` is replaced); a full disk
    raises ``DiskFullError`` and removes the partial copy.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        return atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))
    partial = dst.parent / f".{dst.name}.partial"
    try:
        shutil.rmtree(partial, ignore_errors=True)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, partial)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(partial, dst)
    except BaseException as e:
        full = isinstance(e, DiskFullError) or is_disk_full(partial, e)
        shutil.rmtree(partial, ignore_errors=True)
        if full:
            raise full_disk_error(dst) from e
        raise
    _fsync_dir(dst.parent)
    return dst


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
