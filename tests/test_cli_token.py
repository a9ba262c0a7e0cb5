"""`raftkv token generate` (raftkv/cli.py): the helper every "no cluster token" message
points to, and what `make run` / `make up` use to keep one token per cluster."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from raftkv.cli import EXIT_OK, EXIT_USAGE, main
from raftkv.settings import check_cluster_token


def test_generate_prints_a_usable_token(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "generate"]) == EXIT_OK
    token = capsys.readouterr().out.strip()
    check_cluster_token(token)


def test_generate_into_a_file_makes_it_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / ".cluster-token"
    assert main(["token", "generate", "--file", str(path)]) == EXIT_OK
    token = path.read_text().strip()
    check_cluster_token(token)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert main(["token", "generate", "--file", str(path)]) == EXIT_OK
    assert path.read_text().strip() == token  # kept: one token per cluster


def test_generate_refuses_to_keep_a_file_without_a_usable_token(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / ".cluster-token"
    path.write_text("short\n")
    assert main(["token", "generate", "--file", str(path)]) == EXIT_USAGE
    assert "too short" in capsys.readouterr().err
    assert path.read_text() == "short\n"


@pytest.mark.parametrize(("argv", "said"), [
    (["token", "generate", "--role", "admin"], "--role is for create"),
    (["token", "generate", "--prefix", "a/"], "--prefix is for create"),
    (["token", "generate", "t1"], "a token id is for revoke"),
    (["token", "generate", "--json"], "--json is for list"),
    (["token", "list", "--role", "read"], "--role is for create"),
    (["token", "revoke", "t1", "--file", "x"], "--file is for generate"),
    (["token", "create", "t1", "--role", "read"], "a token id is for revoke"),
])
def test_an_option_of_another_action_is_a_usage_error_not_ignored(
        argv: list[str], said: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`token generate --role admin` used to print a cluster token as if the role meant
    something; no request is sent and nothing is printed to stdout."""
    assert main(argv) == EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == ""
    assert said in err
