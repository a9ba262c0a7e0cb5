"""The etcd comparison installs etcd only where it may (root with apt) and only when missing;
scripts/apt-install.sh refuses what it cannot do. Fakes stand in for apt: nothing is installed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from benchmarks import clusters

ROOT = Path(__file__).resolve().parents[2]


class FakeMachine:
    """shutil.which, os.geteuid and subprocess.run as clusters.install_etcd sees them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, etcd: bool, root: bool,
                 apt: bool, install_works: bool = True) -> None:
        self.etcd, self.apt, self.install_works = etcd, apt, install_works
        self.runs: list[list[str]] = []
        monkeypatch.setattr(shutil, "which", self.which)
        monkeypatch.setattr(os, "geteuid", lambda: 0 if root else 1000)
        monkeypatch.setattr(subprocess, "run", self.run)

    def which(self, name: str) -> str | None:
        have = {"etcd": self.etcd, "apt-get": self.apt}.get(name, False)
        return f"/usr/bin/{name}" if have else None

    def run(self, argv: list[str], **_kwargs: Any) -> subprocess.CompletedProcess[str]:
        self.runs.append(argv)
        self.etcd = self.install_works
        return subprocess.CompletedProcess(argv, 0 if self.install_works else 100)


def test_an_installed_etcd_is_used_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    machine = FakeMachine(monkeypatch, etcd=True, root=True, apt=True)
    assert clusters.install_etcd() == "/usr/bin/etcd"
    assert machine.runs == []


@pytest.mark.parametrize(("root", "apt"), [(False, True), (True, False)])
def test_without_root_or_apt_nothing_is_installed(monkeypatch: pytest.MonkeyPatch, root: bool,
                                                  apt: bool) -> None:
    machine = FakeMachine(monkeypatch, etcd=False, root=root, apt=apt)
    assert clusters.install_etcd() is None
    assert machine.runs == []


def test_root_with_apt_installs_etcd_server_through_the_apt_script(
        monkeypatch: pytest.MonkeyPatch) -> None:
    machine = FakeMachine(monkeypatch, etcd=False, root=True, apt=True)
    assert clusters.install_etcd() == "/usr/bin/etcd"
    assert machine.runs == [["bash", str(ROOT / "scripts" / "apt-install.sh"), "etcd-server"]]


def test_a_failed_install_leaves_no_etcd(monkeypatch: pytest.MonkeyPatch) -> None:
    machine = FakeMachine(monkeypatch, etcd=False, root=True, apt=True, install_works=False)
    assert clusters.install_etcd() is None
    assert len(machine.runs) == 1


def test_the_apt_script_wants_packages_and_root(tmp_path: Path) -> None:
    script = str(ROOT / "scripts" / "apt-install.sh")
    usage = subprocess.run(["bash", script], capture_output=True, text=True, check=False)
    assert usage.returncode == 2 and "usage" in usage.stderr
    # No apt-get on PATH (an empty directory; bash found by its full path): refused, said why.
    env = {**os.environ, "PATH": str(tmp_path)}
    refused = subprocess.run(["/bin/bash", script, "etcd-server"], capture_output=True,
                             text=True, env=env, check=False)
    assert refused.returncode == 1
    assert "install etcd-server yourself" in refused.stderr
