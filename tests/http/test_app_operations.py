"""GET /snapshot (backups) and GET /keys/<key>/?wait=true (watches) against the fake service:
through falcon's TestClient, and the snapshot stream through waitress and the Python client."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest
from falcon.testing import TestClient

from raftkv.client import Client, Unavailable
from raftkv.http import create_app, serve
from raftkv.service import (
    Alarm,
    Consistency,
    MembershipChangeError,
    NoLeaderError,
    ReadTimeoutError,
    StorageFullError,
    UnavailableError,
)
from snapshots.checksum import checksum_of
from tests.http.fake_service import FakeService


@pytest.fixture
def fake() -> FakeService:
    fake = FakeService()
    for i in range(30):
        fake.put(f"k{i:02d}", {"i": i}, timeout_s=1)
    return fake


@pytest.fixture
def client(fake: FakeService) -> TestClient:
    return TestClient(create_app(fake))


def expected_snapshot(fake: FakeService) -> bytes:
    return json.dumps(sorted((k, list(v)) for k, v in fake._data.items())).encode()


# --------------------------------------------------------------------------- GET /snapshot
def test_snapshot_streams_the_bytes_with_index_checksum_and_length(
        client: TestClient, fake: FakeService) -> None:
    result = client.simulate_get("/snapshot")
    assert result.status_code == 200
    data = expected_snapshot(fake)
    assert result.content == data
    assert result.headers["content-type"] == "application/octet-stream"
    assert result.headers["x-raftkv-index"] == "30"
    assert result.headers["x-raftkv-checksum"] == checksum_of(data)
    assert result.headers["x-raftkv-checksum-algorithm"] == "blake2b-256"
    assert result.headers["content-length"] == str(len(data))


def test_snapshot_is_linearizable_unless_asked_otherwise(client: TestClient,
                                                         fake: FakeService) -> None:
    client.simulate_get("/snapshot/")
    client.simulate_get("/snapshot", params={"consistency": "stale", "timeout": "2"})
    calls = fake.calls_of("backup")
    assert [c.consistency for c in calls] == [Consistency.LINEARIZABLE, Consistency.STALE]
    assert calls[1].timeout_s == 2.0


@pytest.mark.parametrize(("error", "status", "code"), [
    (ReadTimeoutError("no quorum"), 504, "read_timeout"),
    (NoLeaderError("no leader"), 503, "no_leader"),
    (UnavailableError("2 backups are streaming"), 503, "unavailable"),
])
def test_snapshot_failures_answer_json_errors(client: TestClient, fake: FakeService,
                                              error: Exception, status: int, code: str) -> None:
    fake.fail_next.append(error)
    result = client.simulate_get("/snapshot")
    assert result.status_code == status
    assert result.json["error"] == code


def test_snapshot_rejects_an_unknown_consistency(client: TestClient) -> None:
    result = client.simulate_get("/snapshot", params={"consistency": "eventual"})
    assert result.status_code == 400 and result.json["error"] == "invalid_field"


@pytest.fixture
def served(fake: FakeService) -> Iterator[str]:
    handle = serve(create_app(fake), "127.0.0.1", 0, threads=2)
    thread = threading.Thread(target=handle.run, daemon=True)
    thread.start()
    try:
        yield handle.url
    finally:
        handle.close()
        thread.join(10)


def test_client_downloads_the_snapshot_stream_in_chunks(served: str,
                                                        fake: FakeService) -> None:
    with Client([served]) as kv, kv.download_snapshot(chunk_bytes=64) as download:
        chunks = list(download.chunks)
        assert (download.index, download.checksum_algorithm) == (30, "blake2b-256")
    data = expected_snapshot(fake)
    assert b"".join(chunks) == data and len(chunks) == -(-len(data) // 64)
    assert (download.checksum, download.length_bytes) == (checksum_of(data), len(data))


def test_client_retries_a_snapshot_while_there_is_no_leader_then_gives_up(
        served: str, fake: FakeService) -> None:
    fake.fail_with = NoLeaderError("no leader yet")
    kv = Client([served], retries=2, sleep=lambda _s: None)
    with pytest.raises(Unavailable), kv.download_snapshot():
        pass
    assert len(fake.calls_of("backup")) == 3


# --------------------------------------------------------------------------- watches
def test_watch_passes_key_index_and_a_30_second_default_timeout(client: TestClient,
                                                                fake: FakeService) -> None:
    client.simulate_get("/keys/k01/", params={"wait": "true", "index": "0"})
    client.simulate_get("/keys/k01", params={"wait": "true", "timeout": "0.5"})
    calls = fake.calls_of("watch")
    assert [(c.key, c.after_index, c.timeout_s) for c in calls] == [
        ("k01", 0, 30.0), ("k01", None, 0.5)]
    assert not fake.calls_of("get")


def test_watch_answers_the_value_index_and_whether_it_changed(client: TestClient) -> None:
    changed = client.simulate_get("/keys/k05", params={"wait": "true", "index": "1"})
    assert changed.status_code == 200
    assert changed.json == {"value": {"i": 5}, "index": 6, "changed": True}
    unchanged = client.simulate_get("/keys/k05", params={"wait": "true", "index": "6"})
    assert unchanged.json == {"value": {"i": 5}, "index": 6, "changed": False}


def test_watch_of_an_absent_key_answers_deleted(client: TestClient) -> None:
    result = client.simulate_get("/keys/missing", params={"wait": "true"})
    assert result.status_code == 200
    assert result.json == {"deleted": True, "index": 30, "changed": False}


@pytest.mark.parametrize("params", [
    {"wait": "true", "index": "-1"},
    {"wait": "true", "index": "x"},
    {"wait": "true", "timeout": "61"},
    {"wait": "true", "timeout": "0"},
    {"wait": "maybe"},
])
def test_watch_rejects_bad_parameters(client: TestClient, fake: FakeService,
                                      params: dict[str, str]) -> None:
    result = client.simulate_get("/keys/k01", params=params)
    assert result.status_code == 400 and result.json["error"] == "invalid_field"
    assert not fake.calls_of("watch")


def test_watch_refused_for_lack_of_room_answers_503_with_retry_after(
        client: TestClient, fake: FakeService) -> None:
    fake.fail_next.append(UnavailableError("this node serves 16 watches already"))
    result = client.simulate_get("/keys/k01", params={"wait": "true"})
    assert result.status_code == 503 and result.headers["retry-after"] == "1"


def test_get_without_wait_is_a_plain_read(client: TestClient, fake: FakeService) -> None:
    result = client.simulate_get("/keys/k01", params={"wait": "false", "index": "3"})
    assert result.json == {"value": {"i": 1}, "index": 2}
    assert not fake.calls_of("watch")


# --------------------------------------------------------------------------- /alarms
def test_alarms_lists_the_raised_alarms_and_delete_disarms_them(
        client: TestClient, fake: FakeService) -> None:
    assert client.simulate_get("/alarms").json == {"alarms": []}
    fake.raised_alarms.append(Alarm("n2", "quota", 41))
    assert client.simulate_get("/alarms/").json == {
        "alarms": [{"alarm": "NOSPACE", "node": "n2", "cause": "quota", "index": 41}]}
    result = client.simulate_delete("/alarms", params={"timeout": "3"})
    assert result.status_code == 200 and result.json["disarmed"] is True
    assert fake.calls_of("disarm_alarms")[0].timeout_s == 3.0
    assert client.simulate_get("/alarms").json == {"alarms": []}


def test_a_write_refused_for_want_of_space_is_507_storage_full(
        client: TestClient, fake: FakeService) -> None:
    fake.fail_next.append(StorageFullError("the NOSPACE alarm is raised (n2: quota)"))
    result = client.simulate_put("/keys/k", json={"value": 1})
    assert result.status_code == 507
    assert result.json["error"] == "storage_full"
    assert "NOSPACE" in result.json["message"]


def test_a_refused_membership_change_is_409_with_the_reason(client: TestClient,
                                                            fake: FakeService) -> None:
    fake.fail_next.append(MembershipChangeError("remove n2 would leave 1 started, caught-up "
                                                "voter(s) (n1) of the 2 ..."))
    result = client.simulate_delete("/cluster/members/n2")
    assert result.status_code == 409
    assert result.json["error"] == "membership_change_rejected"
    assert "caught-up" in result.json["message"]
    assert "probe" not in result.json


def test_a_join_whose_probe_found_another_node_is_409_marked_as_a_mismatch(
        client: TestClient, fake: FakeService) -> None:
    """The mark a joining node stops on (other 409s of a join may pass: it asks again)."""
    fake.fail_next.append(MembershipChangeError("the node at h:1 answers as n5, not n4",
                                                probe="mismatch"))
    result = client.simulate_post("/cluster/join", json={"id": "n4", "address": "h:1"})
    assert result.status_code == 409
    assert result.json["error"] == "membership_change_rejected"
    assert result.json["probe"] == "mismatch"
    assert "answers as n5, not n4" in result.json["message"]
