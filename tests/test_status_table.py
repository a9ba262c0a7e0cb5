"""The member table of `raftkv status` (raftkv.status_table), with statuses from a fake."""

from __future__ import annotations

import re

from raftkv.service import Member, NodeStatus
from raftkv.status_table import MemberRow, format_table, gather_rows

MEMBERS = [
    Member("n1", "10.0.0.1:5001", "10.0.0.1:4001", voter=True, leader=True),
    Member("n2", "10.0.0.2:5001", "10.0.0.2:4001", voter=True, leader=False),
    Member("n3", "10.0.0.3:5001", "10.0.0.3:4001", voter=True, leader=False),
    Member("n4", "10.0.0.4:5001", None, voter=False, leader=False),
]


def status(node_id: str, role: str, commit: int, applied: int) -> NodeStatus:
    return NodeStatus(id=node_id, role=role, term=7, leader="n1", commit_index=commit,
                      applied_index=applied, last_index=commit, snapshot_index=0,
                      members=tuple(MEMBERS), cluster_id="c0ffee")


STATUSES = {
    "10.0.0.1:4001": status("n1", "leader", 120, 120),
    "10.0.0.2:4001": status("n2", "follower", 118, 115),
}


def fetch(url: str) -> NodeStatus:
    if url not in STATUSES:
        raise ConnectionRefusedError(f"connection to {url} refused")
    return STATUSES[url]


def lines_by_id(text: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in text.splitlines()[1:]}


def test_rows_hold_each_reachable_members_status_and_why_others_are_missing() -> None:
    rows = gather_rows(MEMBERS, fetch)
    assert [r.member.id for r in rows] == ["n1", "n2", "n3", "n4"]
    assert rows[0].status == STATUSES["10.0.0.1:4001"]
    assert rows[2].status is None and "refused" in rows[2].problem
    assert rows[3].status is None and "HTTP address" in rows[3].problem


def test_table_shows_roles_indices_and_lag_behind_the_leaders_commit() -> None:
    text = format_table(gather_rows(MEMBERS, fetch))
    assert text.splitlines()[0] == "cluster c0ffee  leader n1  term 7"
    rows = lines_by_id(text)
    assert rows["ID"] == ["ID", "HTTP", "RAFT", "ROLE", "TERM", "COMMIT", "APPLIED", "LAG",
                          "REACHABLE"]
    assert rows["n1"] == ["n1", "10.0.0.1:4001", "10.0.0.1:5001", "leader", "7", "120", "120",
                          "0", "yes"]
    assert rows["n2"][3:] == ["follower", "7", "118", "115", "5", "yes"]
    assert rows["n3"][3:8] == ["-"] * 5 and rows["n3"][8] == "no:"
    assert rows["n4"][1] == "-"


def test_columns_line_up() -> None:
    lines = format_table(gather_rows(MEMBERS, fetch)).splitlines()[1:]
    starts = {tuple(m.start() for m in re.finditer(r"\S+", line))[:9] for line in lines}
    assert len(starts) == 1  # every column starts at the same offset on every line


def test_learner_is_marked_and_lag_uses_the_highest_commit_without_a_leader() -> None:
    member = Member("n5", "10.0.0.5:5001", "10.0.0.5:4001", voter=False, leader=False)
    rows = [MemberRow(member, status("n5", "follower", 90, 80)),
            MemberRow(MEMBERS[1], status("n2", "candidate", 100, 100))]
    text = format_table(rows)
    assert text.splitlines()[0] == "cluster c0ffee  leader none"
    assert "follower (learner)" in text
    assert lines_by_id(text)["n5"][-2] == "20"


def test_no_reachable_member_still_prints_every_member() -> None:
    text = format_table(gather_rows(MEMBERS, lambda url: fetch("nowhere")))
    assert text.splitlines()[0].startswith("cluster ?  leader none")
    rows = lines_by_id(text)
    assert sorted(rows) == ["ID", "n1", "n2", "n3", "n4"]
    assert all(row[8] == "no:" for nid, row in rows.items() if nid != "ID")
