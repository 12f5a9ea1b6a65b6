"""Adapter checks before heavy work: every problem found and reported at once, with the file and the fix."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from lora_export.adapters import load_adapter
from lora_export.errors import BadInput

from .conftest import make_base


@pytest.fixture
def adapter_copy(tiny_adapter, tmp_path):
    dst = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, dst)
    return dst


def test_good_adapter(tiny_adapter, tiny_base):
    a = load_adapter(tiny_adapter, tiny_base)
    assert a.trained_on_4bit and len(a.targeted) == 14


def test_adapter_for_a_different_base(tiny_adapter, tmp_path):
    other = make_base(tmp_path / "wide", hidden_size=96, intermediate_size=192)
    with pytest.raises(BadInput) as e:
        load_adapter(tiny_adapter, other)
    text = str(e.value)
    assert "do not fit" in text and "different base" in text
    assert "weights differ from the base" in text  # the training manifest's fingerprint catches it too


def test_pickle_only_adapter_is_refused(adapter_copy, tiny_base):
    (adapter_copy / "adapter_model.safetensors").rename(adapter_copy / "adapter_model.bin")
    with pytest.raises(BadInput, match="pickle"):
        load_adapter(adapter_copy, tiny_base)


def test_nan_in_adapter(adapter_copy, tiny_base):
    f = adapter_copy / "adapter_model.safetensors"
    tensors = load_file(str(f))
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(f))
    with pytest.raises(BadInput, match="NaN or Inf"):
        load_adapter(adapter_copy, tiny_base, check_fingerprint=False)


def test_truncated_safetensors(adapter_copy, tiny_base):
    f = adapter_copy / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(BadInput, match="truncated or corrupt"):
        load_adapter(adapter_copy, tiny_base)


def test_malformed_config_and_unknown_type(adapter_copy, tiny_base):
    cfg = adapter_copy / "adapter_config.json"
    cfg.write_text("{not json")
    with pytest.raises(BadInput, match="not valid JSON"):
        load_adapter(adapter_copy, tiny_base)
    cfg.write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    with pytest.raises(BadInput, match="PROMPT_TUNING"):
        load_adapter(adapter_copy, tiny_base)


def test_module_names_that_match_nothing(adapter_copy, tiny_base):
    f = adapter_copy / "adapter_model.safetensors"
    tensors = {k.replace("q_proj", "query_key_value"): v for k, v in load_file(str(f)).items()}
    save_file(tensors, str(f))
    with pytest.raises(BadInput) as e:
        load_adapter(adapter_copy, tiny_base)
    assert "query_key_value does not exist in the base" in str(e.value)
    assert len(e.value.problems) == 2  # one per layer, reported together


def test_dora_magnitude_and_modules_to_save_are_checked_together(tiny_base, tmp_path):
    from .test_merge_semantics import _make_adapter

    adapter = _make_adapter(tiny_base, tmp_path / "dora", r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"],
                            modules_to_save=["lm_head"])
    assert load_adapter(adapter, tiny_base).saved == ("lm_head",)
    f = adapter / "adapter_model.safetensors"
    tensors = load_file(str(f))
    tensors["base_model.model.lm_headx.weight"] = tensors.pop("base_model.model.lm_head.weight")
    key = next(k for k in tensors if "layers.0" in k and "lora_magnitude_vector" in k)
    tensors[key] = tensors[key][:-1].contiguous()
    save_file(tensors, str(f))
    with pytest.raises(BadInput) as e:
        load_adapter(adapter, tiny_base)
    text = str(e.value)
    assert "modules_to_save entry lm_headx does not exist" in text and "DoRA magnitude (63,)" in text


def test_gpt2_conv1d_shapes_are_checked(tmp_path):
    from .test_merge_semantics import _base, _make_adapter

    base = _base("gpt2", tmp_path / "gpt2")
    adapter = _make_adapter(base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    assert len(load_adapter(adapter, base).targeted) == 2
    f = adapter / "adapter_model.safetensors"
    tensors = load_file(str(f))
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = tensors[key][:64].contiguous()  # B for a 64->64 layer, but c_attn is 64->192
    save_file(tensors, str(f))
    with pytest.raises(BadInput, match="do not fit a 64->192 layer"):
        load_adapter(adapter, base)


def test_lora_bias_is_refused(adapter_copy, tiny_base):
    cfg = adapter_copy / "adapter_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "lora_bias": True}))
    with pytest.raises(BadInput, match="lora_bias"):
        load_adapter(adapter_copy, tiny_base)


def test_a_peft_target_list_reused_across_architectures_loads(tiny_base, tmp_path):
    """PEFT needs only some target_modules names to match ('c_attn' is GPT-2's), and saves the list as given."""
    from .test_merge_semantics import _make_adapter

    adapter = _make_adapter(tiny_base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "c_attn"])
    assert {n.rsplit(".", 1)[-1] for n in load_adapter(adapter, tiny_base).targeted} == {"q_proj", "v_proj"}


def test_a_rank_pattern_is_checked_against_each_modules_tensors(tiny_base, tmp_path):
    from .test_merge_semantics import _make_adapter

    adapter = _make_adapter(tiny_base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                            rank_pattern={"v_proj": 2})
    load_adapter(adapter, tiny_base)  # PEFT's own rank_pattern agrees with its tensors
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {"v_proj": 3}
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadInput, match="rank 3 for model.layers.0.self_attn.v_proj, but its saved lora_A has rank 2"):
        load_adapter(adapter, tiny_base)


def _edit_training_manifest(adapter_dir, change):
    f = adapter_dir / "training_manifest.json"
    f.write_text(json.dumps(change(json.loads(f.read_text()))))


def test_training_manifest_versions(adapter_copy, tiny_base):
    """One version for both manifests: an adapter trained by an earlier lora-export ("schema": 1) still loads as
    the version 1 it is; a newer version, or none, is refused naming the file and the fix."""
    from lora_export.manifests import SCHEMA_VERSION, TrainingManifest

    m = json.loads((adapter_copy / "training_manifest.json").read_text())
    assert m["schema_version"] == SCHEMA_VERSION and "schema" not in m
    assert TrainingManifest.from_dict(m).to_dict() == m  # what is read is what was written

    old = {"schema": 1, **{k: v for k, v in m.items() if k != "schema_version"}}
    _edit_training_manifest(adapter_copy, lambda _: old)
    a = load_adapter(adapter_copy, tiny_base)
    assert a.manifest.schema_version == 1 and a.trained_on_4bit
    assert a.quantization.settings.blocksize == m["quantization"]["blocksize"]

    _edit_training_manifest(adapter_copy, lambda _: {**m, "schema_version": SCHEMA_VERSION + 1})
    with pytest.raises(BadInput) as e:
        load_adapter(adapter_copy, tiny_base)
    assert "training_manifest.json" in str(e.value) and "newer lora-export" in str(e.value)
    assert "upgrade lora-export" in str(e.value)

    _edit_training_manifest(adapter_copy, lambda _: {k: v for k, v in old.items() if k != "schema"})
    with pytest.raises(BadInput, match="schema_version = None"):
        load_adapter(adapter_copy, tiny_base)
