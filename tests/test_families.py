"""Every family on a config with its real quirks (tests/families.py), through the CLI, on both backends where both
apply; then, independently of lora-export's parity code, the graph against PEFT's forward.

Tolerances (fp32 graphs): the largest |logit difference| over the prompt pass and 15 cached decode steps of a
padded batch of 2, divided by the reference logits' largest magnitude, <= 1e-4; and each prompt's 32-token greedy
continuation identical. A family tested here leaves no ``family`` note in the manifest.

Then the fixes lora-export applies to the builder (export/builder_fixes.py), each taken away: the graph is wrong
(or the builder fails), and lora-export's own gate says FAIL, never PASS. If a builder upgrade mends one, its test
here fails and says which fix to drop.
"""

from __future__ import annotations

import json
import os

import pytest

from lora_export.cli import main
from lora_export.families import TESTED, builder_architectures, check_family

from .families import BY_NAME, FAMILIES, independent_check, make_adapter, make_family
from .conftest import tiered

TARGET = {"genai-builder": "ort-cpu-fp32", "torch-dynamo": "ort-cpu-fp32-generic"}
CASES = [(f.name, b) for f in FAMILIES for b in f.backends]
IDS = [f"{n}-{b}" for n, b in CASES]
TOLERANCE = 1e-4


def _export(family, backend, tmp_path, capsys=None):
    base = make_family(family, tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter")
    out = tmp_path / "onnx"
    rc = main(["export", "--base", str(base), "--adapter", str(adapter), "--target", TARGET[backend],
               "--out", str(out)])
    return rc, base, adapter, out


@pytest.mark.parametrize("name, backend", tiered(CASES, IDS, slow={i for i in IDS if i != "llama-3.2-genai-builder"}))
def test_family_exports_right_through_the_cli(name, backend, tmp_path):
    family = BY_NAME[name]
    rc, base, adapter, out = _export(family, backend, tmp_path)
    assert rc == 0, f"{name} on {backend}: the export's parity gate did not PASS (exit {rc})"
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert manifest["parity"]["passed"] and "family" not in manifest
    result = independent_check(out, base, adapter, family.prompts)
    print(f"\n{name} [{backend}] ({family.quirks}): max relative logit difference {result['max_rel_diff']:.2e}, "
          f"greedy 32 tokens identical: {result['greedy_identical']}")
    if os.environ.get("LORA_EXPORT_FAMILY_RESULTS"):  # README's family table is made from these lines
        with open(os.environ["LORA_EXPORT_FAMILY_RESULTS"], "a") as f:
            f.write(json.dumps({"family": name, "backend": backend, **result}) + "\n")
    assert result["max_rel_diff"] <= TOLERANCE
    assert result["greedy_identical"]


def test_every_tested_family_has_a_quirk_config():
    for backend, archs in TESTED.items():
        covered = {f.arch for f in FAMILIES if backend in f.backends}
        assert set(archs) - {"GPT2LMHeadModel", "OPTForCausalLM"} <= covered, backend  # those two: test_backends
    assert set(TESTED["genai-builder"]) <= set(builder_architectures())


def test_the_builder_list_is_read_from_the_installed_builder():
    archs = builder_architectures()
    assert {"LlamaForCausalLM", "Gemma2ForCausalLM", "GraniteForCausalLM", "SmolLM3ForCausalLM"} <= set(archs)
    assert "GPTNeoXForCausalLM" not in archs


def _config(arch, **extra):
    return {"architectures": [arch], "model_type": "x", **extra}


def test_untested_families_go_through_with_a_note_and_the_rest_are_refused():
    from lora_export.errors import BadInput

    assert check_family(_config("LlamaForCausalLM"), "genai-builder", "c") is None
    note = check_family(_config("NemotronForCausalLM"), "genai-builder", "c")
    assert "not among the families tested by lora-export" in note and "parity verdict is the proof" in note
    assert "torch.onnx" in check_family(_config("StableLmForCausalLM"), "torch-dynamo", "c")
    with pytest.raises(BadInput, match="not built by the installed onnxruntime-genai.*ort-cpu-fp32-generic"):
        check_family(_config("GPTNeoXForCausalLM"), "genai-builder", "c")
    for arch, extra in (("MixtralForCausalLM", {"num_local_experts": 8}), ("Qwen3MoeForCausalLM", {"num_experts": 128}),
                        ("GptOssForCausalLM", {"num_local_experts": 32})):
        for backend in TESTED:
            with pytest.raises(BadInput, match="mixture-of-experts"):
                check_family(_config(arch, **extra), backend, "c")
    with pytest.raises(BadInput, match="multimodal"):
        check_family(_config("Gemma3ForConditionalGeneration"), "genai-builder", "c")
    with pytest.raises(BadInput, match="mixture-of-experts"):  # DBRX keeps its experts in ffn_config
        check_family(_config("DbrxForCausalLM", ffn_config={"moe_num_experts": 16}), "torch-dynamo", "c")
    with pytest.raises(BadInput, match="mixture-of-experts"):  # a count the wrong type is still a count
        check_family(_config("LlamaForCausalLM", num_local_experts="8"), "torch-dynamo", "c")
    assert check_family(_config("LlamaForCausalLM", text_config="abc"), "genai-builder", "c") is None
    with pytest.raises(BadInput, match="names no architectures"):
        check_family({"model_type": "llama"}, "genai-builder", "c")
    assert "parity verdict is the proof" in check_family({"model_type": "llama"}, "torch-dynamo", "c")
    with pytest.raises(BadInput, match="rope type 'dynamic'.*ort-cpu-fp32-generic"):
        check_family(_config("LlamaForCausalLM", rope_scaling={"type": "dynamic", "factor": 2.0}), "genai-builder", "c")
    # a config that names remote code: the refusals still apply, the rest waits for transformers' own message
    assert check_family(_config("MysteryForCausalLM"), "genai-builder", "c", accept=False) is None
    with pytest.raises(BadInput, match="cannot export OlmoForCausalLM right"):
        check_family(_config("OlmoForCausalLM"), "genai-builder", "c", accept=False)


def test_the_builder_reads_the_fixed_config():
    from lora_export.export.builder_fixes import config_fixes

    mistral = {"model_type": "mistral", "sliding_window": 4096, "num_hidden_layers": 3,
               "layer_types": ["full_attention"] * 3}
    assert config_fixes(mistral)["layer_types"] == ["sliding_attention"] * 3
    assert config_fixes({"model_type": "mistral", "sliding_window": None, "num_hidden_layers": 3}) == {}
    partial = {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4,
                                   "partial_rotary_factor": 0.25}}
    assert config_fixes(partial)["rope_parameters"] == {"rope_type": "default", "rope_theta": 1e4,
                                                        "partial_rotary_factor": 0.25}
    tf4 = {"rope_theta": 1e6, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}}
    fixes = config_fixes(tf4)
    assert fixes["rope_scaling"] is None and fixes["rope_parameters"] == {"rope_type": "default", "rope_theta": 1e6}
    longrope = {"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}}
    assert config_fixes(longrope)["rope_parameters"]["type"] == "longrope"


@pytest.mark.parametrize("arch, config", [
    ("MixtralForCausalLM", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
    ("Qwen3MoeForCausalLM", dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)),
])
def test_a_moe_checkpoint_is_refused_before_any_work(arch, config, tmp_path, capsys):
    from .families import Family

    family = Family("moe", arch, config, "", "")
    base = make_family(family, tmp_path / "base")
    rc = main(["export", "--base", str(base), "--adapter", str(base), "--target", "ort-cpu-fp32",
               "--out", str(tmp_path / "onnx")])
    err = capsys.readouterr().err
    assert rc == 2 and "mixture-of-experts" in err and str(base / "config.json") in err
    assert not (tmp_path / "onnx").exists()


@pytest.mark.slow
def test_an_untested_family_is_built_with_the_note_in_the_manifest(tmp_path, capsys):
    """ERNIE 4.5: dispatched by the builder, not among the families tested here. It goes through; the progress line
    and the manifest say the verdict is the proof."""
    from .families import SHAPE, Family

    family = Family("ernie-4.5", "Ernie4_5ForCausalLM", dict(SHAPE), "", "")
    rc, base, adapter, out = _export(family, "genai-builder", tmp_path)
    err = capsys.readouterr().err
    assert "not among the families tested by lora-export" in err
    assert rc == 0  # measured: ERNIE 4.5's builder graph matches transformers (a 1 here is the gate doing its job)
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert "parity verdict is the proof" in manifest["family"] and manifest["parity"]["passed"]


# --- the builder without lora-export's fixes -----------------------------------------------------------------------

WITHOUT_FIX = {
    "mistral-v0.1": "the sliding window on every layer (layer_types)",
    "llama-linear": "the rotary caches recomputed from transformers (linear scaling dropped)",
    "qwen2.5-yarn": "plain rope for the builder and the rotary caches recomputed (YaRN: the builder divides by zero)",
    "phi-3.5-long": "rope_parameters' type (the builder's Phi-3 reads only transformers 4's key)",
    "phi-3-mini-4k": "the sliding window on every layer (layer_types)",
    "gemma-2": "the exact embedding scale (the builder rounds sqrt(hidden) to 2 decimals)",
    "qwen2-swa": "full caches on sliding layers (windowed_kv_cache=false: the ring cache needs a preallocated past)",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(WITHOUT_FIX))
def test_without_our_fix_the_builder_graph_is_wrong_and_the_gate_fails(name, tmp_path, monkeypatch):
    from lora_export.export import genai_builder

    monkeypatch.setattr(genai_builder, "builder_input", lambda checkpoint, config, view: checkpoint)
    monkeypatch.setattr(genai_builder, "needs_rope_caches", lambda config: False)
    monkeypatch.setattr(genai_builder, "fix_embedding_scale", lambda config, model: False)
    monkeypatch.setattr(genai_builder, "BUILDER_OPTIONS", {"hf_remote": "false"})
    rc, *_ = _export(BY_NAME[name], "genai-builder", tmp_path)
    # 1: parity FAIL; 3: the builder itself failed. Never 0: if this is 0, the builder now builds this family right
    # without our fix, and the fix ("{WITHOUT_FIX[name]}") can go
    assert rc in (1, 3), f"the builder builds {name} right without {WITHOUT_FIX[name]}: drop that fix"


REFUSED = [(f.name, b) for f in FAMILIES for b in f.refused]


@pytest.mark.parametrize("name, backend", tiered(REFUSED, [f"{n}-{b}" for n, b in REFUSED],
                                                 slow={f"{n}-{b}" for n, b in REFUSED}))
def test_a_refused_family_is_refused_up_front_and_still_wrong(name, backend, tmp_path, capsys, monkeypatch):
    """Refused (exit 2, naming the other backend's target) before any work; with the refusal taken away, the
    backend's graph still does not PASS (1: parity FAIL, 3: it stops with an error). If this export PASSes, a
    backend upgrade mended the family: drop its entry from families.KNOWN_WRONG."""
    from lora_export import families

    family = BY_NAME[name]
    rc, *_ = _export(family, backend, tmp_path / "refused")
    err = capsys.readouterr().err
    assert rc == 2 and f"cannot export {family.arch} right" in err
    assert f"--target {TARGET[family.backends[0]]}" in err if family.backends else True
    monkeypatch.setattr(families, "KNOWN_WRONG", {})
    rc, *_ = _export(family, backend, tmp_path / "anyway")
    assert rc in (1, 3), f"{backend} now exports {name} with parity PASS: drop it from families.KNOWN_WRONG"


def test_switchable_refuses_a_family_the_builder_gets_wrong_before_any_work(tmp_path, capsys):
    family = BY_NAME["olmo"]
    base = make_family(family, tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter")
    rc = main(["export", "--base", str(base), "--adapter", str(adapter), "--target", "ort-cpu-fp32", "--switchable",
               "--out", str(tmp_path / "onnx")])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot export OlmoForCausalLM right" in err and "--target ort-cpu-fp32-generic" in err
    assert not (tmp_path / "onnx").exists()
