"""The two manifests as typed records: what is read is what was written, and each reader checks the version
and says what to do with a file from another version (no model needed: synthetic files)."""

import json

import pytest

from lora_export.errors import BadInput
from lora_export.manifests import (
    EXPORT_MANIFEST,
    NOT_RECORDED,
    SCHEMA_VERSION,
    TRAINING_MANIFEST,
    ExportManifest,
    ParitySummary,
    TrainingManifest,
    read_export_manifest,
    read_training_manifest,
)

QUANT = {"quant_type": "nf4", "double_quant": True, "blocksize": 64, "compute_dtype": "float32",
         "load_dtype": "float32", "quant_storage": "uint8", "quantized_modules": ["model.layers.0.mlp.up_proj"],
         "prequantized": False}
EXPORT = {
    "schema_version": SCHEMA_VERSION,
    "base": {"path": "/b", "relative_path": "../b", "files_sha256": {"model.safetensors": "0" * 64},
             "prequantized": False},
    "adapters": [{"path": "/a", "relative_path": "../a", "weights_file": "adapter_model.safetensors",
                  "adapter_model_sha256": "1" * 64, "weight": 1.0, "quantization": {**QUANT, "sources": {"quant_type": "--bnb-quant-type"}}}],
    "target": {"name": "t"}, "merge_base": "nf4", "graph": "merged", "merged_modules": 14,
    "max_abs_weight_change": 0.5, "replaced_modules": [], "untied_embeddings": False, "versions": {"torch": "x"},
}
EXPORT["adapter"] = EXPORT["adapters"][0]


def _write(folder, name, data):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(data))
    return folder


def test_names_are_distinct():
    assert TRAINING_MANIFEST == "training_manifest.json" and EXPORT_MANIFEST == "export_manifest.json"


def test_export_manifest_round_trip(tmp_path):
    m = read_export_manifest(_write(tmp_path / "e", EXPORT_MANIFEST, EXPORT))
    assert m.to_dict() == EXPORT and ExportManifest.from_dict(m.to_dict()) == m
    assert m.adapters[0].resolved_quantization.settings.blocksize == 64 and m.base.files_sha256


def test_an_export_entry_without_a_quantization_record_says_so(tmp_path):
    old = json.loads(json.dumps(EXPORT))
    for entry in (old["adapters"][0], old["adapter"]):
        entry.pop("quantization")
    m = read_export_manifest(_write(tmp_path / "e", EXPORT_MANIFEST, old))
    assert m.adapters[0].quantization == NOT_RECORDED and "quantization" not in m.to_dict()["adapters"][0]


@pytest.mark.parametrize("version, fix", [(1, "re-export with this lora-export"), (SCHEMA_VERSION + 1, "upgrade"),
                                          ("2", "restore the export_manifest.json")])
def test_export_manifest_of_another_version(tmp_path, version, fix):
    with pytest.raises(BadInput) as e:
        read_export_manifest(_write(tmp_path / "e", EXPORT_MANIFEST, {**EXPORT, "schema_version": version}))
    text = str(e.value)
    assert f"{EXPORT_MANIFEST}:schema_version" in text and f"is not {SCHEMA_VERSION}" in text and fix in text


MERGED_SUMMARY = {"passed": False, "failures": ["b1-short: top1_agreement 0.9 < 0.95"], "ran_on": ["CPUExecutionProvider"],
                  "not_checked_on": [], "max_abs_diff": 1e-5, "max_rel_diff": 2e-6, "mean_kl": 0.0,
                  "top1_agreement": 0.9, "adapter_retention": None}
SWITCHABLE_SUMMARY = {"passed": True, "failures": [], "sections": {"base": True, "a1": True}}


@pytest.mark.parametrize("summary", [MERGED_SUMMARY, SWITCHABLE_SUMMARY], ids=["merged", "switchable"])
def test_the_parity_summary_is_typed_and_written_back_as_read(tmp_path, summary):
    m = read_export_manifest(_write(tmp_path / "e", EXPORT_MANIFEST, {**EXPORT, "parity": summary}))
    assert isinstance(m.parity, ParitySummary) and m.parity.passed is summary["passed"]
    assert m.to_dict()["parity"] == summary and ExportManifest.from_dict(m.to_dict()) == m
    assert (m.parity.sections is None) == ("sections" not in summary)


@pytest.mark.parametrize("parity, said", [
    ([], "must be null or an object"), ({"failures": []}, "must be null or an object"),
    ({"passed": "yes"}, "must be null or an object"), ({**MERGED_SUMMARY, "failures": "x"}, "invalid failures"),
    ({**MERGED_SUMMARY, "mean_kl": "0"}, "invalid mean_kl"), ({"passed": True, "sections": {"a": 1}}, "invalid sections"),
])
def test_a_broken_parity_summary_is_named(tmp_path, parity, said):
    with pytest.raises(BadInput) as e:
        read_export_manifest(_write(tmp_path / "e", EXPORT_MANIFEST, {**EXPORT, "parity": parity}))
    assert f"{EXPORT_MANIFEST}:parity" in str(e.value) and said in str(e.value)


TRAINING = {"schema_version": SCHEMA_VERSION, "kind": "qlora", "base": {"path": "/b", "weights_sha256": {"x": "0"}},
            "quantization": QUANT, "lora": {"rank": 8}, "data": {}, "training": {"steps": 4}, "versions": {}}


def test_training_manifest_round_trip_and_the_old_version(tmp_path):
    problems = []
    m = read_training_manifest(_write(tmp_path / "a", TRAINING_MANIFEST, TRAINING), problems)
    assert not problems and m.to_dict() == TRAINING and TrainingManifest.from_dict(m.to_dict()) == m
    assert m.quantization.settings.blocksize == 64 and m.quantization.modules == tuple(QUANT["quantized_modules"])

    old = {"schema": 1, **{k: v for k, v in TRAINING.items() if k != "schema_version"}}  # lora-export before it
    m = read_training_manifest(_write(tmp_path / "old", TRAINING_MANIFEST, old), problems)
    assert not problems and m.schema_version == 1 and m.quantization.settings.quant_type == "nf4"


def test_no_training_manifest_is_none(tmp_path):
    problems = []
    assert read_training_manifest(tmp_path, problems) is None and not problems


@pytest.mark.parametrize("version, said", [(SCHEMA_VERSION + 1, "newer lora-export"), (0, "not a version"),
                                           (True, "not a version")])
def test_training_manifest_of_another_version(tmp_path, version, said):
    problems = []
    folder = _write(tmp_path / "a", TRAINING_MANIFEST, {**TRAINING, "schema_version": version})
    assert read_training_manifest(folder, problems) is None
    (problem,) = problems
    assert TRAINING_MANIFEST in problem.where and said in problem.what
