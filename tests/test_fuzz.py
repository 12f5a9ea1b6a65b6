"""Property-based fuzzing: any adapter_config.json, training manifest, base config.json, export manifest and
target file either loads or raises the project's own error type (BadInput), never anything else.

FUZZ_EXAMPLES sets the examples per parser: 50 by default (README's command), 500 in .ci/run, as the
hostile-inputs issue asks (about 80 s in all on 2 cores)."""

import json
import math
import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_export.adapters import load_adapter
from lora_export.errors import BadInput
from lora_export.targets import _SCHEMA, load_target, parse_target

# 50 examples in README's command, 500 in .ci/run (it sets FUZZ_EXAMPLES=500)
SETTINGS = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 50)), deadline=None,
                    suppress_health_check=list(HealthCheck))

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)
ADAPTER_KEYS = ["peft_type", "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora",
                "use_dora", "modules_to_save", "fan_in_fan_out", "task_type", "base_model_name_or_path"]
LIKELY = {"peft_type": st.sampled_from(["LORA", "IA3", "lora", ""]), "r": st.integers(-2, 64),
          "target_modules": st.one_of(st.just("all-linear"), st.lists(st.sampled_from(["q_proj", "x", ""]), max_size=3))}


def configs():
    keyed = st.fixed_dictionaries({}, optional={k: LIKELY.get(k, json_values) for k in ADAPTER_KEYS})
    return st.one_of(keyed, json_values)


@pytest.fixture(scope="module")
def adapter_copy(tiny_adapter, tmp_path_factory):
    dst = tmp_path_factory.mktemp("fuzz") / "adapter"
    shutil.copytree(tiny_adapter, dst)
    return dst


@SETTINGS
@given(config=configs())
def test_any_adapter_config_loads_or_raises_bad_input(config, adapter_copy, tiny_base):
    (adapter_copy / "adapter_config.json").write_text(json.dumps(config))
    try:
        load_adapter(adapter_copy, tiny_base, check_fingerprint=False)
    except BadInput as e:
        assert str(e)


@SETTINGS
@given(raw=st.binary(max_size=64))
def test_any_bytes_as_adapter_config(raw, adapter_copy, tiny_base):
    (adapter_copy / "adapter_config.json").write_bytes(raw)
    with pytest.raises(BadInput):
        load_adapter(adapter_copy, tiny_base, check_fingerprint=False)


toml_scalars = st.one_of(st.booleans(), st.integers(-5, 300), st.floats(allow_nan=True, allow_infinity=True),
                         st.text(max_size=10), st.lists(st.text(max_size=24), max_size=3))
field_values = {
    "runtime": st.sampled_from(["onnxruntime", "tensorrt"]),
    "execution_providers": st.lists(st.sampled_from(["CPUExecutionProvider", "CUDAExecutionProvider", "X"]), max_size=2),
    "precision": st.sampled_from(["fp32", "fp16", "bf16", "int4"]),
    "backend": st.sampled_from(["genai-builder", "dynamo"]),
    "scheme": st.sampled_from(["none", "int4", "int8", "nf4", "fp8"]),
}


def tables():
    def section(name):
        keys = [k for k in _SCHEMA[name]] + ["bogus"]
        return st.dictionaries(st.sampled_from(keys), st.one_of(toml_scalars, *[field_values.get(k, toml_scalars)
                                                                                for k in keys[:1]]), max_size=5)

    top = st.fixed_dictionaries({}, optional={k: field_values.get(k, toml_scalars) for k in _SCHEMA[""]})
    return st.builds(lambda t, q, tol, lat, extra: {**t, **extra, "quantization": q, "tolerances": tol, "latency": lat},
                     top, section("quantization"), section("tolerances"), section("latency"),
                     st.dictionaries(st.sampled_from(["quantization", "extra"]), toml_scalars, max_size=1))


@SETTINGS
@given(data=tables())
def test_any_target_table_parses_or_raises_bad_input(data):
    try:
        target = parse_target(data, "fuzz.toml")
    except BadInput as e:
        assert "fuzz.toml" in str(e)
    else:
        assert_cannot_lie(target)


def assert_cannot_lie(target):
    """A target that loads carries only finite numbers, each in the range the runtime and the checks can honour."""
    tol = target.tolerances
    for value in (tol.max_abs_diff, tol.max_rel_diff, tol.mean_kl, tol.top1_agreement, tol.min_adapter_retention):
        assert value is None or (math.isfinite(value) and value >= 0)
    assert all(v is None or v <= 1 for v in (tol.top1_agreement, tol.min_adapter_retention))
    assert 0 <= tol.greedy_tokens <= 4096 and 14 <= target.opset <= 23
    from lora_export.export import BACKENDS

    low, high = BACKENDS[target.backend].opsets
    assert low <= target.opset <= high
    assert math.isfinite(target.latency.max_ratio) and target.latency.max_ratio > 0
    block = target.quantization.block_size
    assert 16 <= block <= 4096 and block & (block - 1) == 0 and 0 <= target.quantization.accuracy_level <= 4


@SETTINGS
@given(text=st.text(max_size=200))
def test_any_target_text_loads_or_raises_bad_input(text, tmp_path_factory):
    f = tmp_path_factory.mktemp("t") / "t.toml"
    f.write_text(text)
    try:
        target = load_target(f)
    except BadInput:
        pass
    else:
        assert_cannot_lie(target)


def _mutations(real: dict):
    """The real file with keys dropped, replaced by arbitrary JSON, or added; or any JSON at all."""
    keys = sorted(real)
    changed = st.fixed_dictionaries({}, optional={k: json_values for k in keys})
    dropped = st.sets(st.sampled_from(keys))
    edits = st.builds(lambda new, gone: {**{k: v for k, v in real.items() if k not in gone}, **new}, changed, dropped)
    return st.one_of(edits, json_values)


def _nested_mutations(real: dict, key: str):
    inner = real.get(key) if isinstance(real.get(key), dict) else {}
    return st.builds(lambda value: {**real, key: value}, st.one_of(_mutations(inner), json_values))


@pytest.fixture(scope="module")
def real_manifest(tiny_adapter):
    return json.loads((tiny_adapter / "training_manifest.json").read_text())


@SETTINGS
@given(data=st.data())
def test_any_training_manifest_loads_or_raises_bad_input(data, real_manifest, adapter_copy, tiny_adapter, tiny_base):
    shutil.copy(tiny_adapter / "adapter_config.json", adapter_copy / "adapter_config.json")
    manifest = data.draw(st.one_of(_mutations(real_manifest), _nested_mutations(real_manifest, "quantization")))
    (adapter_copy / "training_manifest.json").write_text(json.dumps(manifest))
    try:
        adapter = load_adapter(adapter_copy, tiny_base, check_fingerprint=False)
    except BadInput as e:
        assert "training_manifest.json" in str(e)
    else:
        if adapter.trained_on_4bit:  # what the nf4 merge reads from it is there and usable
            from lora_export.quantized_base import quantization_of

            modules, nf4 = quantization_of(adapter)
            assert isinstance(modules, list) and nf4.quant_type in ("nf4", "fp4")


@pytest.fixture(scope="module")
def base_copy(tiny_base, tmp_path_factory):
    return shutil.copytree(tiny_base, tmp_path_factory.mktemp("fuzzbase") / "base")


@SETTINGS
@given(data=st.data())
def test_any_base_config_loads_or_raises_bad_input(data, base_copy, tiny_base):
    from lora_export.base import check_base, skeleton

    real = json.loads((tiny_base / "config.json").read_text())
    (base_copy / "config.json").write_text(json.dumps(data.draw(_mutations(real))))
    try:
        check_base(base_copy)
        skeleton(base_copy)
    except BadInput as e:
        assert "config.json" in str(e)


@SETTINGS
@given(data=st.data())
def test_any_export_manifest_is_read_or_raises_bad_input(data, fp32_export, tmp_path_factory):
    from lora_export.manifests import ExportManifest, read_export_manifest

    export = tmp_path_factory.mktemp("fuzzexport")
    real = json.loads((fp32_export.out / "export_manifest.json").read_text())
    manifest = data.draw(st.one_of(_mutations(real), _nested_mutations(real, "base"),
                                   st.builds(lambda e: {**real, "adapters": [e]}, _mutations(real["adapters"][0]))))
    (export / "export_manifest.json").write_text(json.dumps(manifest))
    try:
        m = read_export_manifest(export)
    except BadInput as e:
        assert "export_manifest.json" in str(e)
    else:  # what validate and bench read next is there, with the right types
        assert isinstance(m.target, dict) and isinstance(m.base.path, str)
        assert m.merge_base in ("nf4", "original")
        assert m.to_dict()["adapters"] and ExportManifest.from_dict(m.to_dict()) == m  # written back unchanged
        for entry in m.adapters:
            assert isinstance(entry.path, str) and isinstance(entry.adapter_model_sha256, str)


@SETTINGS
@given(text=st.text(max_size=300))
def test_any_target_file_through_the_cli_exits_0_or_2_without_a_traceback(text, tmp_path_factory, capsys):
    """The command line as a user types it: `lora-export targets show FILE` on arbitrary text."""
    from lora_export.cli import main

    f = tmp_path_factory.mktemp("cli") / "t.toml"
    f.write_text(text)
    rc = main(["targets", "show", str(f)])
    err = capsys.readouterr().err
    assert rc in (0, 2) and "Traceback" not in err, err
    assert rc == 0 or "Fix:" in err
