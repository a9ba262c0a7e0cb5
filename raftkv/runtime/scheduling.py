"""The Linux scheduling policy of a node's processes (RAFTKV_CPU_SCHEDULING).

A node's processes hand work to each other all the time: a worker's frame wakes the Raft
process, the Raft process's answers wake the workers, its appends wake the followers (on
one machine, a local cluster). Under CFS a woken process that has run less than the one
waking it preempts it, often in the middle of the send: the Raft process loses the core
between its two appends, or before its fsync, and gets it back a few hundred microseconds
later. SCHED_BATCH marks the node's processes as throughput work: one woken by another
waits for the waker to block or its slice to end (a woken process still takes an idle core
at once). Set once, at the start, by the Raft process: its threads and the workers it
starts inherit it. No privilege is needed to lower a process to SCHED_BATCH.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def apply_cpu_scheduling(policy: str, node_id: str) -> str:
    """Put this thread (and what it starts later) under `policy` ("batch" or "normal");
    returns the policy in force ("unchanged" where the system does not allow it)."""
    batch = getattr(os, "SCHED_BATCH", None)
    other = getattr(os, "SCHED_OTHER", None)
    if batch is None or other is None or not hasattr(os, "sched_setscheduler"):
        return "unchanged"
    wanted = batch if policy == "batch" else other
    try:
        if os.sched_getscheduler(0) != wanted:
            os.sched_setscheduler(0, wanted, os.sched_param(0))
    except OSError as e:
        log.warning("event=cpu_scheduling_unchanged node=%s wanted=%s error=%s", node_id,
                    policy, e.strerror or e)
        return "unchanged"
    return policy
