"""The bad-input table: one row per case. Each must exit 2 with a message naming the problem (a fragment
is asserted), print no traceback, and leave no output behind."""

import json
import shutil
import struct

import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_export.cli import main

from .conftest import make_base


def _adapter(ctx):
    dst = ctx["tmp"] / "adapter"
    if not dst.exists():
        shutil.copytree(ctx["adapter"], dst)
    return dst


def truncated(ctx):
    f = _adapter(ctx) / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:300])


def lying_header(ctx):
    f = _adapter(ctx) / "adapter_model.safetensors"
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"][1] += 10_000_000  # claims far more bytes than the file holds
    new = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def edit_config(change):
    def setup(ctx):
        f = _adapter(ctx) / "adapter_config.json"
        cfg = json.loads(f.read_text())
        change(cfg)
        f.write_text(json.dumps(cfg))
    return setup


def malformed_config(ctx):
    (_adapter(ctx) / "adapter_config.json").write_text('{"peft_type": "LORA", ')


def pickle_only(ctx):
    a = _adapter(ctx)
    torch.save(load_file(str(a / "adapter_model.safetensors")), a / "adapter_model.bin")
    (a / "adapter_model.safetensors").unlink()


def nan_weights(ctx):
    f = _adapter(ctx) / "adapter_model.safetensors"
    t = load_file(str(f))
    t[sorted(t)[-1]][0, 0] = float("inf")
    save_file(t, str(f))


def renamed_modules(ctx):
    f = _adapter(ctx) / "adapter_model.safetensors"
    save_file({k.replace("mlp.", "ffn."): v for k, v in load_file(str(f)).items()}, str(f))


def other_base(ctx):
    ctx["base"] = make_base(ctx["tmp"] / "wide", hidden_size=96, intermediate_size=192)


def base_without(pattern):
    def setup(ctx):
        dst = ctx["tmp"] / "base"
        shutil.copytree(ctx["base"], dst)
        for p in dst.glob(pattern):
            p.unlink()
        ctx["base"] = dst
    return setup


def busy_output(ctx):
    ctx["out"].mkdir()
    (ctx["out"] / "precious.txt").write_text("keep me")


def target_file(text):
    def setup(ctx):
        (ctx["tmp"] / "t.toml").write_text(text)
        ctx["target"] = str(ctx["tmp"] / "t.toml")
    return setup


GOOD_TARGET = ('name = "t"\nruntime = "onnxruntime"\nexecution_providers = ["CPUExecutionProvider"]\n'
               'precision = "fp32"\nbackend = "genai-builder"\n')

# (case, setup, message fragment)
EXPORT_CASES = [
    ("adapter for another base", other_base, "the adapter was trained for a different base"),
    ("target modules match nothing", renamed_modules, "does not exist in the base"),
    ("truncated safetensors", truncated, "truncated or corrupt"),
    ("header lies about offsets", lying_header, "truncated or corrupt"),
    ("malformed adapter_config.json", malformed_config, "not valid JSON"),
    ("adapter_config.json without target_modules", edit_config(lambda c: c.pop("target_modules")), "names no module"),
    ("unknown PEFT type", edit_config(lambda c: c.update(peft_type="IA3")), "peft_type 'IA3' is not supported"),
    ("rank 0", edit_config(lambda c: c.update(r=0)), "a LoRA rank must be a positive integer"),
    ("pickle-only adapter", pickle_only, "pass --allow-pickle if you trust its source"),
    ("Inf in adapter weights", nan_weights, "holds NaN or Inf"),
    ("base without weights", base_without("*.safetensors"), "no .safetensors weight files"),
    ("base without tokenizer", base_without("tokenizer*"), "no tokenizer files"),
    ("output directory not empty", busy_output, "output directory exists and is not empty"),
    ("target with an unknown field", target_file(GOOD_TARGET + "speed = 11\n"), "unknown field 'speed'"),
    ("contradictory target", target_file(GOOD_TARGET.replace('"fp32"', '"fp16"')), "not supported on CPUExecution"),
]


@pytest.mark.parametrize("case, setup, fragment", EXPORT_CASES, ids=[c[0] for c in EXPORT_CASES])
def test_export_bad_input(case, setup, fragment, tiny_base, tiny_adapter, tmp_path, capsys):
    ctx = {"tmp": tmp_path, "base": tiny_base, "adapter": tiny_adapter, "out": tmp_path / "out",
           "target": "ort-cpu-fp32"}
    setup(ctx)
    adapter = tmp_path / "adapter" if (tmp_path / "adapter").exists() else tiny_adapter
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = main(["export", "--base", str(ctx["base"]), "--adapter", str(adapter), "--target", ctx["target"],
               "--out", str(ctx["out"])])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert fragment in err, err
    assert "Traceback" not in err and "Fix:" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, nothing left half-done
    if case == "output directory not empty":
        assert (ctx["out"] / "precious.txt").read_text() == "keep me"


def test_pickle_adapter_is_accepted_when_allowed(tiny_base, tiny_adapter, tmp_path, capsys):
    ctx = {"tmp": tmp_path, "adapter": tiny_adapter}
    pickle_only(ctx)
    rc = main(["export", "--base", str(tiny_base), "--adapter", str(tmp_path / "adapter"), "--target",
               "ort-cpu-fp32", "--out", str(tmp_path / "out"), "--allow-pickle"])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((tmp_path / "out" / "export_manifest.json").read_text())
    assert m["adapter"]["weights_file"] == "adapter_model.bin"


@pytest.mark.parametrize("command", ["validate", "bench"])
def test_external_data_outside_the_model_directory_is_refused(command, fp32_export, tmp_path, capsys):
    export = tmp_path / "export"
    shutil.copytree(fp32_export.out, export, ignore=shutil.ignore_patterns("bench-base"))
    model = onnx.load(str(export / "model.onnx"), load_external_data=False)
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = "../model.onnx.data"
    onnx.save(model, str(export / "model.onnx"))
    (export / "model.onnx.data").rename(tmp_path / "model.onnx.data")  # the traversal target exists
    before = sorted(p.name for p in export.iterdir())
    rc = main([command, str(export)])
    err = capsys.readouterr().err
    assert rc == 2 and "outside the model directory" in err and "Traceback" not in err
    assert sorted(p.name for p in export.iterdir()) == before


def test_fp16_overflow_is_caught_before_export(tmp_path, capsys):
    """A base whose activations overflow fp16 gets a hint (use bf16 or fp32) instead of NaN logits."""
    from lora_export.train import TrainConfig, train

    from .conftest import EMBEDDED

    base = make_base(tmp_path / "hot")
    from safetensors.torch import load_file, save_file

    f = base / "model.safetensors"
    t = load_file(str(f))
    t["model.layers.1.post_attention_layernorm.weight"] *= 2e4  # MLP inputs ~1e4: products overflow fp16
    save_file(t, str(f), metadata={"format": "pt"})
    train(TrainConfig(base=base, data=EMBEDDED / "demo" / "train.jsonl", out=tmp_path / "a", steps=2,
                      quantize=False), log=lambda m: None)
    rc = main(["export", "--base", str(base), "--adapter", str(tmp_path / "a"), "--target", "ort-cuda-fp16",
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "would be Inf/NaN in fp16" in err and "use a bf16 or fp32 target" in err
    assert "model.layers.1.mlp" in err
    assert not (tmp_path / "out").exists()
