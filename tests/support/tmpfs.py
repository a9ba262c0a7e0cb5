"""Small tmpfs mounts for tests of a full disk (root only)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def can_mount_tmpfs(where: Path) -> str | None:
    """Why a tmpfs cannot be mounted here, or None."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    if shutil.which("mount") is None:
        return "no mount command"
    where.mkdir(parents=True, exist_ok=True)
    probe = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"cannot mount a tmpfs: {probe.stderr.strip()}"
    subprocess.run(["umount", str(where)], check=True)
    return None
