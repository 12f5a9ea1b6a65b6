"""The fp32 gate on a model whose logits have a realistic scale: a right export passes, wrong ones fail.

A threshold tuned on a 1M-parameter model with logits of a few units does not scale: pretrained models
have logits near +-30..40, where two exact fp32 computations of the same model already differ by a few
1e-4. The model here is built from a config (seeded) and its final norm is scaled so that its logits reach
+-30; the QLoRA adapter is trained on it by the real trainer. Both sides are tested: the faithful export
passes, while the original-weights merge of the QLoRA adapter and a 1% perturbation of one layer fail.
Run with -s to see the figures.
"""

import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from lora_export.pipeline import ExportRequest, export, validate
from lora_export.targets import DEFAULT_TOLERANCES

from .conftest import EMBEDDED, make_base

pytestmark = pytest.mark.slow  # the rest of the suite: .ci/run runs it (README, "Run the tests")

LOGIT_SCALE = 30.0


@pytest.fixture(scope="module")
def scaled_base(tmp_path_factory):
    """A 6-layer Llama whose logits reach +-30 on the parity prompts."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    path = make_base(tmp_path_factory.mktemp("scaled") / "base", seed=1, hidden_size=128, intermediate_size=344,
                     num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        peak = model(torch.arange(1, 65)[None]).logits.abs().max().item()
    weights = load_file(str(path / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * (LOGIT_SCALE / peak)
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def scaled_adapter(scaled_base, tmp_path_factory):
    from lora_export.train import TrainConfig, train

    out = tmp_path_factory.mktemp("scaled-adapter") / "adapter"
    train(TrainConfig(base=scaled_base, data=EMBEDDED / "demo" / "train.jsonl", out=out, steps=12, lr=3e-3,
                      rank=8, alpha=16, batch_size=8), log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def right_export(scaled_base, scaled_adapter, tmp_path_factory):
    return export(ExportRequest(base=scaled_base, adapter=scaled_adapter, target="ort-cpu-fp32",
                                out=tmp_path_factory.mktemp("right") / "fp32"))


def _show(label, report):
    m = report.stages["total"]
    print(f"\n{label}: {'PASS' if report.passed else 'FAIL'}; max |ref logit| {m.reference_max_abs:.1f}, "
          f"max abs diff {m.max_abs_diff:.3g}, max rel diff {m.max_rel_diff:.3g}, mean KL {m.mean_kl:.3g}, "
          f"top-1 {m.top1_agreement:.1%}; merge stage max rel {report.stages['merge'].max_rel_diff:.3g}; "
          f"failed: {[str(c) for c in report.failures][:3]}")


def test_the_scaled_model_has_realistic_logits(right_export):
    assert right_export.parity.stages["total"].reference_max_abs > 0.8 * LOGIT_SCALE


def test_a_right_export_passes_the_default_fp32_gate(right_export):
    _show("faithful export (nf4 merge base)", right_export.parity)
    assert right_export.parity.passed, [str(c) for c in right_export.parity.failures]
    # the relative criterion leaves a wide margin over fp32 noise at this scale
    assert right_export.parity.stages["total"].max_rel_diff < DEFAULT_TOLERANCES["fp32"].max_rel_diff / 10


def test_merging_a_qlora_adapter_into_the_original_weights_fails(scaled_base, scaled_adapter, tmp_path):
    r = export(ExportRequest(base=scaled_base, adapter=scaled_adapter, target="ort-cpu-fp32", out=tmp_path / "orig",
                             merge_base="original"))
    _show("original-weights merge", r.parity)
    assert not r.parity.passed
    assert {c.metric for c in r.parity.failures} >= {"max_rel_diff", "mean_kl"}


def test_a_one_layer_perturbation_fails(right_export, tmp_path):
    """Noise of 1% of its own spread on one MLP down projection: a silent export bug of modest size."""
    bad = tmp_path / "bad"
    shutil.copytree(right_export.out, bad)
    model = onnx.load(str(right_export.out / "model.onnx"))
    for init in model.graph.initializer:
        if "layers.2.mlp.down_proj" in init.name:
            w = numpy_helper.to_array(init)
            noise = np.random.default_rng(0).normal(0, 0.01 * w.std(), w.shape).astype(w.dtype)
            init.CopyFrom(numpy_helper.from_array(w + noise, init.name))
            break
    else:
        raise AssertionError("no down_proj weight in layer 2")
    for f in ("model.onnx", "model.onnx.data"):
        (bad / f).unlink(missing_ok=True)
    onnx.save_model(model, str(bad / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
                    all_tensors_to_one_file=True)
    report = validate(bad)
    _show("one layer perturbed by 1%", report)
    assert not report.passed and "max_rel_diff" in {c.metric for c in report.failures}
