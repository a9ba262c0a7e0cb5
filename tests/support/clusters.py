"""A running LocalCluster for a test: started, with a leader (and every node ready), its
nodes' logs printed when starting or the test failed, every process killed afterwards."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import pytest

from raftkv.localcluster import FAST_TIMING, LocalCluster, NodeProc, http_json

STEADY_LEADER: Final[Mapping[str, str]] = {"RAFTKV_ELECTION_TICKS": "50"}
"""Elections after 1-2 s (50 ticks of FAST_TIMING's 20 ms) instead of 200-400 ms: for a test
that asserts the leader and term stay. Its claim is that the action under test causes no
election; on a loaded machine a leader can be starved for a few hundred ms (its fsync runs on
its event loop's thread), and the followers then elect legitimately, which is not that. Only
those tests' clusters get it: tests that kill a leader and wait for the next keep quick
elections."""


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


def watches(c: LocalCluster, node: NodeProc) -> int:
    """The watches `node` holds (its /status, with the cluster's root token if any)."""
    return int(c.status(node)["extra"]["watches"])


class BackgroundWatch:
    """A watch request waiting in a thread of its own."""

    def __init__(self, node: NodeProc, key: str, index: int, timeout_s: float,
                 headers: Mapping[str, str] | None = None) -> None:
        self._answer: tuple[int, Any] | None = None
        self._error: BaseException | None = None
        url = f"{node.http}/keys/{key}?wait=true&index={index}&timeout={timeout_s}"
        self._headers = headers
        self._thread = threading.Thread(target=self._run, args=(url, timeout_s + 10),
                                        daemon=True)
        self._thread.start()

    def _run(self, url: str, socket_timeout_s: float) -> None:
        try:
            code, body, _ = http_json("GET", url, timeout_s=socket_timeout_s,
                                      headers=self._headers)
            self._answer = (code, body)
        except BaseException as e:  # handed to the test thread
            self._error = e

    def answer(self, timeout_s: float) -> tuple[int, Any]:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"the watch did not answer in {timeout_s}s"
        if self._error is not None:
            raise self._error
        assert self._answer is not None
        return self._answer
