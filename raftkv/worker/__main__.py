"""`python -m raftkv.worker CONFIG`: one HTTP worker process (started by the Raft process).

CONFIG is JSON: index, listen_fd (the node's HTTP socket), channel_fd (this worker's end of
the channel), node_id, http_address, request_timeout_ms, log_level, metrics_open,
head_timeout_ms, max_connections_per_client (limits of raftkv.http.waitress_errors; the latter
counts this worker's connections).

Stopping: SIGTERM (from the Raft process) stops accepting, lets the requests in flight finish
(bounded by DRAIN_S) and exits. If the Raft process goes away, every request waiting on it is
answered (a write in flight 504 "outcome unknown", anything else 503) and the worker exits.
SIGINT is ignored: Ctrl-C in a terminal reaches the Raft process, which stops the workers.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any, Final

from raftkv import codec
from raftkv.codec import FrameKind
from raftkv.http.app import create_app
from raftkv.http.green import GreenDispatcher
from raftkv.http.server import ServerHandle
from raftkv.metrics import WorkerStats
from raftkv.worker.channel import ChannelClient
from raftkv.worker.service import NodeView, RemoteService

log = logging.getLogger(__name__)

DRAIN_S: Final = 3.0
GC_THRESHOLD: Final = 20_000
STATS_INTERVAL_S: Final = 1.0


class _Metrics:
    """The app's metrics sink: counts here, renders through the Raft process."""

    def __init__(self, stats: WorkerStats, service: RemoteService,
                 channel: ChannelClient) -> None:
        self.stats = stats
        self.observe_http = stats.observe_http
        self._service = service
        self._channel = channel

    def render(self) -> bytes:
        self._channel.send_frame(FrameKind.WORKER_STATS, codec.pack_value(self.stats.snapshot()))
        return self._service.render_metrics()


class Worker:
    def __init__(self, config: dict[str, Any]) -> None:
        self.index = int(config["index"])
        listen = socket.socket(fileno=int(config["listen_fd"]))
        channel_sock = socket.socket(fileno=int(config["channel_fd"]))
        self.stats = WorkerStats()
        self.view = NodeView()
        self.dispatcher = GreenDispatcher()
        socket_map: dict[Any, Any] = {}
        self.channel = ChannelClient(channel_sock, self.dispatcher, socket_map, self.stats,
                                     self.view.update, self._on_lost)
        service = RemoteService(self.channel, self.view)
        metrics = _Metrics(self.stats, service, self.channel)
        app = create_app(service, default_timeout_s=int(config["request_timeout_ms"]) / 1000,
                         metrics=metrics, metrics_open=bool(config.get("metrics_open")),
                         min_lease_ttl_s=int(config["min_lease_ttl_s"]))
        self.server = ServerHandle(
            app, [listen], dispatcher=self.dispatcher, socket_map=socket_map,
            head_timeout_s=int(config.get("head_timeout_ms", 10_000)) / 1000,
            max_connections_per_client=int(config.get("max_connections_per_client", 128)))
        self.dispatcher.after_run.append(self.channel.flush)
        self.server.loop_hooks.append(self._housekeeping)
        self._draining_since: float | None = None
        self._next_stats = time.monotonic() + STATS_INTERVAL_S

    def run(self) -> None:
        self.channel.send_frame(FrameKind.WORKER_HELLO,
                                codec.pack_value([codec.CHANNEL_VERSION, self.index, os.getpid()]))
        self.server.run()

    def drain(self) -> None:
        if self._draining_since is None:
            self._draining_since = time.monotonic()
            self.server.stop_accepting()

    def _on_lost(self) -> None:
        self.drain()

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now >= self._next_stats and not self.channel.lost:
            self._next_stats = now + STATS_INTERVAL_S
            self.channel.send_frame(FrameKind.WORKER_STATS,
                                    codec.pack_value(self.stats.snapshot()))
        since = self._draining_since
        if since is not None and (now - since > DRAIN_S or (
                self.dispatcher.tasks == 0 and not self.server.unsent_output())):
            self.server.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m raftkv.worker CONFIG (started by `raftkv serve`)",
              file=sys.stderr)
        return 2
    config = json.loads(args[0])
    from raftkv.cli import configure_logging

    configure_logging(str(config.get("log_level", "INFO")),
                      f"{config.get('node_id', '-')}/w{config['index']}")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker = Worker(config)
    # Every request allocates a few hundred short-lived objects (waitress, Falcon, the
    # greenlet): with the default threshold a young-generation collection ran every request
    # or two. What the imports built is moved out of the collector's sight.
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 100)

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        worker.dispatcher.post(worker.drain)

    signal.signal(signal.SIGTERM, on_term)
    try:
        worker.run()
    except Exception:
        log.exception("event=worker_crashed worker=%d", worker.index)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
