"""Long fault-injection runs from the command line.

    python -m tests.faults.run --seconds 300 --seed 7 --nodes 3 --results DIR [--mix all]
        [--workload register|locks] [--secure]

Writes DIR/history.jsonl (every operation and nemesis event), DIR/summary.json,
DIR/report.txt and the node logs. Exit status 0 when every check passed, 1 when one failed
(the report, with the seed and the operations around a violation, is printed), 2 for bad
arguments.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path

from tests.faults.harness import WORKLOADS, RunConfig, format_report, run_faults, write_results
from tests.faults.nemesis import MIXES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.run",
                                     description="fault injection against real raftkv nodes")
    parser.add_argument("--seconds", type=float, default=300.0, help="length of the load")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the schedule and the clients (default: from the clock)")
    parser.add_argument("--nodes", type=int, choices=(3, 5), default=3)
    parser.add_argument("--mix", choices=sorted(MIXES), default="all",
                        help="which faults the nemesis draws from")
    parser.add_argument("--workload", choices=WORKLOADS, default="register",
                        help="register: reads and writes checked for linearizability; "
                        "locks: clients contending for a lock, checked for mutual exclusion "
                        "with fencing tokens")
    parser.add_argument("--lock-ttl", type=int, default=2,
                        help="the locks workload: the lock's lease TTL in seconds")
    parser.add_argument("--keys", type=int, default=None,
                        help="size of the key space (default: one key per 10 s, at least 5, "
                        "which keeps each key's history small enough to check quickly)")
    parser.add_argument("--clients-per-node", type=int, default=2)
    parser.add_argument("--server-timeout", type=float, default=2.0,
                        help="?timeout= of every request (short: more 504 unknown outcomes)")
    parser.add_argument("--secure", action="store_true",
                        help="peer mutual TLS and auth on: certificates from raftkv certs, "
                        "a root token every client and check carries (a 401/403 fails the "
                        "run)")
    parser.add_argument("--results", type=Path, required=True,
                        help="directory for history.jsonl, summary.json and logs")
    args = parser.parse_args(argv)
    # SIGTERM (a CI timeout, Ctrl-C in a wrapper) unwinds through the finally blocks that
    # remove the firewall table and kill the nodes.
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(143))
    seed = args.seed if args.seed is not None else int(time.time() * 1000) % 1_000_000
    keys = args.keys if args.keys is not None else max(5, round(args.seconds / 10))
    cfg = RunConfig(seed=seed, nodes=args.nodes, seconds=args.seconds, mix=args.mix,
                    keys=keys, clients_per_node=args.clients_per_node,
                    server_timeout_s=args.server_timeout, workload=args.workload,
                    lock_ttl_s=args.lock_ttl, secure=args.secure)
    print(f"fault run: seed={seed} nodes={cfg.nodes} mix={cfg.mix} workload={cfg.workload} "
          f"secure={cfg.secure} seconds={cfg.seconds:g} results={args.results}", flush=True)
    with tempfile.TemporaryDirectory(prefix="raftkv-faults-") as tmp:
        result = run_faults(cfg, Path(tmp), progress=lambda text: print(text, flush=True))
    write_results(result, args.results)
    print(format_report(result), flush=True)
    print(f"results in {args.results}", flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
