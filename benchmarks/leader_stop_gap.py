"""The write gap when the leader stops: graceful (SIGTERM: it hands leadership over first)
against a crash (SIGKILL: the others wait for the election timeout).

    python -m benchmarks.leader_stop_gap [--repeats 3]

A writer sends one durable write at a time to the nodes in turn (retrying on the next node
on any error) while the leader is stopped; the gap is the longest time between two
acknowledged writes around the stop. Default timing settings (50 ms ticks, 20-tick election
timeout). Prints the median gap of each kind and their ratio.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import threading
import time
from pathlib import Path

from raftkv.localcluster import LocalCluster, NodeProc, http_json, wait_until

DEFAULT_TIMING = {"RAFTKV_TICK_MS": "50", "RAFTKV_ELECTION_TICKS": "20",
                  "RAFTKV_HEARTBEAT_TICKS": "2", "RAFTKV_LOG_LEVEL": "WARNING"}


class Writer(threading.Thread):
    def __init__(self, cluster: LocalCluster) -> None:
        super().__init__(daemon=True)
        self.cluster = cluster
        self.acked: list[float] = []
        self.stop_flag = threading.Event()

    def run(self) -> None:
        i = 0
        nodes = self.cluster.nodes
        while not self.stop_flag.is_set():
            node = nodes[i % len(nodes)]
            i += 1
            if not node.running:
                continue
            try:
                code, _, _ = http_json("PUT", f"{node.http}/keys/gap{i % 100}", {"value": i},
                                       timeout_s=3.0)
            except OSError:
                continue
            if code == 200:
                self.acked.append(time.monotonic())


def one_stop(cluster: LocalCluster, graceful: bool) -> float:
    leader = cluster.wait_for_leader()
    writer = Writer(cluster)
    writer.start()
    wait_until(lambda: len(writer.acked) >= 50, 30, "writes before the stop")
    stopped_at = time.monotonic()
    if graceful:
        cluster.terminate(leader)
    else:
        cluster.kill(leader)
    wait_until(lambda: any(t > stopped_at + 0.2 for t in writer.acked[-5:])
               and len([t for t in writer.acked if t > stopped_at]) >= 50, 30,
               "writes after the stop")
    writer.stop_flag.set()
    writer.join(5)
    times = [t for t in writer.acked if t >= stopped_at - 1.0]
    gap = max(b - a for a, b in itertools.pairwise(times))
    cluster.start(leader)
    cluster.wait_for_ready(leader)
    return gap


def restart_all_ready(cluster: LocalCluster, nodes: list[NodeProc]) -> None:
    for n in nodes:
        cluster.wait_for_ready(n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="raftkv-gap-") as tmp:
        cluster = LocalCluster(Path(tmp), 3, env=DEFAULT_TIMING)
        cluster.start_all()
        try:
            cluster.wait_for_leader()
            restart_all_ready(cluster, cluster.nodes)
            gaps: dict[str, list[float]] = {"graceful (SIGTERM)": [], "crash (SIGKILL)": []}
            for _ in range(args.repeats):
                for kind, values in gaps.items():
                    values.append(one_stop(cluster, graceful=kind.startswith("graceful")))
                    restart_all_ready(cluster, cluster.nodes)
        finally:
            cluster.close()
    print("leader stop: longest gap between acknowledged writes "
          f"(median of {args.repeats}; default timing: election timeout 1-2 s)")
    medians = {kind: statistics.median(v) for kind, v in gaps.items()}
    for kind, values in gaps.items():
        print(f"  {kind:<20} {medians[kind] * 1000:8.0f} ms   runs: "
              + ", ".join(f"{v * 1000:.0f}" for v in values))
    g, c = medians["graceful (SIGTERM)"], medians["crash (SIGKILL)"]
    print(f"  graceful/crash gap ratio: {g / c:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
