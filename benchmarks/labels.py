"""The names of the benchmark's raftkv variants, and which of them are flush bounds.

A flush bound (`--flush-bounds`) is NOT durable: it skips fsyncs to measure what they cost,
and is never held to the targets or budgets (benchmarks.report)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, Literal, TypeAlias

NoFsync: TypeAlias = Literal["leader", "all"]
NO_FSYNC_LEADER: Final = "leader"
"""The first node skips its fsyncs and is kept the leader."""
NO_FSYNC_ALL: Final = "all"
"""No node fsyncs."""
NO_FSYNC_SUFFIXES: Final[Mapping[str, str]] = {NO_FSYNC_LEADER: "-leader-no-fsync",
                                               NO_FSYNC_ALL: "-no-fsync"}
AUTH_TLS_SUFFIX: Final = "-auth-tls"


def variant_label(http_workers: int | None, auth_tls: bool = False,
                  no_fsync: NoFsync | None = None) -> str:
    """`raftkv` for the default worker count (one per CPU), `raftkv-w<n>` otherwise; with
    `-auth-tls` appended for a cluster with auth and peer TLS on, and a flush bound's suffix
    (NO_FSYNC_SUFFIXES) for one that skips fsyncs."""
    base = "raftkv" if not http_workers else f"raftkv-w{http_workers}"
    base += AUTH_TLS_SUFFIX if auth_tls else ""
    return base + (NO_FSYNC_SUFFIXES[no_fsync] if no_fsync else "")


def is_flush_bound(label: str) -> bool:
    """A variant that skips fsyncs: never held to the targets or budgets."""
    return label.endswith(tuple(NO_FSYNC_SUFFIXES.values()))
