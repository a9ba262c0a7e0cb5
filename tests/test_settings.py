"""raftkv/settings.py: the cluster token (no default, long enough, or from a file), the quota
and the snapshot cap; every bad value is a SettingsError that says what to do."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from raftkv import files
from raftkv.auth import RootTokenError, read_root_token_file
from raftkv.settings import (
    DEFAULT_QUOTA_BYTES,
    MIN_TOKEN_CHARS,
    SettingsError,
    default_quota_bytes,
    from_sources,
    generate_token,
    is_wildcard_host,
    parse_size,
)

TOKEN = "0123456789abcdef" * 4


def settings_env(**extra: str) -> dict[str, str]:
    env = {"RAFTKV_ID": "n1", "RAFTKV_DATA_DIR": "/tmp/unused", "RAFTKV_CLUSTER_TOKEN": TOKEN}
    env.update(extra)
    return {k: v for k, v in env.items() if v != "-"}


def test_a_node_needs_a_cluster_token_and_is_told_how_to_make_one() -> None:
    with pytest.raises(SettingsError) as refused:
        from_sources(None, settings_env(RAFTKV_CLUSTER_TOKEN="-"))
    message = str(refused.value)
    assert "RAFTKV_CLUSTER_TOKEN" in message and "RAFTKV_CLUSTER_TOKEN_FILE" in message
    assert "raftkv token generate" in message and "secrets.token_hex(32)" in message


@pytest.mark.parametrize("token", ["short", "x" * (MIN_TOKEN_CHARS - 1), f" {TOKEN} "])
def test_a_token_too_short_to_be_secret_is_refused_with_the_reason(token: str) -> None:
    with pytest.raises(SettingsError, match=r"too short to be secret.*guessed offline"):
        from_sources(None, settings_env(RAFTKV_CLUSTER_TOKEN=token))


@pytest.mark.parametrize("token", ["raftkv-default-insecure-token", "raftkv-compose-demo-token"])
def test_the_tokens_earlier_versions_shipped_are_refused(token: str) -> None:
    with pytest.raises(SettingsError, match="public"):
        from_sources(None, settings_env(RAFTKV_CLUSTER_TOKEN=token))


def test_the_token_can_come_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    s = from_sources(None, settings_env(RAFTKV_CLUSTER_TOKEN="-",
                                        RAFTKV_CLUSTER_TOKEN_FILE=str(path)))
    assert s.cluster_token == TOKEN
    with pytest.raises(SettingsError, match="one way only"):
        from_sources(None, settings_env(RAFTKV_CLUSTER_TOKEN_FILE=str(path)))
    with pytest.raises(SettingsError, match="cannot read it"):
        from_sources(None, settings_env(RAFTKV_CLUSTER_TOKEN="-",
                                        RAFTKV_CLUSTER_TOKEN_FILE=str(tmp_path / "nope")))


def test_generated_tokens_are_long_and_distinct() -> None:
    a, b = generate_token(), generate_token()
    assert a != b and len(a) == 64
    from_sources(None, settings_env(RAFTKV_CLUSTER_TOKEN=a))


@pytest.mark.parametrize(("raw", "size"), [("1048576", 1 << 20), ("2G", 2 << 30),
                                           ("512M", 512 << 20), ("64k", 64 << 10),
                                           ("2GiB", 2 << 30), ("1T", 1 << 40)])
def test_sizes_take_binary_suffixes(raw: str, size: int) -> None:
    assert parse_size(raw, "X") == size


@pytest.mark.parametrize("raw", ["", "G", "1.5G", "-1", "2X", "lots", "\u00b2G", "9" * 5000,
                                 "9" * 19, "9000000000T"])
def test_a_bad_size_is_refused(raw: str) -> None:
    """Also, as regressions: a superscript digit and 5,000 digits raised int()'s ValueError
    (a traceback at start), and a size past 2**63 - 1 was taken."""
    with pytest.raises(SettingsError, match="expected a size"):
        parse_size(raw, "RAFTKV_QUOTA_BYTES")


@pytest.mark.parametrize("address", ["127.0.0.1:\u00b2", "127.0.0.1:\u09ed", "127.0.0.1:65536",
                                     "127.0.0.1:" + "9" * 5000, "127.0.0.1:", "nowhere"])
def test_a_bad_listen_address_is_a_settings_error(address: str) -> None:
    """Regression: a port of non-ASCII digits raised int()'s ValueError, a traceback at
    start instead of the message that says what to fix."""
    with pytest.raises(SettingsError, match="RAFTKV_RAFT_ADDR"):
        from_sources(None, settings_env(RAFTKV_RAFT_ADDR=address))


@pytest.mark.parametrize("env", [
    {"RAFTKV_TICK_MS": "9" * 5000}, {"RAFTKV_QUOTA_BYTES": "9" * 5000},
    {"RAFTKV_RAFT_ADDR": "127.0.0.1:" + "9" * 5000}, {"RAFTKV_PEERS": "n1=" + "h" * 5000},
    {"RAFTKV_ID": "n" + "-" * 5000},
    {"RAFTKV_CLUSTER_TOKEN_FILE": "/tmp/" + "t" * 5000, "RAFTKV_CLUSTER_TOKEN": "-"},
], ids=lambda env: next(iter(env)))
def test_a_long_bad_value_is_not_echoed_whole(env: dict[str, str]) -> None:
    """A 5,000-character setting used to come back whole in its message (a screenful that
    hid the advice); the message shows its start and its length."""
    with pytest.raises(SettingsError) as refused:
        from_sources(None, settings_env(**env))
    message = str(refused.value)
    assert len(message) < 600, message
    assert next(iter(env)) in message and "characters)" in message


@pytest.mark.parametrize(("host", "wildcard"), [
    ("0.0.0.0", True), ("0", True), ("::", True), ("[::]", True), ("::ffff:0.0.0.0", True),
    ("*", True), ("127.0.0.1", False), ("n1", False), ("[::1]", False), ("10.0.0.0", False),
])
def test_wildcard_hosts_are_told_from_dialable_ones(host: str, wildcard: bool) -> None:
    assert is_wildcard_host(host) is wildcard


def test_the_quota_defaults_to_two_gib_or_an_eighth_of_memory() -> None:
    s = from_sources(None, settings_env())
    assert s.effective_quota_bytes == default_quota_bytes() <= DEFAULT_QUOTA_BYTES
    assert s.effective_max_snapshot_bytes == 2 * s.effective_quota_bytes + (64 << 20)
    s = from_sources(None, settings_env(RAFTKV_QUOTA_BYTES="64M"))
    assert s.effective_quota_bytes == 64 << 20


@pytest.mark.parametrize(("env", "message"), [
    ({"RAFTKV_QUOTA_BYTES": "1000"}, "must be 1048576"),
    ({"RAFTKV_QUOTA_BYTES": "2T"}, "must be 1048576"),
    ({"RAFTKV_QUOTA_BYTES": "64M", "RAFTKV_MAX_SNAPSHOT_BYTES": "32M"}, "below the quota"),
])
def test_a_bad_quota_or_snapshot_cap_is_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        from_sources(None, settings_env(**env))


def test_http_limits_have_sane_defaults_and_are_checked() -> None:
    s = from_sources(None, settings_env())
    assert (s.http_head_timeout_ms, s.http_max_connections_per_client) == (10_000, 128)
    with pytest.raises(SettingsError, match="RAFTKV_HTTP_HEAD_TIMEOUT_MS"):
        from_sources(None, settings_env(RAFTKV_HTTP_HEAD_TIMEOUT_MS="-1"))
    with pytest.raises(SettingsError, match="well under 1000"):
        from_sources(None, settings_env(RAFTKV_HTTP_MAX_CONNECTIONS_PER_CLIENT="1000000"))


def test_cpu_scheduling_is_batch_by_default_and_checked() -> None:
    assert from_sources(None, settings_env()).cpu_scheduling == "batch"
    assert from_sources(None, settings_env(RAFTKV_CPU_SCHEDULING="normal")).cpu_scheduling == (
        "normal")
    with pytest.raises(SettingsError, match="RAFTKV_CPU_SCHEDULING must be batch or normal"):
        from_sources(None, settings_env(RAFTKV_CPU_SCHEDULING="fifo"))


# Found by starting nodes with hostile settings: each was taken (and the node then failed
# later, hung, or listened where it should not), or ended in a traceback.
@pytest.mark.parametrize("env", [
    {"RAFTKV_HTTP_ADDR": "[]:4001"},  # listened on 0.0.0.0
    {"RAFTKV_HTTP_ADDR": "[:4001"},
    {"RAFTKV_JOIN": " 127.0.0.1:4001"},  # the join thread died, the node hung
    {"RAFTKV_JOIN": "127.0.0.1 :4001"},
    {"RAFTKV_JOIN": "https://https://127.0.0.1:4001"},
    {"RAFTKV_JOIN": "ftp://127.0.0.1:4001"},
    {"RAFTKV_PEERS": "n1=127.0.0.1:5001,n2=127.0.0.1:5001"},  # never a leader
    {"RAFTKV_PEERS": "n1==127.0.0.1:5001"},
    {"RAFTKV_PEERS": "n1=127.0.0.1:0"},
    {"RAFTKV_REQUEST_TIMEOUT_MS": "60001"},  # workers restarted for ever
    {"RAFTKV_TICK_MS": "99999999999999999999"},  # OverflowError
    {"RAFTKV_ELECTION_TICKS": "100000"},  # a one-node cluster never elected itself
    {"RAFTKV_MAP_SIZE_MB": "99999999999999999999",
     "RAFTKV_MAX_MAP_SIZE_MB": "99999999999999999999"},  # OverflowError
    {"RAFTKV_TICK_MS": "\u09ed"}, {"RAFTKV_TICK_MS": "1_000"}, {"RAFTKV_TICK_MS": "+5"},
    {"RAFTKV_DATA_DIR": " "}, {"RAFTKV_DATA_DIR": "\x01"},
    {"RAFTKV_CLUSTER_TOKEN": "\x01" * 40},
    {"RAFTKV_PEER_KEY_FILE": "/k.pem", "RAFTKV_PEER_TRUSTED_CA_FILE": "/ca.pem"},  # TLS off
], ids=repr)
def test_hostile_settings_are_refused_with_a_message(env: dict[str, str]) -> None:
    with pytest.raises(SettingsError):
        from_sources(None, settings_env(**{"RAFTKV_PEERS": "n1=127.0.0.1:5001", **env}))


def test_whole_numbers_take_surrounding_spaces_and_a_sign() -> None:
    s = from_sources(None, settings_env(RAFTKV_TICK_MS=" 20 ", RAFTKV_PERSIST_DEFER_US="0"))
    assert (s.tick_ms, s.persist_defer_us) == (20, 0)
    with pytest.raises(SettingsError, match="RAFTKV_TICK_MS must be"):
        from_sources(None, settings_env(RAFTKV_TICK_MS="-5"))


@pytest.mark.parametrize("kind", ["fifo", "directory", "huge"])
def test_a_token_file_that_is_not_a_small_regular_file_or_pipe_is_refused_at_once(
        tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: a FIFO nobody writes hung the start for ever, /dev/zero grew the node
    without end."""
    monkeypatch.setattr(files, "PIPE_DEADLINE_S", 0.2)
    path = tmp_path / "token"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"a" * (2 << 20))
    with pytest.raises(SettingsError, match="RAFTKV_CLUSTER_TOKEN_FILE"):
        from_sources(None, settings_env(RAFTKV_CLUSTER_TOKEN="-",
                                        RAFTKV_CLUSTER_TOKEN_FILE=str(path)))
    with pytest.raises(RootTokenError):
        read_root_token_file(path)


def test_a_token_can_come_through_a_pipe(tmp_path: Path) -> None:
    """`RAFTKV_CLUSTER_TOKEN_FILE=<(pass show raftkv)`: a pipe its writer fills and closes."""
    read_end, write_end = os.pipe()
    os.write(write_end, (TOKEN + "\n").encode())
    os.close(write_end)
    try:
        s = from_sources(None, settings_env(RAFTKV_CLUSTER_TOKEN="-",
                                            RAFTKV_CLUSTER_TOKEN_FILE=f"/dev/fd/{read_end}"))
    finally:
        os.close(read_end)
    assert s.cluster_token == TOKEN


def test_a_join_url_keeps_its_scheme() -> None:
    """Regression (found by a review): https://member:4001 became http://https://member:4001,
    which the settings took and the join then failed to resolve for 60 s."""
    def join_url(value: str) -> str:
        return from_sources(None, settings_env(RAFTKV_JOIN=value)).join_url

    assert join_url("127.0.0.1:4001") == "http://127.0.0.1:4001"
    assert join_url("http://127.0.0.1:4001") == "http://127.0.0.1:4001"
    assert join_url("https://member.example:443") == "https://member.example:443"


def _peers(count: int) -> str:
    return ",".join(f"n{i}=127.0.0.1:{1000 + i}" for i in range(1, count + 1))


def test_peers_may_name_as_many_members_as_a_cluster_may_have_and_no_more() -> None:
    assert len(from_sources(None, settings_env(RAFTKV_PEERS=_peers(256))).peer_map) == 256
    with pytest.raises(SettingsError, match="names 257 members: a cluster has at most 256"):
        from_sources(None, settings_env(RAFTKV_PEERS=_peers(257)))


def test_a_node_that_does_not_fsync_defers_no_save() -> None:
    """The defer keeps a leader's loop out of a fsync while acks are due: none to keep out."""
    assert from_sources(None, settings_env()).persist_defer_s == 0.0015
    unsynced = from_sources(None, settings_env(RAFTKV_UNSAFE_NO_FSYNC="true"))
    assert (unsynced.persist_defer_us, unsynced.persist_defer_s) == (1500, 0.0)
