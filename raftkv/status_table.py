"""The member table of `raftkv status`: every member's own /status, side by side.

The member list comes from the cluster (the leader's, when the node first asked names one), and
each member is asked for its /status at its HTTP address, all at once, with no retries: a
member that does not answer in time is shown as unreachable, never waited for twice.

    cluster 3f9c0a1b2d4e5f60  leader n1  term 4
    ID  HTTP            RAFT            ROLE      TERM  COMMIT  APPLIED  LAG  REACHABLE
    n1  127.0.0.1:4001  127.0.0.1:5001  leader    4     1042    1042     0    yes
    n2  127.0.0.1:4002  127.0.0.1:5002  follower  4     1042    1040     2    yes
    n3  127.0.0.1:4003  127.0.0.1:5003  -         -     -       -        -    no: cannot conn...

LAG is how far the member's applied index is behind the leader's commit index (or the highest
commit index seen, without a leader).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final

from raftkv.service import Member, NodeStatus

__all__ = ["MemberRow", "format_table", "gather_rows"]

MAX_PARALLEL_PROBES: Final = 16

StatusFetch = Callable[[str], NodeStatus]
"""HTTP address -> that node's status; raises (anything but BaseException-only) when it fails."""


@dataclass(frozen=True, slots=True)
class MemberRow:
    member: Member
    status: NodeStatus | None
    problem: str = ""
    """Why the status is missing."""


def gather_rows(members: Sequence[Member], fetch: StatusFetch) -> list[MemberRow]:
    """Each member's status, fetched in parallel."""

    def probe(member: Member) -> MemberRow:
        if not member.http_address:
            return MemberRow(member, None, "its HTTP address is not known yet")
        try:
            return MemberRow(member, fetch(member.http_address))
        except Exception as e:  # any failure means: not reachable now; say why
            return MemberRow(member, None, _reason(e))

    if not members:
        return []
    with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_PROBES, len(members))) as pool:
        return list(pool.map(probe, members))


def format_table(rows: Sequence[MemberRow]) -> str:
    reached = [r.status for r in rows if r.status is not None]
    leader = next((s for s in reached if s.role == "leader"), None)
    reference = leader.commit_index if leader is not None else max(
        (s.commit_index for s in reached), default=0)
    cluster_id = next((s.cluster_id for s in reached if s.cluster_id), "?")
    title = f"cluster {cluster_id}  leader {leader.id if leader else 'none'}"
    if leader is not None:
        title += f"  term {leader.term}"

    table = [["ID", "HTTP", "RAFT", "ROLE", "TERM", "COMMIT", "APPLIED", "LAG", "REACHABLE"]]
    for row in rows:
        m, st = row.member, row.status
        cells = [m.id, m.http_address or "-", m.raft_address or "-"]
        if st is None:
            cells += ["-"] * 5 + [f"no: {row.problem}"]
        else:
            role = st.role if m.voter or st.role == "learner" else f"{st.role} (learner)"
            lag = max(0, reference - st.applied_index)
            cells += [role, str(st.term), str(st.commit_index), str(st.applied_index),
                      str(lag), "yes"]
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1]
             for r in table]
    return "\n".join([title, *lines])


def _reason(e: Exception) -> str:
    text = str(getattr(e, "message", "") or e) or type(e).__name__
    return text.splitlines()[0][:120]
