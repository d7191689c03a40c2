"""Adapter validation against the base model: every bad input is refused with a message naming it."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from adapters_store.errors import InvalidAdapter, InvalidAdapterName
from adapters_store.names import check_name
from adapters_store.peft_format import WEIGHTS_FILE, AdapterManifest, TensorInfo, bind, read_manifest
from adapters_store.tensors import read_tensors
from adapters_store.validation import validate
from server.engine.builder import base_model_spec
from server.lora.weights import load_weights
from server.model.architecture import ModelShape
from tests.helpers.tiny import AdapterSpec, edit_adapter, make_adapter, make_model

TARGETS = ("q_proj", "v_proj", "down_proj")


@pytest.fixture(scope="module")
def base():
    return make_model("llama", 320, seed=3)


@pytest.fixture(scope="module")
def spec(base):
    return base_model_spec(ModelShape.from_config(base.config))


@pytest.fixture(scope="module")
def good(base, tmp_path_factory):
    return make_adapter(base, AdapterSpec("good", 8, 16, TARGETS), tmp_path_factory.mktemp("a"), seed=0)


def _copy(good, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(good, out)
    return out


def test_good_adapter_binds_with_peft_scaling(good, spec):
    binding = bind(read_manifest(good), spec, max_rank=16)
    assert binding.target_modules == sorted(TARGETS)
    assert len(binding.modules) == 2 * 3  # 2 layers x 3 projections
    assert all(m.rank == 8 and m.scale == 2.0 for m in binding.modules)


def test_rslora_and_rank_pattern_scales(base, spec, tmp_path):
    s = AdapterSpec("p", 4, 8, ("q_proj", "o_proj"), rslora=True, rank_pattern={"o_proj": 9})
    binding = bind(read_manifest(make_adapter(base, s, tmp_path, seed=1)), spec, max_rank=16)
    by_proj = {m.module.rsplit(".", 1)[1]: m for m in binding.modules}
    assert by_proj["q_proj"].rank == 4 and math.isclose(by_proj["q_proj"].scale, 8 / 2)
    assert by_proj["o_proj"].rank == 9 and math.isclose(by_proj["o_proj"].scale, 8 / 3)


def test_rank_above_the_server_limit(good, spec):
    with pytest.raises(InvalidAdapter, match=r"rank 8 .* exceeds the server's --max-lora-rank 4"):
        bind(read_manifest(good), spec, max_rank=4)


def test_adapter_for_a_model_with_other_sizes(base, spec, tmp_path):
    """Same family, same base_model_name_or_path, other shapes: refused by shape."""
    wide = LlamaForCausalLM(LlamaConfig(**{**base.config.to_dict(), "hidden_size": 128}))
    path = make_adapter(wide, AdapterSpec("wide", 4, 8, ("q_proj",)), tmp_path, seed=2)
    with pytest.raises(InvalidAdapter, match=r"shape mismatch at model\.layers\.0\.self_attn\.q_proj"):
        bind(read_manifest(path), spec, max_rank=16)


def test_module_the_base_model_lacks(good, spec, tmp_path):
    folder = _copy(good, tmp_path)

    def add_layer(t):
        for k in list(t):
            if "layers.1." in k:
                t[k.replace("layers.1.", "layers.7.")] = t[k].clone()

    edit_adapter(folder, tensors=add_layer)
    with pytest.raises(InvalidAdapter, match=r"model\.layers\.7\..* does not exist"):
        bind(read_manifest(folder), spec, max_rank=16)


def test_pickle_bin_is_refused(good, spec, tmp_path):
    folder = _copy(good, tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    torch.save({}, folder / "adapter_model.bin")
    with pytest.raises(InvalidAdapter, match="pickle"):
        read_manifest(folder)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(use_dora=True), "DoRA"),
        (lambda c: c.update(modules_to_save=["lm_head"]), "modules_to_save"),
        (lambda c: c.update(peft_type="IA3"), "peft_type"),
        (lambda c: c.pop("peft_type"), "no peft_type"),
        (lambda c: c.update(alora_invocation_tokens=[1, 2]), "activated LoRA"),
        (lambda c: c.update(target_parameters=["mlp.experts"]), "target_parameters"),
        (lambda c: c.update(layer_replication=[[0, 2]]), "layer replication"),
        (lambda c: c.update(trainable_token_indices=[5]), "trainable tokens"),
        (lambda c: c.update(lora_bias=True), "LoRA bias"),
        (lambda c: c.update(fan_in_fan_out=True), "fan_in_fan_out"),
        (lambda c: c.update(r=-1), "r must be a positive number"),
        (lambda c: c.update(r=4), "config declares rank 4"),
    ],
)
def test_unsupported_config_features(good, spec, tmp_path, edit, message):
    folder = _copy(good, tmp_path)
    edit_adapter(folder, config=edit)
    with pytest.raises(InvalidAdapter, match=message):
        bind(read_manifest(folder), spec, max_rank=64)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.update({"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 8)}),
         "embedding LoRA"),
        (lambda t: t.update({"base_model.model.lm_head.lora_A.weight": torch.zeros(8, 64),
                             "base_model.model.lm_head.lora_B.weight": torch.zeros(320, 8)}), "lm_head"),
        (lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector":
                             torch.zeros(64)}), "DoRA"),
        (lambda t: [t.pop(k) for k in list(t) if "lora_B" in k and "layers.0.self_attn.q_proj" in k],
         "has no lora_B"),
        (lambda t: [t.pop(k) for k in list(t)] and t.update({"something": torch.zeros(1)}), "not a LoRA"),
    ],
)
def test_unsupported_or_broken_tensors(good, spec, tmp_path, edit, message):
    folder = _copy(good, tmp_path)
    edit_adapter(folder, tensors=edit)
    with pytest.raises(InvalidAdapter, match=message):
        bind(read_manifest(folder), spec, max_rank=64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused(good, spec, tmp_path, dtype, bad):
    folder = _copy(good, tmp_path)

    def poison(t):
        for k in t:
            t[k] = t[k].to(dtype)
        k = sorted(k for k in t if "lora_B" in k)[-1]
        t[k][-1, -1] = bad

    edit_adapter(folder, tensors=poison)
    with pytest.raises(InvalidAdapter, match="NaN or Inf"):
        validate(folder, spec, max_rank=64)
    manifest = read_manifest(folder)
    with pytest.raises(InvalidAdapter, match="NaN or Inf"):
        load_weights(folder, manifest, bind(manifest, spec, max_rank=64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weights_load_exactly_in_their_stored_dtype(good, spec, tmp_path, dtype):
    folder = _copy(good, tmp_path)
    edit_adapter(folder, tensors=lambda t: t.update({k: v.to(dtype) for k, v in t.items()}))
    stored = load_file(folder / "adapter_model.safetensors")
    manifest = read_manifest(folder)
    binding = bind(manifest, spec, max_rank=64)
    weights = load_weights(folder, manifest, binding)
    summary = validate(folder, spec, max_rank=64)
    assert summary.rank == 8 and summary.target_modules == tuple(sorted(TARGETS)) and summary.modules == 6
    for m in binding.modules:
        assert weights.a[m.module].dtype == dtype and torch.equal(weights.a[m.module], stored[m.a_key])
        assert torch.equal(weights.bt[m.module], stored[m.b_key].T)


def test_truncated_or_garbage_files(good, spec, tmp_path):
    folder = _copy(good, tmp_path)
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidAdapter, match=r"inconsistent offsets|invalid header"):
        read_manifest(folder)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(InvalidAdapter, match="not valid JSON"):
        read_manifest(folder)


@pytest.mark.parametrize("name", ["", ".hidden", "../etc", "a/b", "a\\b", "x" * 129, "sp ace", "é"])
def test_bad_names(name):
    with pytest.raises(InvalidAdapterName):
        check_name(name)


def test_good_names():
    for name in ["a", "my-adapter_v1.2", "A" * 128]:
        assert check_name(name) == name


def _raw_file(tmp_path, parts: list[tuple[str, np.ndarray]]) -> AdapterManifest:
    """A data section holding ``parts`` back to back (no alignment padding), and its tensor table."""
    tensors, data, at = {}, b"", 0
    for key, array in parts:
        raw = array.tobytes()
        dtype = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}[array.dtype]
        tensors[key] = TensorInfo(dtype, array.shape, at, at + len(raw))
        data, at = data + raw, at + len(raw)
    (tmp_path / WEIGHTS_FILE).write_bytes(data)
    return AdapterManifest(config={}, tensors=tensors, data_offset=0)


def test_a_non_finite_value_outside_the_requested_tensors_does_not_refuse_them(tmp_path):
    manifest = _raw_file(
        tmp_path,
        [("a", np.ones(4, np.float32)), ("junk", np.full(2, np.nan, np.float32)), ("b", np.ones(4, np.float32))],
    )
    out = read_tensors(tmp_path, manifest, ["a", "b"])
    assert out["a"].tolist() == [1.0] * 4 and out["b"].tolist() == [1.0] * 4
    with pytest.raises(InvalidAdapter, match="'junk' contains NaN or Inf"):
        read_tensors(tmp_path, manifest, ["a", "junk"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_found_in_tensors_placed_off_element_boundaries(tmp_path, bad):
    # A hand-made file may pack an odd-sized fp16 tensor between fp32 ones: "b" then starts 2 bytes past
    # a 4-byte boundary, so reading the whole span as fp32 would see none of its values.
    b = np.array([1.0, bad, 1.0], np.float32)
    manifest = _raw_file(
        tmp_path,
        [
            ("a", np.ones(2, np.float32)),
            ("h", np.ones(1, np.float16)),
            ("b", b),
            ("h2", np.ones(1, np.float16)),
            ("c", np.ones(2, np.float32)),
        ],
    )
    assert manifest.tensors["b"].start % 4 == 2
    with pytest.raises(InvalidAdapter, match="'b' contains NaN or Inf"):
        read_tensors(tmp_path, manifest, ["a", "b", "c"])
    assert read_tensors(tmp_path, manifest, ["a", "c"])["c"].tolist() == [1.0, 1.0]
