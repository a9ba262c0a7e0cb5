"""LMDB failures on demand, shaped as py-lmdb raises them, for the stores' error paths."""

from __future__ import annotations

import os
from types import TracebackType
from typing import Any

import lmdb


def lmdb_error(cls: type[lmdb.Error], what: str, code: int) -> lmdb.Error:
    """An LMDB error as py-lmdb's C extension raises it: the message `what: strerror`, the
    errno in `.code` (the class is the one py-lmdb picks for that errno, e.g. DiskError for
    ENOSPC, plain Error for EIO)."""
    reason = os.strerror(code)
    error = cls(f"{what}: {reason}")
    error.what, error.code, error.reason = what, code, reason  # type: ignore[misc]
    return error


class FailingEnv:
    """Stands in for an lmdb.Environment whose every transaction fails to begin."""

    def __init__(self, error: lmdb.Error) -> None:
        self.error = error

    def begin(self, **kwargs: object) -> object:
        raise self.error

    def close(self) -> None:
        pass


class CommitFails:
    """Wraps a real lmdb.Environment: write transactions run for real, then fail to commit
    with `error` and are aborted, as LMDB does when the disk refuses the pages."""

    def __init__(self, env: lmdb.Environment, error: lmdb.Error) -> None:
        self.env = env
        self.error = error

    def begin(self, **kwargs: Any) -> Any:
        txn = self.env.begin(**kwargs)
        return _FailingCommit(txn, self.error) if kwargs.get("write") else txn

    def __getattr__(self, name: str) -> Any:
        return getattr(self.env, name)


class _FailingCommit:
    def __init__(self, txn: lmdb.Transaction[bytes], error: lmdb.Error) -> None:
        self.txn = txn
        self.error = error

    def __enter__(self) -> lmdb.Transaction[bytes]:
        return self.txn

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.txn.abort()
        if exc_type is None:
            raise self.error
