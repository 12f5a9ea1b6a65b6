"""Requantized exports, as a table: each scheme emits its ONNX Runtime op and keeps the adapter's effect.

Thresholds: int8 must pass its target's mean KL (<= 0.01) on every shape; every scheme must keep at least
75% of the adapter's effect. Top-1 agreement is reported, not asserted, here: a tiny random-weight model
predicts near-uniform distributions whose near-ties flip under any rounding (the demo asserts it on the
pretrained embedded model).
"""

import onnx
import pytest

from lora_export.pipeline import ExportRequest, export

NF4_CPU = ('name = "nf4-cpu"\nruntime = "onnxruntime"\nexecution_providers = ["CPUExecutionProvider"]\n'
           'precision = "fp32"\nbackend = "genai-builder"\n[quantization]\nscheme = "nf4"\nblock_size = 64\n'
           'lm_head = "unquantized"\n')


@pytest.mark.parametrize("target, op, lm_head_quantized, kl_must_pass", [
    ("ort-cpu-int8", "MatMulNBits", True, True),  # lm_head at int8 is allowed ("int8 or higher")
    ("nf4-cpu", "MatMulBnb4", False, False),
])
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
    kl_checks = [c for c in r.parity.checks if c.metric == "mean_kl"]
    assert len(kl_checks) == 3
    if kl_must_pass:
        assert all(c.passed for c in kl_checks), [str(c) for c in kl_checks]
    assert (r.out / "model.onnx.data").is_file() and not list(r.out.glob("tmp*"))
