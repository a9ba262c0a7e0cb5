"""A running LocalCluster for a test: started, with a leader (and every node ready), its
nodes' logs printed when starting or the test failed, every process killed afterwards."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest

from raftkv.localcluster import FAST_TIMING, LocalCluster


@contextmanager
def running_cluster(base_dir: Path, n: int = 3, request: pytest.FixtureRequest | None = None,
                    *, env: Mapping[str, str] | None = None, ready: bool = True,
                    timeout_s: float = 20.0,
                    root_token: str | None = None) -> Iterator[LocalCluster]:
    """`env` goes over FAST_TIMING; `ready`: wait until every node answers /ready (it has a
    leader and applied its commit), else only for a leader; `request`: the test's, whose
    failure prints the logs; `root_token`: bootstrap with auth."""
    c = LocalCluster(base_dir, n, env={**FAST_TIMING, **(env or {})}, root_token=root_token)
    try:
        c.start_all()
        c.wait_for_leader(timeout_s=timeout_s)
        if ready:
            for node in c.nodes:
                c.wait_for_ready(node, timeout_s=timeout_s)
    except BaseException:
        print(c.dump_logs())
        c.close()
        raise
    try:
        yield c
    finally:
        rep = getattr(request.node, "rep_call", None) if request is not None else None
        if rep is not None and rep.failed:
            print(c.dump_logs())
        c.close()
