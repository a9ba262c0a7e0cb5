"""The transport tests' fixtures: a loop thread, nodes on it, and the transport's log lines."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from raftkv.runtime.transport import PeerTransport
from tests.runtime.transport.harness import (
    CLUSTER,
    TOKEN,
    Inbox,
    LogWatcher,
    MakeNode,
    Node,
    PeerStates,
    flushed,
)
from tests.support.event_loop import LoopThread, loop_thread


@pytest.fixture
def lt() -> Iterator[LoopThread]:
    with loop_thread() as running:
        yield running


@pytest.fixture
def logs() -> Iterator[LogWatcher]:
    watcher = LogWatcher()
    logger = logging.getLogger("raftkv.runtime.transport")
    previous = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(watcher)
    yield watcher
    logger.removeHandler(watcher)
    logger.setLevel(previous)


@pytest.fixture
def make_node(lt: LoopThread) -> Iterator[MakeNode]:
    created: list[Node] = []

    def make(node_id: str, *, token: str = TOKEN, cluster_id: str = CLUSTER, port: int = 0,
             host: str = "127.0.0.1", **options: Any) -> Node:
        inbox, states = Inbox(), PeerStates()
        http_address = f"{node_id}.test:8080"
        listen = socket.create_server((host, port))

        def create() -> PeerTransport:
            transport = PeerTransport(lt.loop, node_id=node_id, cluster_id=cluster_id,
                                      token=token, listen_sock=listen,
                                      http_address=http_address, deliver=inbox,
                                      on_peer_state=states, **options)
            lt.loop.add_turn_hook(lambda: flushed(transport))
            return transport

        node = Node(node_id, lt, lt.call(create), inbox, states, http_address)
        created.append(node)
        return node

    yield make
    for node in created:
        node.close()


