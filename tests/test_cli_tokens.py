"""`raftkv token create|list|revoke` and the client commands' token options (--token,
--token-file, RAFTKV_TOKEN, RAFTKV_TOKEN_FILE), against one node with auth served over real
HTTP (tests/support/single_node.py); the commands run in this process (`raftkv.cli.main`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from raftkv.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from tests.support.single_node import SingleNodeService, serving

ROOT = "root-" + "q" * 40


@pytest.fixture
def url() -> Iterator[str]:
    with serving(SingleNodeService(root_token=ROOT)) as address:
        yield address


@pytest.fixture(autouse=True)
def no_token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RAFTKV_TOKEN", "RAFTKV_TOKEN_FILE", "RAFTKV_CACERT", "RAFTKV_CERT",
                 "RAFTKV_KEY"):
        monkeypatch.delenv(name, raising=False)


def run(capsys: pytest.CaptureFixture[str], url: str, *argv: str) -> tuple[int, str, str]:
    code = main([*argv, "--urls", url])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_token_lifecycle(capsys: pytest.CaptureFixture[str], url: str,
                         monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    code, out, err = run(capsys, url, "token", "create", "--role", "write", "--prefix", "app/",
                         "--prefix", "b/", "--token", ROOT)
    assert code == EXIT_OK, err
    made = json.loads(out)
    assert made["role"] == "write" and made["prefixes"] == ["app/", "b/"]
    secret, token_id = made["token"], made["token_id"]
    assert "shown this once" in err and secret not in err
    monkeypatch.setenv("RAFTKV_TOKEN", secret)
    assert run(capsys, url, "put", "app/k", "1")[0] == EXIT_OK
    code, _, err = run(capsys, url, "put", "other", "1")
    assert code == EXIT_FAILED and "403 forbidden" in err
    monkeypatch.delenv("RAFTKV_TOKEN")
    token_file = tmp_path / "admin.token"
    token_file.write_text(ROOT + "\n")
    code, out, _ = run(capsys, url, "token", "list", "--token-file", str(token_file))
    assert code == EXIT_OK
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "ROLE", "PREFIXES", "CREATED"]
    assert any(line.split()[:3] == [token_id, "write", "app/,b/"] for line in lines)
    assert any(line.split()[:3] == ["root", "admin", "*"] for line in lines)
    assert secret not in out
    monkeypatch.setenv("RAFTKV_TOKEN_FILE", str(token_file))
    code, out, _ = run(capsys, url, "token", "list", "--json")
    assert code == EXIT_OK and {t["token_id"] for t in json.loads(out)} == {"root", token_id}
    code, out, _ = run(capsys, url, "token", "revoke", token_id)
    assert code == EXIT_OK and json.loads(out)["token_id"] == token_id
    code, _, err = run(capsys, url, "get", "app/k", "--token", secret)
    assert code == EXIT_FAILED and "401 unauthenticated" in err and secret not in err


def test_usage_and_auth_errors(capsys: pytest.CaptureFixture[str], url: str,
                               tmp_path: Path) -> None:
    assert run(capsys, url, "token", "create", "--token", ROOT)[0] == EXIT_USAGE
    assert run(capsys, url, "token", "revoke", "--token", ROOT)[0] == EXIT_USAGE
    assert run(capsys, url, "token", "list", "--prefix", "a", "--token", ROOT)[0] == EXIT_USAGE
    code, _, err = run(capsys, url, "token", "list")
    assert code == EXIT_FAILED and "401" in err
    code, _, err = run(capsys, url, "get", "k", "--token-file", str(tmp_path / "absent"))
    assert code == EXIT_USAGE and "cannot read the token file" in err
