"""Zero overhead by construction: a merged export's graph is the unadapted base's graph, node for node.

Same nodes (op types, inputs, outputs, attributes), same initializer names, shapes and dtypes, same I/O;
only weight bytes differ. Checked for both graph backends. Also: the generic backend carries a LoRA
adapter on GPT-2 (Conv1D) through the whole export, parity gate included.
"""

from __future__ import annotations

import onnx
import pytest

from lora_export.latency import graph_structure
from lora_export.export import BACKENDS
from lora_export.pipeline import ExportRequest, export
from lora_export.targets import load_target

from .test_backends import tiny_model
from .test_merge_semantics import _make_adapter


def weights_differ(a_dir, b_dir) -> int:
    a = {i.name: i for i in onnx.load(str(a_dir / "model.onnx")).graph.initializer}
    b = {i.name: i for i in onnx.load(str(b_dir / "model.onnx")).graph.initializer}
    return sum(onnx.numpy_helper.to_array(a[k]).tobytes() != onnx.numpy_helper.to_array(b[k]).tobytes() for k in a)


def _assert_identical(merged_dir, base_dir):
    got, want = graph_structure(merged_dir), graph_structure(base_dir)
    for key in want:
        assert got[key] == want[key], key
    assert len(want["nodes"]) > 20
    assert weights_differ(merged_dir, base_dir) > 0  # and the adapter is in the weights


def test_builder_graph_of_the_merged_model_is_the_base_graph(fp32_export, tiny_base, tmp_path):
    base_out = tmp_path / "base"
    base_out.mkdir()
    BACKENDS["genai-builder"].build(tiny_base, base_out, load_target("ort-cpu-fp32"), base_out / "build.log")
    _assert_identical(fp32_export.out, base_out)


@pytest.mark.slow
def test_generic_backend_exports_a_gpt2_lora_passes_parity_and_keeps_the_base_graph(tmp_path):
    base = tiny_model("GPT2LMHeadModel", tmp_path / "gpt2")
    adapter = _make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                            fan_in_fan_out=True)
    r = export(ExportRequest(base=base, adapter=adapter, target="ort-cpu-fp32-generic", out=tmp_path / "out"))
    total = r.parity.stages["total"]
    print(f"GPT-2 generic export: max |logit diff| {total.max_abs_diff:.2e}, passed {r.parity.passed}")
    assert r.parity.passed and r.merge_base == "original"
    assert (r.out / "model.onnx.data").is_file()  # weights as external data, one file, a bare name
    base_out = tmp_path / "base-out"
    base_out.mkdir()
    BACKENDS["torch-dynamo"].build(base, base_out, load_target("ort-cpu-fp32-generic"), base_out / "build.log")
    _assert_identical(r.out, base_out)
