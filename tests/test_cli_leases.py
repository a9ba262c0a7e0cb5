"""`raftkv lease ...`, `raftkv put --lease/--ttl` and `raftkv lock NAME -- command` against one
node served over real HTTP (tests/support/single_node.py); the commands run in this process
(`raftkv.cli.main`), the locked commands as real child processes."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from raftkv.cli import EXIT_FAILED, EXIT_LOCK_LOST, EXIT_OK, EXIT_USAGE, main
from raftkv.client import Client
from raftkv.coordination import LOCK_PREFIX
from raftkv.localcluster import wait_until
from tests.support.single_node import SingleNodeService, serving


@pytest.fixture
def node() -> SingleNodeService:
    return SingleNodeService()


@pytest.fixture
def url(node: SingleNodeService) -> Iterator[str]:
    with serving(node) as address:
        yield address


def run(capsys: pytest.CaptureFixture[str], url: str, *argv: str) -> tuple[int, object]:
    code = main([*argv, "--urls", url])
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else None


# --------------------------------------------------------------------------- raftkv lease
def test_lease_commands_grant_keepalive_get_list_revoke(capsys: pytest.CaptureFixture[str],
                                                        url: str) -> None:
    code, granted = run(capsys, url, "lease", "grant", "30")
    assert code == EXIT_OK and isinstance(granted, dict)
    lease = granted["lease_id"]
    assert granted == {"lease_id": lease, "ttl_s": 30, "index": lease}
    code, put = run(capsys, url, "put", "k", "v", "--lease", str(lease))
    assert (code, put) == (EXIT_OK, {"index": lease + 1, "lease": lease, "value": "v"})
    assert run(capsys, url, "lease", "keepalive", str(lease)) == (
        EXIT_OK, {"lease_id": lease, "ttl_s": 30})
    code, shown = run(capsys, url, "lease", "get", str(lease))
    assert code == EXIT_OK and isinstance(shown, dict)
    assert (shown["keys"], shown["key_count"]) == (["k"], 1)
    code, listed = run(capsys, url, "lease", "list")
    assert code == EXIT_OK and isinstance(listed, list) and listed[0]["lease_id"] == lease
    assert listed[0]["key_count"] == 1 and "keys" not in listed[0]
    code, revoked = run(capsys, url, "lease", "revoke", str(lease))
    assert code == EXIT_OK and isinstance(revoked, dict) and revoked["lease_id"] == lease
    code, error = run(capsys, url, "lease", "keepalive", str(lease))
    assert code == EXIT_FAILED and isinstance(error, dict)
    assert error["error"] == "lease_not_found"
    assert run(capsys, url, "get", "k")[0] == EXIT_FAILED


def test_put_with_ttl_prints_its_own_lease(capsys: pytest.CaptureFixture[str],
                                           url: str) -> None:
    code, put = run(capsys, url, "put", "k", "1", "--ttl", "5")
    assert code == EXIT_OK and isinstance(put, dict) and put["lease"] == put["index"]


@pytest.mark.parametrize("argv", [
    ("lease", "grant"), ("lease", "revoke"), ("lease", "list", "3"),
])
def test_lease_command_with_a_missing_or_extra_argument_is_usage(
        capsys: pytest.CaptureFixture[str], url: str, argv: tuple[str, ...]) -> None:
    assert run(capsys, url, *argv)[0] == EXIT_USAGE


def test_lease_grant_out_of_range_fails_with_the_server_s_reason(
        capsys: pytest.CaptureFixture[str], url: str) -> None:
    assert main(["lease", "grant", "1", "--urls", url]) == EXIT_FAILED
    assert "ttl" in capsys.readouterr().err


# --------------------------------------------------------------------------- raftkv lock
def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_lock_runs_the_command_while_holding_the_lock_and_exits_with_its_status(
        url: str, tmp_path: Path) -> None:
    out = tmp_path / "env.json"
    script = ("import json, os, sys; json.dump({k: v for k, v in os.environ.items() "
              f"if k.startswith('RAFTKV_LOCK_')}}, open({str(out)!r}, 'w')); sys.exit(7)")
    assert main(["lock", "job", "--ttl", "5", "--urls", url, "--", *python(script)]) == 7
    env = json.loads(out.read_text())
    assert env["RAFTKV_LOCK_NAME"] == "job" and env["RAFTKV_LOCK_KEY"] == LOCK_PREFIX + "job"
    assert int(env["RAFTKV_LOCK_FENCING_TOKEN"]) > 0
    with Client([url]) as kv:
        assert kv.list(LOCK_PREFIX) == []  # released
        assert kv.leases() == []


def test_lock_holds_the_key_while_the_command_runs(url: str, tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    script = ("import os, sys, urllib.request; key = os.environ['RAFTKV_LOCK_KEY']; "
              f"body = urllib.request.urlopen({url!r} + '/keys/' + "
              "urllib.parse.quote(key, safe='')).read(); "
              f"open({str(seen)!r}, 'wb').write(body)")
    assert main(["lock", "job", "--urls", url, "--", *python(script)]) == EXIT_OK
    held = json.loads(seen.read_bytes())
    assert held["value"]["holder"] and held["lease"] > 0


def test_lock_waits_for_the_holder_to_release(node: SingleNodeService, url: str) -> None:
    codes: list[int] = []
    with Client([url]) as kv:
        holder = kv.lock("job", ttl=5)
        holder.acquire()
        thread = threading.Thread(target=lambda: codes.append(
            main(["lock", "job", "--urls", url, "--", *python("pass")])))
        thread.start()
        wait_until(lambda: len(node.watches) == 1, 10.0,
               "raftkv lock to wait on a watch")
        assert codes == []
        holder.release()
        thread.join(20)
    assert codes == [EXIT_OK]


def test_lock_that_is_lost_stops_the_command_and_exits_4(
        node: SingleNodeService, url: str, capsys: pytest.CaptureFixture[str]) -> None:
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(main(
        ["lock", "job", "--ttl", "2", "--urls", url, "--",
         *python("import time; time.sleep(60)")])))
    thread.start()
    with Client([url]) as kv:
        wait_until(lambda: bool(kv.list(LOCK_PREFIX)), 10.0,
               "the lock to be taken")
        lease = kv.get(LOCK_PREFIX + "job").lease
        assert lease is not None
        kv.lease_revoke(lease)  # as if it expired
    thread.join(30)
    assert codes == [EXIT_LOCK_LOST]
    assert "lost the lock job" in capsys.readouterr().err


def test_lock_without_a_command_is_usage(url: str) -> None:
    assert main(["lock", "job", "--urls", url, "--"]) == EXIT_USAGE
    assert main(["lock", "job", "--urls", url]) == EXIT_USAGE


def test_lock_gives_up_after_wait_seconds(url: str) -> None:
    with Client([url]) as kv, kv.lock("job", ttl=5):
        assert main(["lock", "job", "--wait", "0.2", "--urls", url, "--",
                     *python("pass")]) == EXIT_FAILED


def test_lock_of_a_command_that_does_not_exist_is_127(url: str, tmp_path: Path) -> None:
    assert main(["lock", "job", "--urls", url, "--", str(tmp_path / "nothing")]) == 127


def test_put_and_get_of_a_key_without_a_lease_print_as_before(
        capsys: pytest.CaptureFixture[str], url: str) -> None:
    code, put = run(capsys, url, "put", "k", '{"name": "Bob"}')
    assert (code, put) == (EXIT_OK, {"index": 2, "value": {"name": "Bob"}})
    assert run(capsys, url, "get", "k") == (EXIT_OK, put)
