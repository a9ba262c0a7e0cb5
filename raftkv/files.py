"""Files an operator names in the settings (tokens, certificates, keys).

Each must be a regular file of bounded size: a FIFO blocks a read forever, /dev/zero never
ends, and a directory or device is a mistake to report, not to read.
"""

from __future__ import annotations

import os
import stat
from typing import Final

MAX_SMALL_FILE_BYTES: Final = 1 << 20
"""Tokens, certificates and keys are a few KiB; a CA bundle may be a few hundred."""


class FileProblem(ValueError):
    """The file cannot be used; the message names it and says why."""


def check_small_file(path: str, limit: int = MAX_SMALL_FILE_BYTES) -> None:
    """Raise FileProblem unless `path` is a readable regular file of at most `limit` bytes
    (opened without blocking, so a FIFO is refused, not waited on)."""
    read_small_file(path, limit, keep=False)


def read_small_file(path: str, limit: int = MAX_SMALL_FILE_BYTES, *,
                    keep: bool = True) -> bytes:
    """The bytes of `path`, a regular file of at most `limit` bytes; FileProblem otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise FileProblem(f"cannot open {path}: {e.strerror or type(e).__name__}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileProblem(f"{path} is not a regular file")
        if info.st_size > limit:
            raise FileProblem(f"{path} is {info.st_size} bytes; at most {limit} are expected")
        if not keep:
            return b""
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise FileProblem(f"{path} holds more than {limit} bytes")
        return b"".join(chunks)
    except OSError as e:
        raise FileProblem(f"cannot read {path}: {e.strerror or type(e).__name__}") from None
    finally:
        os.close(fd)
