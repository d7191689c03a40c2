"""GGUF files for llama-server, converted once with llama.cpp's own scripts and cached by their inputs.

* the base model: a transformers folder of the default model (loraplex's safetensors conversion of the shipped
  GGUF, plus the tokenizer read from that GGUF), converted by ``convert_hf_to_gguf.py --outtype f32|bf16|q8_0``;
  ``q4_1`` is the shipped GGUF itself, served as it is;
* adapters: PEFT folders converted by ``convert_lora_to_gguf.py --base <that folder>``.

Every file's name carries a key over its inputs (the shipped GGUF's path, size and mtime; an adapter's bytes; the
output type; the scripts' version), so a changed input makes a new file and an unchanged one is reused. Files are
written under a temporary name and renamed, so an interrupted conversion never passes for a finished one. The
scripts run with this Python (torch, transformers, safetensors); each puts its own ``gguf-py`` first on its path,
and ``convert-deps/`` of the build folder adds what they import beyond our venv (sentencepiece).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from loadtests.llama_cpp.locate import LlamaCpp

log = logging.getLogger("loadtests.llama_cpp.convert")

BASE_OUTTYPES = ("f32", "bf16", "q8_0")  # made by convert_hf_to_gguf.py
SHIPPED = "q4_1"  # the default model's own GGUF (SmolLM2-135M-Instruct.Q4_1.gguf)
PRECISIONS = (*BASE_OUTTYPES, SHIPPED)
ADAPTER_OUTTYPES = ("f32", "bf16", "q8_0")  # convert_lora_to_gguf.py --outtype
HF_FILES = ("config.json", "generation_config.json", "model.safetensors")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
HEARTBEAT_S = 10.0


def digest(*parts: str) -> str:
    """A short key over ``parts`` (order matters)."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def file_stamp(path: Path) -> str:
    """A large file's identity without reading it: resolved path, size, mtime (as loraplex keys its own cache)."""
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def content_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def base_key(hf_key: str, precision: str, version: str) -> str:
    return digest("base", hf_key, precision, version)


def adapter_key(adapter: Path, outtype: str, hf_key: str, version: str) -> str:
    """Over the adapter's config and weights (their bytes), the output type, the base and the scripts' version."""
    return digest("lora", *(content_digest(adapter / name) for name in ADAPTER_FILES), outtype, hf_key, version)


def convert_base_cmd(python: str, llama: LlamaCpp, hf_dir: Path, outtype: str, outfile: Path) -> list[str]:
    if outtype not in BASE_OUTTYPES:
        raise ValueError(f"base outtype {outtype!r}: choose from {', '.join(BASE_OUTTYPES)}")
    return [python, str(llama.convert_hf), str(hf_dir), "--outtype", outtype, "--outfile", str(outfile)]


def convert_lora_cmd(
    python: str, llama: LlamaCpp, adapter: Path, hf_dir: Path, outtype: str, outfile: Path
) -> list[str]:
    if outtype not in ADAPTER_OUTTYPES:
        raise ValueError(f"adapter outtype {outtype!r}: choose from {', '.join(ADAPTER_OUTTYPES)}")
    return [
        python,
        str(llama.convert_lora),
        "--base",
        str(hf_dir),
        "--outtype",
        outtype,
        "--outfile",
        str(outfile),
        str(adapter),
    ]


def staging(target: Path) -> Path:
    """Where a conversion writes before its file is renamed to ``target``."""
    return target.with_name(target.name + ".tmp")


def run_script(cmd: list[str], target: Path, label: str, python_path: Path | None = None) -> Path:
    """Run a conversion ``cmd`` that writes ``staging(target)``, then rename that to ``target``.

    Its output goes to ``<target>.log``; a line every ``HEARTBEAT_S`` seconds says it is still running; a failure
    raises with the log's tail. ``python_path`` goes first on the script's PYTHONPATH.
    """
    tmp = staging(target)
    env = dict(os.environ)
    if python_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(python_path), env.get("PYTHONPATH")) if p)
    log_path = target.with_name(target.name + ".log")
    started = time.monotonic()
    log.info("converting %s -> %s", label, target.name)
    with log_path.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        while True:
            try:
                proc.wait(HEARTBEAT_S)
                break
            except subprocess.TimeoutExpired:
                log.info("  still converting %s (%.0f s)", label, time.monotonic() - started)
    if proc.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{label}: {cmd[1]} exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
    os.replace(tmp, target)
    log.info("converted %s in %.1f s", label, time.monotonic() - started)
    return target


@dataclass(frozen=True)
class GgufCache:
    """Converted files under ``folder``, made by ``llama``'s scripts run with ``python``."""

    folder: Path
    llama: LlamaCpp
    python: str = sys.executable

    def hf_model(self) -> tuple[Path, str]:
        """(a transformers folder of the default model with its tokenizer, its key), made when missing."""
        from server.model.default_model import default_gguf_path

        gguf = default_gguf_path()
        key = digest("hf", file_stamp(gguf))
        target = self.folder / f"hf-{gguf.stem}-{key}"
        if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
            return target, key
        self._make_hf_model(gguf, target)
        return target, key

    def _make_hf_model(self, gguf: Path, target: Path) -> None:
        from transformers import AutoTokenizer

        from loadtests.bench.common import CACHE_DIR
        from server.model.loading import gguf_cache

        log.info("a transformers folder of %s for the conversion scripts: %s", gguf.name, target)
        source = gguf_cache(gguf, CACHE_DIR)  # loraplex's own conversion (once; about 20 s)
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".hf-", dir=self.folder))
        try:
            for name in HF_FILES:
                if (source / name).is_file():
                    _link_or_copy(source / name, tmp / name)
            AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def base(self, precision: str) -> Path:
        """The base model's GGUF at ``precision`` (one of ``PRECISIONS``), converted when missing."""
        if precision == SHIPPED:
            from server.model.default_model import default_gguf_path

            return default_gguf_path()
        hf_dir, hf_key = self.hf_model()
        target = self.folder / f"base-{precision}-{base_key(hf_key, precision, self.llama.version)}.gguf"
        if target.is_file():
            return target
        cmd = convert_base_cmd(self.python, self.llama, hf_dir, precision, staging(target))
        return run_script(cmd, target, f"the base model ({precision})", self.llama.convert_deps)

    def adapters(self, folders: list[Path], outtype: str) -> list[Path]:
        """Each PEFT folder's GGUF, in order, converted when missing."""
        hf_dir, hf_key = self.hf_model()
        out = []
        for i, adapter in enumerate(folders, 1):
            key = adapter_key(adapter, outtype, hf_key, self.llama.version)
            target = self.folder / f"adapter-{adapter.name}-{outtype}-{key}.gguf"
            if not target.is_file():
                cmd = convert_lora_cmd(self.python, self.llama, adapter, hf_dir, outtype, staging(target))
                label = f"adapter {adapter.name} ({outtype}, {i}/{len(folders)})"
                run_script(cmd, target, label, self.llama.convert_deps)
            out.append(target)
        return out


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
