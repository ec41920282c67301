"""Atomic file writes, stable hashing and device choice, shared by every module that touches disk."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import InfluenceLensError

WRITE_ERRNOS = {
    errno.ENOSPC: "free some disk space",
    errno.EDQUOT: "free some disk space or raise the quota",
    errno.EROFS: "choose a folder on a writable disk",
    errno.EACCES: "choose a folder you may write to, or fix its permissions",
    errno.EPERM: "choose a folder you may write to, or fix its permissions",
}
"""errno of a failed write → the fix to suggest (full disk, read-only file system, missing permission)."""


def write_error(error: OSError, path: str | os.PathLike | None = None) -> InfluenceLensError | None:
    """The project's error for a write that failed with ``error`` (see :data:`WRITE_ERRNOS`), else None."""
    if error.errno not in WRITE_ERRNOS:
        return None
    target = path or error.filename or "a file"
    return InfluenceLensError(
        f"cannot write {target}: {error.strerror or os.strerror(error.errno)}.", WRITE_ERRNOS[error.errno]
    )


def check_output_dir(path: str | os.PathLike) -> None:
    """Refuse an output folder that is a file or lies under a file, before any work is done."""
    path = Path(path)
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                where = "is a file" if part == path else f"lies under the file {part}"
                raise InfluenceLensError(
                    f"The output folder {path} {where}, not a folder.", "give a new or existing folder path"
                )
            return


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (``os.umask`` swaps it for a moment)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one.

    The file gets the mode a plain ``open`` would give (``0o666`` less the umask), not ``mkstemp``'s 0600.
    A full disk, read-only file system or missing permission becomes an :class:`InfluenceLensError`.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        error = write_error(e, path) if isinstance(e, OSError) else None
        if error is not None:
            raise error from e
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default).encode())


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def atomic_save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as its allow_pickle flag
    atomic_write_bytes(path, buf.getvalue())


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def stable_hash(*parts: Any, length: int = 16) -> str:
    """Hex digest of JSON-serialisable parts and numpy arrays, stable across runs and machines."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(str(part.dtype).encode() + str(part.shape).encode())
            h.update(np.ascontiguousarray(part).tobytes())
        elif isinstance(part, bytes):
            h.update(part)
        else:
            h.update(json.dumps(part, sort_keys=True, default=_json_default).encode())
        h.update(b"\x00")
    return h.hexdigest()[:length]


def file_hash(path: str | os.PathLike, length: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` without a GPU is a clear error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InfluenceLensError(
            "--device cuda was asked for, but PyTorch sees no CUDA GPU.", "use --device auto or --device cpu"
        )
    if device != "cpu" and not device.startswith("cuda"):
        raise InfluenceLensError(f"Unknown device {device!r}.", "use auto, cpu or cuda")
    return torch.device(device)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")
