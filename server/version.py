"""The package's version: pyproject.toml is the one source, read back from the installed distribution."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "loraplex"
UNKNOWN = "0+unknown"  # a checkout run without `pip install -e .` has no distribution metadata


def package_version() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return UNKNOWN
