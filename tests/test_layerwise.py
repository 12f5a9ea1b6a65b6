"""Parity's PyTorch models read a unit at a time from disk (lora_export/layerwise.py) compute the whole model's logits
bit for bit (tolerance: none, ``np.array_equal``), on greedy decoding through the KV cache and on teacher-forced
batches, and keep no weight loaded between forwards."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from lora_export import layerwise
from lora_export.adapters import attach, load_adapter
from lora_export.base import load_fp32
from lora_export.runtime import TorchCausalLM, greedy_tokens, teacher_forced

from .conftest import tiered
from .families import BY_NAME, make_adapter, make_family

SEQS = [[1, 5, 9, 200, 7, 3, 88, 13], [1, 44, 2], [1, 9, 9, 9, 9, 9, 9, 9, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]]


def same_logits(whole, streamed, steps: int = 6) -> None:
    a, b = TorchCausalLM(whole), TorchCausalLM(streamed)
    assert greedy_tokens(a, SEQS, steps) == greedy_tokens(b, SEQS, steps)
    ra, rb = dict(teacher_forced(a, SEQS, 64)), dict(teacher_forced(b, SEQS, 64))
    assert set(ra) == set(rb) == set(range(len(SEQS)))
    for i in ra:
        assert np.array_equal(ra[i], rb[i]), (i, float(np.abs(ra[i] - rb[i]).max()))
    loaded = [n for n, p in streamed.named_parameters(remove_duplicate=False)
              if p.device.type != "meta" and "lora_" not in n and "modules_to_save" not in n]
    assert loaded == []  # every base weight went back to the meta device after its forward


def test_a_plain_checkpoint_and_an_adapted_one_equal_the_whole_model(tiny_base, tiny_adapter):
    same_logits(load_fp32(tiny_base), layerwise.load(tiny_base))
    adapter = load_adapter(tiny_adapter, tiny_base)
    whole = attach(load_fp32(tiny_base), [adapter])[0].eval()
    streamed = layerwise.load(tiny_base, [adapter])
    assert streamed.layerwise_units == 2 + 3  # the two decoder layers, the embedding, the final norm, lm_head
    same_logits(whole, streamed)
    # the adapter is really there: without it the logits differ
    plain = dict(teacher_forced(TorchCausalLM(layerwise.load(tiny_base)), SEQS, 64))
    adapted = dict(teacher_forced(TorchCausalLM(streamed), SEQS, 64))
    assert np.abs(plain[0] - adapted[0]).max() > 1e-3


def test_a_qlora_reference_rounds_each_4bit_layer_as_read_like_the_whole_one(tiny_base, tiny_adapter, tmp_path):
    """Above the layerwise size no fp32 copy of the base as trained is written (``reference.as_trained_dir``): the
    layerwise reference round-trips each 4-bit layer through NF4 as it reads it. Bit for bit the whole reference
    (tolerance: none), which dequantizes once, and the one read from the merge's as-trained copy."""
    from lora_export.merge import merge
    from lora_export.reference import as_trained_dir, load_adapted, reference_model

    adapter = load_adapter(tiny_adapter, tiny_base)
    assert adapter.trained_on_4bit and not adapter.quantization.prequantized
    assert as_trained_dir(tmp_path, 2 << 30) is None and as_trained_dir(tmp_path, 1 << 20) == tmp_path / "as-trained"
    on_the_fly = reference_model(tiny_base, [adapter], None, None, layerwise=True).model
    same_logits(load_adapted(tiny_base, [adapter]), on_the_fly)
    copy = merge(tiny_base, [adapter], tmp_path / "merged", "original", as_trained_dir=tmp_path / "as-trained")
    same_logits(reference_model(tiny_base, [adapter], None, copy.as_trained, layerwise=True).model,
                reference_model(tiny_base, [adapter], None, None, layerwise=True).model)
    # the rounding is really there: the base unrounded gives other logits
    rounded = dict(teacher_forced(TorchCausalLM(on_the_fly), SEQS, 64))
    unrounded = dict(teacher_forced(TorchCausalLM(layerwise.load(tiny_base, [adapter])), SEQS, 64))
    assert np.abs(rounded[0] - unrounded[0]).max() > 1e-4


def test_a_4bit_module_the_checkpoint_lacks_is_refused_by_name(tiny_base):
    from lora_export.base import Nf4Settings
    from lora_export.errors import BadInput

    with pytest.raises(BadInput, match=r"4-bit module model\.layers\.7\.mlp\.up_proj"):
        layerwise.load(tiny_base, rounding=(["model.layers.7.mlp.up_proj"], Nf4Settings()))


def test_two_weighted_adapters_equal_the_whole_model(tiny_base, tiny_adapter, tmp_path):
    from .test_merge_semantics import LLAMA_LINEAR, _make_adapter

    a = load_adapter(tiny_adapter, tiny_base)
    b = load_adapter(_make_adapter(tiny_base, tmp_path / "b", seed=2, r=4, lora_alpha=8, use_rslora=True,
                                   target_modules=LLAMA_LINEAR), tiny_base)
    whole = attach(load_fp32(tiny_base), [a, b], (0.7, -0.4))[0].eval()
    same_logits(whole, layerwise.load(tiny_base, [a, b], (0.7, -0.4)))


def test_a_missing_weight_is_refused_by_name_and_a_stray_one_skipped_as_from_pretrained_does(tiny_base, tmp_path):
    from safetensors.torch import load_file, save_file

    from lora_export.errors import BadInput

    odd = tmp_path / "odd"
    odd.mkdir()
    for f in tiny_base.iterdir():
        (odd / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(odd / "model.safetensors"))
    # an old checkpoint's rotary inv_freq: from_pretrained skips it, and so does this
    save_file({**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": torch_ones(8)}, str(odd / "model.safetensors"))
    same_logits(load_fp32(tiny_base), layerwise.load(odd))
    del tensors["model.norm.weight"]
    save_file(tensors, str(odd / "model.safetensors"))
    with pytest.raises(BadInput) as e:  # from_pretrained would make it up at random
        layerwise.load(odd)
    assert "model.norm.weight" in str(e.value) and str(odd) in str(e.value) and "Fix:" in str(e.value)


def torch_ones(n: int):
    import torch

    return torch.ones(n)


FAMILY_NAMES = ["gemma-2", "qwen2.5", "phi-3.5-long", "granite-3", "gemma-3"]


@pytest.mark.parametrize("name", tiered(FAMILY_NAMES, FAMILY_NAMES, slow=set(FAMILY_NAMES[1:])))
def test_family_quirks_are_the_whole_models(name, tmp_path):
    """Soft-capping and sliding windows (Gemma 2), biases (Qwen2.5), LongRoPE (Phi-3.5), multipliers (Granite), scaled
    embeddings and local/global layers (Gemma 3): the
    forward is transformers' own, so each quirk is computed as in the whole model."""
    family = BY_NAME[name]
    base = make_family(family, tmp_path / "base")
    adapter = load_adapter(make_adapter(base, tmp_path / "adapter"), base)
    whole = attach(load_fp32(base), [adapter])[0].eval()
    same_logits(whole, layerwise.load(base, [adapter]))


def test_a_bf16_checkpoint_is_computed_in_fp32_like_load_fp32(tiny_base, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.bfloat16).save_pretrained(str(bf16))
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    same_logits(load_fp32(bf16), layerwise.load(bf16))


def test_validate_reads_its_models_layer_by_layer_above_the_size(fp32_export, tmp_path, monkeypatch):
    """The whole command with every PyTorch model layerwise (the size limit set to 0 here; 5 GiB of fp32 weights by
    default): the same verdict, and the same numbers within 1e-5 (tolerance: a layerwise model takes all parity's
    sequences in one batch, the whole model a few at a time, and batching moves fp32 sums by a few ulps). The layerwise
    reference checks the export's greedy tokens in one pass instead of decoding its own, and rounds the 4-bit layers
    as it reads them (no as-trained copy): the same greedy figures."""
    from lora_export import pipeline, reference

    lines: list[str] = []
    monkeypatch.setattr(reference, "LAYERWISE_ABOVE", 0)
    export_dir = tmp_path / "export"
    import shutil

    shutil.copytree(fp32_export.out, export_dir)
    # the adapters checked and merged here, in this process, where the limit is 0 (validate's own merge runs in a child
    # process, which would see 5 GiB): no as-trained copy, so the reference rounds each 4-bit layer as it reads it
    from lora_export.base import check_base
    from lora_export.exportdir import context_of, locate
    from lora_export.manifests import read_export_manifest
    from lora_export.parity import MIN_STEPS

    manifest = read_export_manifest(export_dir)
    base = check_base(locate(manifest.base, export_dir, "base model"))
    prepared, _ = pipeline.validation_inputs(export_dir, manifest, base, None, tmp_path / "merge", None,
                                             context_of(base)[0], MIN_STEPS)
    assert prepared.merged.as_trained is None and not (tmp_path / "merge" / "as-trained").exists()
    report = pipeline.validate(export_dir, progress=lines.append, prepared=prepared)
    assert any("one decoder layer at a time" in line for line in lines)
    # the reference checked the export's greedy tokens rather than decode its own: one pass (fp32: the same tokens)
    assert [line for line in lines if "teacher-forced pass" in line][-1].endswith("(pass 1)")
    before = fp32_export.parity
    assert report.passed == before.passed and report.passed
    for stage in ("merge", "export", "total", "adapter"):
        a, b = report.stages[stage], before.stages[stage]
        assert abs(a.max_abs_diff - b.max_abs_diff) <= 1e-5 and abs(a.mean_kl - b.mean_kl) <= 1e-5, stage
        assert a.top1_agreement == b.top1_agreement
    for shape, m in report.shapes.items():
        assert m.greedy_min_identical == before.shapes[shape].greedy_min_identical, shape
    assert report.adapter_retention == pytest.approx(before.adapter_retention, abs=1e-5)


# a child that runs a model the way parity does (lora_export.reference.torch_model, layerwise) and prints its VmHWM
PROBE = """
import sys, numpy as np
from pathlib import Path
from lora_export.reference import torch_model
from lora_export.runtime import greedy_tokens, teacher_forced
rng = np.random.default_rng(0)
seqs = [rng.integers(0, 128000, n).tolist() for n in (12, 20, 28, 36, 95, 95, 16, 8, 24, 12)]
model = torch_model(Path(sys.argv[1]), layerwise=True)
tokens = greedy_tokens(model, seqs, int(sys.argv[2]))
rows = sum(len(r) for _, r in teacher_forced(model, [s + t[:-1] for s, t in zip(seqs, tokens)], 16))
print('VmHWM_kB', next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')), rows)
"""


@pytest.mark.slow
def test_at_8b_widths_a_layerwise_model_holds_one_layer(tmp_path):
    """Llama-3.1-8B's widths cut to 2 and to 4 layers (bf16 checkpoints, benchmarks/export_scale.py's bases), run as
    parity runs its PyTorch models: 10 sequences of parity's lengths, greedy through the KV cache, then one
    teacher-forced pass over all of them. P(L) is the process's peak (VmHWM). A layer may add at most 64 MB (the KV
    cache and activations it keeps; its fp32 weights are 0.87 GB), and P(2) + 30 such layers, the projection to 8B,
    must stay within memory.py's estimate of a layerwise parity model at 8B (whole, one of them is 32 GB)."""
    import subprocess
    import sys

    from benchmarks.export_scale import LLAMA31_8B, build_base

    from lora_export import memory
    from lora_export.isolate import lean_env

    from .test_builder_stream import build_base_with_layers
    from .test_memory import LLAMA_31_8B

    peaks = {}
    for layers in (2, 4):
        base = tmp_path / f"base-{layers}"
        build_base_with_layers(build_base, base, LLAMA31_8B, layers, f"8b-{layers}l")
        r = subprocess.run([sys.executable, "-c", PROBE, str(base), "4"], capture_output=True, text=True,
                           env=lean_env())  # as parity's children run
        assert r.returncode == 0, r.stderr[-3000:]
        peaks[layers] = int(r.stdout.split()[-2]) * 1024
        shutil.rmtree(base)
    added = (peaks[4] - peaks[2]) / 2
    projected = peaks[2] + 30 * added
    vocab = LLAMA31_8B["vocab_size"] * LLAMA31_8B["hidden_size"]
    estimate = memory.LAYERWISE_TORCH.of(4 * LLAMA_31_8B, 4 * vocab)
    print(f"layerwise model at 8B widths: peak {peaks[2] / 1e9:.2f} GB at 2 layers, {peaks[4] / 1e9:.2f} GB at 4; "
          f"{added / 1e6:.0f} MB a layer; 32 layers projected {projected / 1e9:.2f} GB, memory.py estimates "
          f"{estimate / 1e9:.2f} GB")
    assert added <= 64e6
    assert projected <= estimate


def test_the_fp16_range_check_finds_the_same_peaks_layer_by_layer(tiny_base, tmp_path):
    """An fp16 target's range check (precision.py) on a layerwise model: the weights' max read from the checkpoint, the
    activations' peaks through the hooks, equal to the whole model's (tolerance: none); and a weight beyond fp16's range
    is refused by name either way."""
    import torch
    from safetensors.torch import load_file, save_file

    from lora_export.errors import BadInput
    from lora_export.precision import check_fp16_range, checkpoint_abs_max

    prompts = SEQS[:2]
    whole = check_fp16_range(load_fp32(tiny_base), prompts, "here")
    streamed = check_fp16_range(layerwise.load(tiny_base), prompts, "here", weight_max=checkpoint_abs_max(tiny_base))
    assert whole[1] == streamed[1] and len(whole[1]) > 10
    assert {k: v for k, v in whole[0].items() if k in streamed[0]} == {k: streamed[0][k] for k in whole[0]}
    hot = tmp_path / "hot"
    hot.mkdir()
    for f in tiny_base.iterdir():
        (hot / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(hot / "model.safetensors"))
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] = 1e5
    save_file(tensors, str(hot / "model.safetensors"))
    for model, weights in ((load_fp32(hot), None), (layerwise.load(hot), checkpoint_abs_max(hot))):
        with pytest.raises(BadInput, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
            check_fp16_range(model, prompts, "here", weight_max=weights)
    assert torch.isfinite(tensors["model.layers.1.mlp.down_proj.weight"]).all()


def test_a_trained_buffer_in_the_checkpoint_is_loaded_as_from_pretrained_loads_it(tmp_path):
    """Gemma 4 keeps a trained scalar per layer as a persistent buffer (``layer_scalar``), not a parameter: left at its
    initial 1.0 the layerwise model would be another model."""
    import torch
    from transformers import AutoTokenizer, Gemma4ForCausalLM, Gemma4TextConfig

    from .conftest import EMBEDDED

    tok = AutoTokenizer.from_pretrained(str(EMBEDDED / "base"))
    config = Gemma4TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    model = Gemma4ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08) if p.dim() == 2 else None
        model.model.layers[0].layer_scalar.fill_(0.25)
        model.model.layers[1].layer_scalar.fill_(3.0)
    model.save_pretrained(str(tmp_path / "g4"))
    tok.save_pretrained(str(tmp_path / "g4"))
    streamed = layerwise.load(tmp_path / "g4")
    assert float(streamed.model.layers[1].layer_scalar) == 3.0
    same_logits(load_fp32(tmp_path / "g4"), streamed)


def test_dora_on_lm_head_and_a_saved_tied_embedding_equal_peft(tmp_path):
    """Outside the decoder layers the unit is PEFT's outermost wrapper (DoRA reads lm_head's base weight outside the
    base layer's forward); a base weight the adapter saves reaches its tied twin too. Tolerance: none."""
    from peft import PeftModel

    from .conftest import make_base
    from .test_merge_semantics import IDS, _logits, _make_adapter

    untied = make_base(tmp_path / "untied", tie_word_embeddings=False)
    tied = make_base(tmp_path / "tied", tie_word_embeddings=True)
    for base, lora in ((untied, dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "lm_head"])),
                       (tied, dict(r=4, lora_alpha=8, target_modules=["q_proj"], save_embedding_layers=True))):
        adapter_dir = _make_adapter(base, tmp_path / f"adapter-{base.name}", **lora)
        expected = _logits(PeftModel.from_pretrained(load_fp32(base), str(adapter_dir)).eval())
        streamed = _logits(layerwise.load(base, [load_adapter(adapter_dir, base)]))
        assert IDS.shape[0] == expected.shape[0]
        assert np.array_equal(streamed, expected), (base.name, float(np.abs(streamed - expected).max()))
