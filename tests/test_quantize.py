"""Requantized exports, as a table: each scheme emits its ONNX Runtime op and keeps the adapter's effect.

Thresholds: int8 must pass its target's mean KL (<= 0.01) on every shape; every scheme must keep at least
75% of the adapter's effect. Top-1 agreement is reported, not asserted, here: a tiny random-weight model
predicts near-uniform distributions whose near-ties flip under any rounding (the demo asserts it on the
pretrained embedded model).
"""

import onnx
import pytest
from onnx import numpy_helper

from lora_export.pipeline import ExportRequest, export

from .conftest import tiered

NF4_CPU = ('name = "nf4-cpu"\nruntime = "onnxruntime"\nexecution_providers = ["CPUExecutionProvider"]\n'
           'precision = "fp32"\nbackend = "genai-builder"\n[quantization]\nscheme = "nf4"\nblock_size = 64\n'
           'lm_head = "unquantized"\n')


@pytest.mark.parametrize("target, op, lm_head_quantized, kl_must_pass", tiered([
    ("ort-cpu-int8", "MatMulNBits", True, True),  # lm_head at int8 is allowed ("int8 or higher")
    ("nf4-cpu", "MatMulBnb4", False, False),
], ["int8", "nf4"], slow={"nf4"}))
def test_scheme(target, op, lm_head_quantized, kl_must_pass, tiny_base, tiny_adapter, tmp_path):
    if target == "nf4-cpu":
        (tmp_path / "nf4-cpu.toml").write_text(NF4_CPU)
        target = str(tmp_path / "nf4-cpu.toml")
    r = export(ExportRequest(base=tiny_base, adapter=tiny_adapter, target=target, out=tmp_path / "out"))
    graph = onnx.load(str(r.out / "model.onnx"), load_external_data=False).graph
    quantized = [n for n in graph.node if n.op_type == op]
    assert len(quantized) == 2 * 5 + lm_head_quantized  # every linear layer of both blocks (+ lm_head)
    assert any("lm_head" in n.name for n in quantized) == lm_head_quantized
    assert r.parity.adapter_retention > 0.75
    kl_checks = [c for c in r.parity.checks if c.metric == "mean_kl" and c.shape != "merge"]  # per shape
    assert len(kl_checks) == 3
    if kl_must_pass:
        assert all(c.passed for c in kl_checks), [str(c) for c in kl_checks]
    assert (r.out / "model.onnx.data").is_file() and not list(r.out.glob("tmp*"))
    layout = {c.metric: c for c in r.parity.checks if c.shape == "graph"}
    if op == "MatMulNBits":  # the graph stores its weights as the target says (bits, block size), and says so
        assert set(layout) == {"lm_head_bits", "body_matmuls_at_other_bits", "matmuls_at_other_block_size",
                               "matmuls_off_their_source", "matmuls_compared"}
        assert layout["matmuls_compared"].observed == 2 * 5  # every linear layer of both blocks (lm_head: tied)
        assert all(c.passed for c in layout.values()) and layout["lm_head_bits"].observed == 8
        _a_layout_other_than_the_targets_fails(r.out, r.parity)
        _an_edited_weight_is_off_its_source(r.out, tmp_path)


def _a_layout_other_than_the_targets_fails(export_dir, right):
    """The int8 graph held against targets it does not match: int4 with lm_head int4 (every MatMul and the
    lm_head at the wrong bits), and int8 at block 32 (every block size wrong). Each is a FAIL naming the check."""
    from dataclasses import replace

    from lora_export import parity
    from lora_export.quantize import graph_layout
    from lora_export.quantize.int4 import INT4
    from lora_export.targets import load_target

    int8 = load_target("ort-cpu-int8")
    int4 = replace(int8.quantization, scheme="int4", lm_head="int4", sensitive_layers="int4")
    checks = {m: (expected, observed) for m, _, expected, observed in INT4.layout(export_dir / "model.onnx", int4)}
    assert checks["lm_head_bits"] == (4, 8) and checks["body_matmuls_at_other_bits"] == (0, 10)
    other = 16 if int8.quantization.block_size != 16 else 32
    wrong = graph_layout(export_dir, replace(int8, quantization=replace(int8.quantization, block_size=other)), False)
    wrong += tuple((c.metric, c.op, c.threshold, c.observed) for c in right.checks if c.shape == "graph"
                   and c.metric in ("matmuls_off_their_source", "matmuls_compared"))  # the weights are right
    report = parity.judge(right.shapes, right.stages, right.adapter_retention, int8.tolerances, "ort-cpu-int8",
                          right.reference, right.steps, layout=wrong)
    assert not report.passed and len(report.checks) == len(right.checks)  # the same checks, the layout's now wrong
    assert [str(c) for c in report.failures if c.shape == "graph"] == [
        "graph/matmuls_at_other_block_size = 11 (needs <= 0)"]


def _an_edited_weight_is_off_its_source(export_dir, tmp_path):
    """One MatMulNBits' block scales 2% off, a change no logit threshold need see: validate quantizes the merge
    again as the target says and finds that one MatMul off (relative difference 0.02 > 1e-2), so the export FAILs."""
    from benchmarks.gate_calibration import edit_graph
    from lora_export.pipeline import validate

    def one_scale_off(model):
        inits = {t.name: t for t in model.graph.initializer}
        node = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and "layers.1/mlp" in n.name)
        t = inits[node.input[2]]
        a = numpy_helper.to_array(t)
        t.CopyFrom(numpy_helper.from_array((a * 1.02).astype(a.dtype), t.name))

    report = validate(edit_graph(export_dir, tmp_path / "edited", one_scale_off))
    assert [str(c) for c in report.failures if c.shape == "graph"] == ["graph/matmuls_off_their_source = 1 (needs <= 0)"]


@pytest.mark.slow
def test_survival_is_reported_per_tensor_and_reads_back_the_graph(tiny_base, tiny_adapter, tmp_path):
    """The int8 export's manifest lists every adapted quantized tensor; re-quantizing the merged weight with
    ONNX Runtime's quantizer reproduces the graph's weights exactly, so Q(W) is computed the builder's way."""
    import json

    import numpy as np
    import torch
    from safetensors import safe_open

    from lora_export.quantize.survival import _dequantize, _quantize_like

    r = export(ExportRequest(base=tiny_base, adapter=tiny_adapter, target="ort-cpu-int8", out=tmp_path / "out"))
    q = json.loads((r.out / "export_manifest.json").read_text())["quantization"]
    print({k: v for k, v in q.items() if k != "tensors"})
    assert q["adapted_quantized_tensors"] == 2 * 5  # qkv (packed), o, gate, up, down in each of 2 layers
    assert all(t["bits"] == 8 and 0 < t["quant_error"] < 0.05 for t in q["tensors"])
    assert q["median_survival"] > 0.8 and not q["erased"]  # int8 keeps a fine-tuning-sized change

    model = onnx.load(str(r.out / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == "/model/layers.1/mlp/down_proj/MatMul_Q8")
    merged = r.out.parent / "m"
    from lora_export.adapters import load_adapter
    from lora_export.merge import merge

    merge(tiny_base, load_adapter(tiny_adapter, tiny_base), merged, "nf4")
    with safe_open(str(merged / "model.safetensors"), framework="pt") as f:
        w = f.get_tensor("model.layers.1.mlp.down_proj.weight").to(torch.float32).numpy()
    assert np.array_equal(_quantize_like(node, w, 8), _dequantize(node, inits, w.shape[1]))


@pytest.mark.parametrize("scale, erased", [(1.0, False), (1e-3, True)])
def test_survival_flags_a_change_the_quantization_erases(scale, erased):
    """A change of fine-tuning size survives int4 (block 32); one a thousand times smaller, far below the
    quantization step, is erased (survival < 0.5) and must show up as such."""
    import numpy as np
    from onnx import helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from lora_export.quantize.survival import ERASED, tensor_survival

    rng = np.random.default_rng(0)
    w_old = rng.normal(0, 0.05, (64, 128)).astype(np.float32)  # N x K
    dw = (rng.normal(0, 0.02, (64, 4)) @ rng.normal(0, 0.5, (4, 128))).astype(np.float32) * scale  # rank 4
    w_new = w_old + dw
    graph = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"], name="m")], "g",
                              [helper.make_tensor_value_info("X", 1, [1, 128])],
                              [helper.make_tensor_value_info("Y", 1, [1, 64])],
                              initializer=[numpy_helper.from_array(np.ascontiguousarray(w_new.T), "W")])
    q = MatMulNBitsQuantizer(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), bits=4,
                             block_size=32, is_symmetric=True)
    q.process()
    node = next(n for n in q.model.model.graph.node if n.op_type == "MatMulNBits")
    t = tensor_survival(node, {i.name: i for i in q.model.model.graph.initializer}, w_old, w_new)
    print(f"scale {scale}: survival {t.survival:.3f}, quant error {t.quant_error:.4f}")
    assert (t.survival < ERASED) == erased


def test_an_unmerged_nf4_graph_holds_the_trained_codes_and_a_float_adapter(tiny_base, tiny_adapter, tmp_path, capsys):
    """graph = "unmerged" with NF4 (as ort-cuda-nf4 ships): the export is the model as QLoRA trained it. Every base
    MatMul is MatMulBnb4 holding bitsandbytes' own 4-bit codes of the base weight (compared byte for byte), the
    adapter is a float side path (plain MatMul A and B per module), and parity against the model as trained is
    that of an fp32 graph. Tolerance: max |logit diff| <= 1e-4 in fp32, the fp32 merged export's own bound
    (measured 2.2e-6: the 4-bit codes and scales are the trained ones, exactly)."""
    import json

    import bitsandbytes.functional as bnbf
    import numpy as np
    import torch
    from onnx import numpy_helper
    from safetensors import safe_open

    from lora_export.adapters import load_adapter
    from lora_export.cli import main
    from lora_export.quantized_base import quantization_of

    toml = tmp_path / "nf4-unmerged.toml"
    toml.write_text(NF4_CPU.replace('name = "nf4-cpu"', 'name = "nf4-unmerged"\ngraph = "unmerged"'))
    out = tmp_path / "out"
    rc = main(["export", "--base", str(tiny_base), "--adapter", str(tiny_adapter), "--target", str(toml),
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "keeps the adapter unmerged" in err and "the trained 4-bit codes" in err
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert manifest["graph"] == "unmerged" and manifest["quantization"]["base_codes"] == "as trained"
    model = onnx.load(str(out / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    lora = [n for n in model.graph.node if "/lora_" in n.name]
    assert len(lora) == 2 * 14 and {n.op_type for n in lora} == {"MatMul"}  # A and B of 14 modules, float
    _, nf4 = quantization_of(load_adapter(tiny_adapter, tiny_base))
    checked = 0
    with safe_open(str(tiny_base / "model.safetensors"), framework="pt") as f:
        for node in model.graph.node:
            if node.op_type != "MatMulBnb4" or not any(m in node.name for m in ("o_proj", "down_proj")):
                continue  # the fused qkv and gate/up nodes hold the same codes, concatenated
            layer, module = node.name.split("/")[2], node.name.split("/")[4]
            block = "self_attn" if module == "o_proj" else "mlp"
            w = f.get_tensor(f"model.{layer}.{block}.{module}.weight").to(torch.float32)
            codes, _ = bnbf.quantize_4bit(w, blocksize=nf4.blocksize, compress_statistics=nf4.double_quant,
                                          quant_type="nf4")
            stored = numpy_helper.to_array(inits[node.input[1]])
            assert np.array_equal(stored.reshape(-1), codes.reshape(-1).numpy()), node.name
            checked += 1
    assert checked == 4  # o_proj and down_proj of both layers
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] is True
    total = report["stages"]["total"]
    print(f"unmerged nf4: max abs diff {total['max_abs_diff']:.2e}, mean KL {total['mean_kl']:.2e}")
    assert total["max_abs_diff"] <= 1e-4, total


@pytest.mark.parametrize("blocksize", [64, 128])
def test_nearest_level_coding_reproduces_bitsandbytes(blocksize):
    """With a block's own absmax, our NF4 coding gives bitsandbytes' bytes exactly (what MatMulBnb4 reads)."""
    import bitsandbytes.functional as bnbf
    import torch

    from lora_export.nf4math import quantize_with_absmax

    torch.manual_seed(0)
    w = torch.randn(96, 256) * 0.05
    q, state = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=False, quant_type="nf4")
    assert torch.equal(quantize_with_absmax(w, state.absmax, blocksize), q.reshape(-1))


@pytest.mark.slow
def test_nf4_with_the_training_scales(tiny_base, tiny_adapter, tmp_path):
    """scales = "original": every quantized weight keeps its training block's absmax, so a weight the adapter
    moved less than half a level keeps its trained 4-bit code; parity and survival are reported as usual."""
    import json

    import numpy as np
    import torch
    from safetensors import safe_open

    from lora_export.adapters import load_adapter
    from lora_export.nf4math import round_trip
    from lora_export.quantize.survival import _dequantize
    from lora_export.quantized_base import quantization_of

    shares = {}
    for scales in ("fresh", "original"):
        toml = tmp_path / f"nf4-{scales}.toml"
        toml.write_text(NF4_CPU.replace('name = "nf4-cpu"', f'name = "nf4-{scales}"') + f'scales = "{scales}"\n')
        r = export(ExportRequest(base=tiny_base, adapter=tiny_adapter, target=str(toml), out=tmp_path / scales))
        manifest = json.loads((r.out / "export_manifest.json").read_text())
        assert manifest["quantization"]["adapted_quantized_tensors"] == 10
        model = onnx.load(str(r.out / "model.onnx"))
        inits = {i.name: i for i in model.graph.initializer}
        node = next(n for n in model.graph.node if n.name.startswith("/model/layers.0/mlp/down_proj/"))
        got = _dequantize(node, inits, 128)
        names, nf4 = quantization_of(load_adapter(tiny_adapter, tiny_base))
        with safe_open(str(tiny_base / "model.safetensors"), framework="pt") as f:
            trained = round_trip(f.get_tensor("model.layers.0.mlp.down_proj.weight").to(torch.float32), nf4).numpy()
        shares[scales] = float(np.mean(np.isclose(got, trained, rtol=0, atol=1e-6)))
        print(scales, f"weights equal to the trained 4-bit value {shares[scales]:.3f}",
              f"median survival {manifest['quantization']['median_survival']:.3f}",
              f"parity passed {r.parity.passed}, retention {r.parity.adapter_retention:.3f}")
    assert shares["original"] > shares["fresh"] and shares["original"] > 0.5


@pytest.mark.parametrize("bits, block, symmetric, k, fp16", [
    (4, 64, False, 256, False), (4, 32, True, 200, False), (4, 128, False, 96, False), (8, 64, False, 256, False),
    (8, 16, True, 72, False), (4, 64, False, 192, True)],
    ids=["int4-asym-64", "int4-sym-32-ragged", "int4-asym-128-short", "int8-asym-64", "int8-sym-16-ragged",
         "int4-fp16"])
def test_nbits_unpacking_is_the_runtimes_own_dequantization_bit_for_bit(bits, block, symmetric, k, fp16):
    """MatMulNBits weights unpacked from the documented layout equal what ONNX Runtime's op computes with (the op
    run on an identity matrix), bit for bit: odd block counts (zero points half a byte), K not a multiple of the
    block, fp16 scales."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from lora_export.quantize.survival import run_on_identity, unpack_nbits

    rng = np.random.default_rng(bits * 1000 + k)
    n = 40
    dtype, elem = (np.float16, TensorProto.FLOAT16) if fp16 else (np.float32, TensorProto.FLOAT)
    w = (rng.standard_normal((k, n)) * 0.05).astype(dtype)
    graph = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"], name="m")], "q",
                              [helper.make_tensor_value_info("X", elem, [1, k])],
                              [helper.make_tensor_value_info("Y", elem, [1, n])],
                              initializer=[numpy_helper.from_array(w, "W")])
    q = MatMulNBitsQuantizer(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), bits=bits,
                             block_size=block, is_symmetric=symmetric)
    q.process()
    node = next(x for x in q.model.model.graph.node if x.op_type == "MatMulNBits")
    inits = {i.name: i for i in q.model.model.graph.initializer}
    assert (len([i for i in node.input if i]) > 3) == (not symmetric)
    unpacked = unpack_nbits(node, inits)
    assert unpacked.shape == (n, k)
    assert np.array_equal(unpacked, run_on_identity(node, inits, k))
    assert np.abs(unpacked - w.T.astype(np.float32)).max() < 0.05  # and it is the weight, quantized


def test_survival_by_slices_of_rows_is_survival_of_the_whole(monkeypatch):
    """A large weight (an 8B lm_head is 2.1 GB in fp32) is compared a slice of rows at a time; the norms summed over
    slices give the whole tensor's figures (to 1e-6 relative: float64 sums in another order)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from lora_export.quantize import survival

    rng = np.random.default_rng(7)
    n, k = 96, 128
    w_old = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    w_new = w_old + (rng.standard_normal((n, k)) * 0.01).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"], name="m")], "q",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, n])],
                              initializer=[numpy_helper.from_array(np.ascontiguousarray(w_new.T), "W")])
    q = MatMulNBitsQuantizer(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), bits=4,
                             block_size=32, is_symmetric=False)
    q.process()
    node = next(x for x in q.model.model.graph.node if x.op_type == "MatMulNBits")
    inits = {i.name: i for i in q.model.model.graph.initializer}
    whole = survival.tensor_survival(node, inits, w_old, w_new)
    monkeypatch.setattr(survival, "CHUNK_ELEMENTS", 10 * k)  # slices of 10 rows: 10 of them, the last of 6
    assert len(survival.row_chunks(n, k)) == 10
    sliced = survival.tensor_survival(node, inits, w_old, w_new)
    assert sliced.survival == pytest.approx(whole.survival, rel=1e-6)
    assert sliced.quant_error == pytest.approx(whole.quant_error, rel=1e-6)
    assert 0 < whole.quant_error < 0.2 and whole.survival < 1
