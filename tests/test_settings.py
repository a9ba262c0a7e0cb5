"""raftkv/settings.py: the cluster token (no default, long enough, or from a file), the quota
and the snapshot cap; every bad value is a SettingsError that says what to do."""

from __future__ import annotations

from pathlib import Path

import pytest

from raftkv.settings import (
    DEFAULT_QUOTA_BYTES,
    MIN_TOKEN_CHARS,
    SettingsError,
    default_quota_bytes,
    from_sources,
    generate_token,
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
