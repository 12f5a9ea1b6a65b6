"""The bad-input table: one row per case. Each must exit 2 with a message naming the problem (a fragment
is asserted), print no traceback, and leave no output behind."""

import json
import os
import shutil
import struct

import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_export.cli import main

from .conftest import make_base, tiered


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


def edit_json(folder, name, change):
    """A setup that rewrites folder(ctx)/name with change(value) (or value, when change edits it in place)."""
    def setup(ctx):
        f = folder(ctx) / name
        value = json.loads(f.read_text())
        changed = change(value)
        f.write_text(json.dumps(value if changed is None else changed))
    return setup


def edit_config(change):  # change edits the config in place (its return value, e.g. of dict.pop, is ignored)
    return edit_json(_adapter, "adapter_config.json", lambda c: (change(c), c)[1])


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

def nested_config(ctx):
    (_adapter(ctx) / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)


def edit_manifest(change):
    return edit_json(_adapter, "training_manifest.json", change)


def without_quantization(m):
    m["quantization"] = None
    return m


def with_bad_blocksize(m):
    m["quantization"]["blocksize"] = 7
    return m


def integer_tensor(dtype):
    def setup(ctx):
        f = _adapter(ctx) / "adapter_model.safetensors"
        t = load_file(str(f))
        key = next(k for k in sorted(t) if "lora_A" in k)
        t[key] = torch.ones_like(t[key], dtype=dtype)
        save_file(t, str(f))
    return setup


def _base_copy(ctx):
    dst = ctx["tmp"] / "base"
    if not dst.exists():
        shutil.copytree(ctx["base"], dst)
    ctx["base"] = dst
    return dst


def training_config(name, text):
    def setup(ctx):
        (_adapter(ctx) / "training_manifest.json").unlink()  # an adapter made by another tool
        (ctx["tmp"] / name).write_text(text)
        ctx["extra"] = ["--training-config", str(ctx["tmp"] / name)]
    return setup


def foreign_adapter_with(name, text):
    """The adapter as another tool leaves it (no training_manifest.json), with ``name`` beside it."""
    def setup(ctx):
        (_adapter(ctx) / "training_manifest.json").unlink()
        (_adapter(ctx) / name).write_text(text)
    return setup


def edit_base_config(change):
    return edit_json(_base_copy, "config.json", change)


def base_file(name, data: bytes):
    def setup(ctx):
        (_base_copy(ctx) / name).write_bytes(data)
    return setup


def remote_code_config(cfg):
    cfg.update(model_type="mystery-lm", architectures=["MysteryForCausalLM"],
               auto_map={"AutoConfig": "modeling_mystery.MysteryConfig",
                         "AutoModelForCausalLM": "modeling_mystery.MysteryForCausalLM"})
    return cfg


def out_at(make):
    def setup(ctx):
        ctx["out"] = make(ctx["tmp"])
    return setup


def symlinked_out(tmp):
    (tmp / "real").mkdir()
    (tmp / "link").symlink_to(tmp / "real")
    return tmp / "link"


def under_a_file(tmp):
    (tmp / "afile").write_text("not a folder")
    return tmp / "afile" / "out"


def locked_out(ctx):
    """Another export (a live process) is writing the same --out: it holds the lock."""
    import subprocess
    import sys

    lock = ctx["tmp"] / ".out.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_CREAT | "
                               "os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); "
                               "print('locked', flush=True); time.sleep(120)", str(lock)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    ctx["cleanup"] = holder.kill


def memory_limit(value):
    """LORA_EXPORT_MEMORY_LIMIT set to ``value`` for this one run (tests/test_memory.py has the rest)."""
    def setup(ctx):
        os.environ["LORA_EXPORT_MEMORY_LIMIT"] = value
        ctx["cleanup"] = lambda: os.environ.pop("LORA_EXPORT_MEMORY_LIMIT", None)
    return setup


# (case, setup, message fragment, extra arguments)
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
    # adapter_config.json: right JSON types, wrong meaning or range
    ("rank disagrees with the tensors", edit_config(lambda c: c.update(r=64)), "but its saved lora_A has rank 8"),
    ("rank far beyond the layer", edit_config(lambda c: c.update(r=1_000_000)), "but its saved lora_A has rank 8"),
    ("negative lora_alpha", edit_config(lambda c: c.update(lora_alpha=-16)), "lora_alpha = -16: it must be a finite number >= 0"),
    ("infinite lora_alpha", edit_config(lambda c: c.update(lora_alpha=float("inf"))), "lora_alpha = inf"),
    ("lora_dropout of the wrong type", edit_config(lambda c: c.update(lora_dropout="high")), "lora_dropout = 'high'"),
    ("lora_dropout out of range", edit_config(lambda c: c.update(lora_dropout=1.5)), "in [0, 1)"),
    ("target_modules naming nothing", edit_config(lambda c: c.update(target_modules=["c_attn", "nonexistent_proj"])),
     "target_modules ['c_attn', 'nonexistent_proj'] match no module of the base"),
    ("target_modules naming a norm", edit_config(lambda c: c.update(target_modules=["q_proj", "input_layernorm"])),
     "names 'input_layernorm', a LlamaRMSNorm"),
    ("DoRA without magnitudes", edit_config(lambda c: c.update(use_dora=True)), "no DoRA magnitude vector"),
    ("use_rslora of the wrong type", edit_config(lambda c: c.update(use_rslora="yes")), "use_rslora = 'yes'"),
    ("pathological nesting", nested_config, "nested too deeply to read"),
    # training_manifest.json malformed
    ("manifest of the wrong JSON type", edit_manifest(lambda m: [m]), "the top level is a JSON list"),
    ("QLoRA manifest without quantization", edit_manifest(without_quantization), "without its quantization block"),
    ("QLoRA manifest with a bad block size", edit_manifest(with_bad_blocksize), "invalid blocksize"),
    ("manifest kind unknown", edit_manifest(lambda m: {**m, "kind": "qlora2"}), "kind = 'qlora2'"),
    # adapter tensors of a non-float dtype
    ("int64 adapter tensor", integer_tensor(torch.int64), "has dtype int64: LoRA weights are floating point"),
    ("int8 adapter tensor", integer_tensor(torch.int8), "has dtype int8"),
    # base config.json malformed
    ("unknown model_type", edit_base_config(lambda c: {**c, "model_type": "llamaz"}), "transformers cannot load this config"),
    ("auto_map to remote code", edit_base_config(remote_code_config), "points to remote code (auto_map), which lora-export never runs"),
    ("base field of the wrong type", edit_base_config(lambda c: {**c, "hidden_size": "big"}), "hidden_size = 'big'"),
    ("base config of the wrong JSON type", edit_base_config(lambda c: [c]), "the top level is a JSON list"),
    # tokenizer files corrupt or unreadable
    ("corrupt tokenizer.json", base_file("tokenizer.json", b"\x00\x01garbage" * 100), "the tokenizer files cannot be read"),
    ("truncated tokenizer_config.json", base_file("tokenizer_config.json", b'{"tokenizer_class": '),
     "the tokenizer files cannot be read"),
    # target values
    ("infinite tolerance", target_file(GOOD_TARGET + "[tolerances]\nmean_kl = inf\n"), "is not a finite number"),
    ("absurd greedy tokens", target_file(GOOD_TARGET + "[tolerances]\ngreedy_tokens = 1_000_000_000\n"), "0..4096"),
    ("negative opset", target_file(GOOD_TARGET + "opset = -1\n"), "opset -1 must be a whole number"),
    ("opset the builder ignores", target_file(GOOD_TARGET + "opset = 21\n"), "the genai-builder backend writes opset 22"),
    # output paths
    ("symlinked --out", out_at(symlinked_out), "is a symbolic link"),
    ("--out name too long", out_at(lambda tmp: tmp / ("x" * 250)), "passes the file system's 255-byte limit"),
    ("--out name past the file system's limit", out_at(lambda tmp: tmp / ("y" * 300)), "300 bytes"),
    ("--out under a file", out_at(under_a_file), "is not a directory"),
    ("another export writing --out", locked_out, "another lora-export (pid"),
    # memory, estimated up front (lora_export/memory.py)
    ("estimated peak memory over the memory here", memory_limit("1M"), "GB is available (LORA_EXPORT_MEMORY_LIMIT=1M)"),
    ("LORA_EXPORT_MEMORY_LIMIT not a size", memory_limit("plenty"), "LORA_EXPORT_MEMORY_LIMIT: 'plenty' is not a memory size"),
    # messages that blamed the wrong thing
    ("--adapter-weight nan", lambda ctx: ctx.update(extra=["--adapter-weight", "nan"]), "--adapter-weight: nan is not a finite"),
    ("--adapter-weight count", lambda ctx: ctx.update(extra=["--adapter-weight", "1", "--adapter-weight", "2"]),
     "2 weights for 1 adapters"),
    # the 4-bit base of an adapter made elsewhere (tests/test_quantized_base.py has the accepted ones)
    ("--bnb-block-size bitsandbytes lacks", lambda ctx: ctx.update(extra=["--bnb-block-size", "100"]),
     "--bnb-block-size: block size 100 is not supported by bitsandbytes"),
    ("--bnb-quant-type against --merge-base", lambda ctx: ctx.update(extra=["--merge-base", "fp4", "--bnb-quant-type",
                                                                            "nf4"]), "disagrees with --merge-base fp4"),
    ("--training-config missing", lambda ctx: ctx.update(extra=["--training-config", str(ctx["tmp"] / "nope.yml")]),
     "--training-config file not found"),
    ("--training-config recording nothing", training_config("run.yml", "learning_rate: 0.0002\n"),
     "records no bitsandbytes quantization settings"),
    ("garbage axolotl YAML beside the adapter", foreign_adapter_with("axolotl.yml", "adapter: [qlora\n  - :"),
     "is not readable YAML"),
    ("8-bit bitsandbytes base", edit_base_config(lambda c: {**c, "quantization_config": {
        "quant_method": "bitsandbytes", "load_in_8bit": True}}), "an 8-bit bitsandbytes checkpoint"),
    ("GPTQ base", edit_base_config(lambda c: {**c, "quantization_config": {"quant_method": "gptq", "bits": 4}}),
     "a gptq-quantized checkpoint"),
]


# Rows that read the adapter's or the base's weights take seconds each: README's tier keeps one of each kind
# (weights, their dtype, adapter config, training record, base config, remote code, tokenizer); the rows refused
# before any of that stay too.
EXPORT_SLOW = {
    "--bnb-quant-type against --merge-base", "--training-config recording nothing",
    "garbage axolotl YAML beside the adapter", "adapter for another base", "target modules match nothing",
    "header lies about offsets", "malformed adapter_config.json", "adapter_config.json without target_modules",
    "unknown PEFT type", "pickle-only adapter", "Inf in adapter weights", "rank disagrees with the tensors",
    "rank far beyond the layer", "negative lora_alpha", "infinite lora_alpha", "lora_dropout of the wrong type",
    "lora_dropout out of range", "target_modules naming nothing", "target_modules naming a norm",
    "DoRA without magnitudes", "use_rslora of the wrong type", "pathological nesting", "manifest of the wrong JSON type",
    "QLoRA manifest without quantization", "QLoRA manifest with a bad block size", "int64 adapter tensor",
}


@pytest.mark.parametrize("case, setup, fragment", tiered(EXPORT_CASES, [c[0] for c in EXPORT_CASES], slow=EXPORT_SLOW))
def test_export_bad_input(case, setup, fragment, tiny_base, tiny_adapter, tmp_path, capsys):
    ctx = {"tmp": tmp_path, "base": tiny_base, "adapter": tiny_adapter, "out": tmp_path / "out",
           "target": "ort-cpu-fp32"}
    setup(ctx)
    adapter = tmp_path / "adapter" if (tmp_path / "adapter").exists() else tiny_adapter
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = main(["export", "--base", str(ctx["base"]), "--adapter", str(adapter), "--target", ctx["target"],
               "--out", str(ctx["out"]), *ctx.get("extra", [])])
    err = capsys.readouterr().err
    ctx.get("cleanup", lambda: None)()
    assert rc == 2, err
    assert fragment in err, err
    assert "Traceback" not in err and "Fix:" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, nothing left half-done
    if case == "output directory not empty":
        assert (ctx["out"] / "precious.txt").read_text() == "keep me"


@pytest.mark.slow
def test_pickle_adapter_is_accepted_when_allowed(tiny_base, tiny_adapter, tmp_path, capsys):
    ctx = {"tmp": tmp_path, "adapter": tiny_adapter}
    pickle_only(ctx)
    rc = main(["export", "--base", str(tiny_base), "--adapter", str(tmp_path / "adapter"), "--target",
               "ort-cpu-fp32", "--out", str(tmp_path / "out"), "--allow-pickle"])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((tmp_path / "out" / "export_manifest.json").read_text())
    assert m["adapter"]["weights_file"] == "adapter_model.bin"


@pytest.mark.parametrize("command", tiered(["validate", "bench"], ["validate", "bench"], slow={"validate"}))
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


@pytest.mark.slow
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


def _export_copy(ctx):
    dst = ctx["tmp"] / "export"
    if not dst.exists():
        shutil.copytree(ctx["export"], dst, ignore=shutil.ignore_patterns("bench-*", "*.log"))
    return dst


def edit_export_manifest(change):
    return edit_json(_export_copy, "export_manifest.json", change)


def without(key):
    return lambda m: {k: v for k, v in m.items() if k != key}


def adapter_entry_without_sha(m):
    for entry in m["adapters"]:
        entry.pop("adapter_model_sha256")
    m["adapter"] = m["adapters"][0]
    return m


def changed_base(ctx):
    """The export's base is edited after the export (its manifest recorded each file's sha256)."""
    from safetensors.torch import load_file, save_file

    base = ctx["tmp"] / "base"
    shutil.copytree(ctx["base"], base)
    f = _export_copy(ctx) / "export_manifest.json"
    m = json.loads(f.read_text())
    m["base"]["path"], m["base"]["relative_path"] = str(base), os.path.relpath(base, f.parent)
    f.write_text(json.dumps(m))
    t = load_file(str(base / "model.safetensors"))
    t["model.norm.weight"] = t["model.norm.weight"] * 1.01
    save_file(t, str(base / "model.safetensors"), metadata={"format": "pt"})


def report_is_a_directory(ctx):
    (ctx["tmp"] / "reports").mkdir()
    ctx["extra"] = ["--report", str(ctx["tmp"] / "reports")]


def long_prompts(ctx):
    (ctx["tmp"] / "long.jsonl").write_text("\n".join(json.dumps({"text": "word " * 400}) for _ in range(8)) + "\n")
    ctx["extra"] = ["--prompts", str(ctx["tmp"] / "long.jsonl")]


# (case, command, setup, message fragment)
EXPORT_DIR_CASES = [
    ("manifest of the wrong JSON type", "validate", edit_export_manifest(lambda m: [m]), "the top level is a JSON list"),
    ("manifest without a target", "validate", edit_export_manifest(without("target")), "target: missing"),
    ("manifest with an incomplete adapter entry", "validate", edit_export_manifest(adapter_entry_without_sha),
     "adapter_model_sha256: missing"),
    ("manifest with a bad merge base", "bench", edit_export_manifest(lambda m: {**m, "merge_base": 4}),
     "merge_base: 4 is not one of nf4, fp4, original"),
    ("base changed since the export", "validate", changed_base, "the base's weights changed since this export"),
    ("base changed since the export (bench)", "bench", changed_base, "the base's weights changed since this export"),
    ("--report is a directory", "validate", report_is_a_directory, "reports: is a directory"),
    ("--junit in a missing folder", "validate", lambda ctx: ctx.update(extra=["--junit", str(ctx["tmp"] / "no" / "j.xml")]),
     "does not exist"),
    ("prompts longer than the context", "validate", long_prompts, "exceeds the model's 128 positions"),
    ("bench --rounds 0", "bench", lambda ctx: ctx.update(extra=["--rounds", "0"]), "--rounds: 0 interleaved rounds"),
    ("bench --json is a directory", "bench", lambda ctx: ctx.update(extra=["--json", str(ctx["tmp"])]), "is a directory"),
]


@pytest.mark.parametrize("case, command, setup, fragment", tiered(
    EXPORT_DIR_CASES, [c[0] for c in EXPORT_DIR_CASES], slow={"prompts longer than the context"}))
def test_export_dir_bad_input(case, command, setup, fragment, fp32_export, tiny_base, tmp_path, capsys):
    ctx = {"tmp": tmp_path, "export": fp32_export.out, "base": tiny_base}
    setup(ctx)
    export = _export_copy(ctx)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    rc = main([command, str(export), *ctx.get("extra", [])])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert fragment in err and "Fix:" in err and "Traceback" not in err, err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before  # nothing written


TRAIN_CASES = [
    ("dropout out of range", ["--dropout", "2"], "--dropout: dropout must lie in [0, 1), got 2.0"),
    ("negative alpha", ["--alpha", "-1"], "--alpha: lora alpha must be a positive number"),
    ("nan learning rate", ["--lr", "nan"], "learning rate must be"),
    ("block size bitsandbytes lacks", ["--blocksize", "48"], "block size 48 is not supported by bitsandbytes"),
]


@pytest.mark.parametrize("case, extra, fragment", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_refuses_bad_settings_before_loading_the_model(case, extra, fragment, tiny_base, tmp_path, capsys,
                                                            monkeypatch):
    import lora_export.base as base

    def never(*a, **k):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(base, "load_nf4", never)
    monkeypatch.setattr(base, "load_fp32", never)
    from .conftest import EMBEDDED

    rc = main(["train", "--base", str(tiny_base), "--data", str(EMBEDDED / "demo" / "train.jsonl"),
               "--out", str(tmp_path / "a"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and fragment in err and "Traceback" not in err, err
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("content", [os.urandom(20_000), b"not json\n" * 500], ids=["random bytes", "text lines"])
def test_a_data_file_that_is_not_jsonl_reports_at_most_20_lines(content, tiny_base, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_bytes(content)
    rc = main(["train", "--base", str(tiny_base), "--data", str(data), "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert rc == 2 and "stopped after 20 bad lines" in err, err
    assert len(err.splitlines()) <= 23, len(err.splitlines())


def test_a_pickle_file_beside_safetensors_is_never_read(tiny_base, tiny_adapter, tmp_path, monkeypatch):
    """adapter_model.bin next to adapter_model.safetensors: the safetensors file is used, the pickle never
    opened (a payload in it would run on torch.load without weights_only)."""
    import builtins

    from lora_export.adapters import load_adapter

    adapter = shutil.copytree(tiny_adapter, tmp_path / "adapter")
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04malicious pickle")
    opened = []
    real_open = builtins.open

    def spy(file, *a, **k):
        opened.append(str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", spy)
    a = load_adapter(adapter, tiny_base)
    assert a.weights_file.name == "adapter_model.safetensors"
    assert not [f for f in opened if f.endswith(".bin")]
