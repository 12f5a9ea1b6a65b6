"""--switchable: one base graph with LoRA inputs, one .onnx_adapter per adapter; --into; validate per adapter;
onnxruntime-genai itself switching between the adapters. Tiny Llama, PEFT-made adapters of different ranks."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lora_export.cli import main

from .conftest import EMBEDDED, make_base, tiered
from .test_merge_semantics import _make_adapter

TARGET = "ort-cpu-fp32"
NF4_RECORD = {"quantization_config": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                      "bnb_4bit_use_double_quant": True, "quant_method": "bitsandbytes"}}


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("switchable")
    base = make_base(root / "base")
    return {
        "root": root, "base": base,
        "a1": _make_adapter(base, root / "a1", seed=1, r=4, lora_alpha=8, target_modules="all-linear"),
        "a2": _make_adapter(base, root / "a2", seed=2, r=8, lora_alpha=16, target_modules="all-linear"),
        # rsLoRA, rank 16, on a subset of the modules: the others get a zero update from its file
        "a3": _make_adapter(base, root / "a3", seed=3, r=16, lora_alpha=16, use_rslora=True,
                            target_modules=["q_proj", "v_proj"]),
    }


@pytest.fixture(scope="module")
def export_dir(parts):
    out = parts["root"] / "export"
    rc = main(["export", "--base", str(parts["base"]), "--adapter", str(parts["a1"]), "--adapter", str(parts["a2"]),
               "--adapter-name", "first", "--adapter-name", "second", "--target", TARGET, "--out", str(out),
               "--switchable"])
    assert rc == 0, f"export --switchable exited {rc}"
    return out


def test_export_writes_one_base_graph_and_an_adapter_file_each(export_dir, parts):
    files = {p.name: p for p in (export_dir / "adapters").iterdir()}
    assert sorted(files) == ["first.onnx_adapter", "second.onnx_adapter"]
    manifest = json.loads((export_dir / "export_manifest.json").read_text())
    assert manifest["graph"] == "switchable" and manifest["merge_base"] == "original"
    from lora_export.fingerprint import sha256_file

    for entry, adapter in zip(manifest["adapters"], ("a1", "a2")):
        assert Path(entry["path"]) == parts[adapter].resolve()
        assert entry["file_sha256"] == sha256_file(export_dir / entry["file"])
        assert "quantization" in entry and entry["quantization"] is None
    assert manifest["parity"]["sections"] == {"base": True, "first": True, "second": True}
    # the LoRA weights are graph inputs with a dynamic rank; the adapter files hold ranks 4 and 8
    from lora_export.export.lora_inputs import adapter_ranks, lora_inputs

    inputs = lora_inputs(export_dir / "model.onnx")
    assert len(inputs) == 2 * 2 * 7  # layers x (A, B) x the seven linear layers
    ranks = [adapter_ranks(files[n])[inputs[0].name] for n in sorted(files)]
    assert [r[1] if inputs[0].kind == "A" else r[0] for r in ranks] == [4, 8]
    # an adapter file is small beside the base graph
    base_bytes = sum(p.stat().st_size for p in export_dir.glob("model.onnx*"))
    assert files["second.onnx_adapter"].stat().st_size < base_bytes / 5


def _greedy(model, prompt, steps):
    ids, mask, past, out = np.array([prompt]), np.ones((1, len(prompt)), np.int64), None, []
    for _ in range(steps):
        logits, past = model.step(ids, mask, past)
        out.append(int(logits[0, -1].argmax()))
        ids, mask = np.array([[out[-1]]]), np.ones((1, mask.shape[1] + 1), np.int64)
    return out


PROMPT = [1, 15, 27, 99, 4, 8, 300, 41]


def test_our_runner_switches_adapters(export_dir):
    from lora_export.runtime import OrtCausalLM

    ids, mask = np.array([PROMPT]), np.ones((1, len(PROMPT)), np.int64)
    logits = {name: OrtCausalLM(export_dir, adapter=export_dir / "adapters" / f"{name}.onnx_adapter" if name else None)
              .step(ids, mask, None)[0] for name in (None, "first", "second")}
    assert np.abs(logits["first"] - logits[None]).max() > 1e-2  # each adapter changes the output ...
    assert np.abs(logits["second"] - logits[None]).max() > 1e-2
    assert np.abs(logits["first"] - logits["second"]).max() > 1e-2  # ... differently
    again = OrtCausalLM(export_dir).step(ids, mask, None)[0]
    assert np.array_equal(again, logits[None])  # no adapter: the base, every time


def _genai(export_dir, names, steps):
    """generate(name or None): onnxruntime-genai's greedy tokens after PROMPT with that adapter file active."""
    import onnxruntime_genai as og

    model = og.Model(str(export_dir))
    adapters = og.Adapters(model)
    for name in names:
        adapters.load(str(export_dir / "adapters" / f"{name}.onnx_adapter"), name)

    def generate(name):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(PROMPT) + steps, do_sample=False)
        generator = og.Generator(model, params)
        if name:
            generator.set_active_adapter(adapters, name)
        generator.append_tokens(PROMPT)
        while not generator.is_done():
            generator.generate_next_token()
        return [int(t) for t in generator.get_sequence(0)][len(PROMPT):]

    return generate


def test_onnxruntime_genai_switches_adapters_like_our_runner(export_dir):
    pytest.importorskip("onnxruntime_genai")
    from lora_export.runtime import OrtCausalLM

    steps = 12
    generate = _genai(export_dir, ("first", "second"), steps)
    seen = {}
    for name in ("first", None, "second", "first"):  # switching back and forth between generations
        ours = _greedy(OrtCausalLM(export_dir, adapter=export_dir / "adapters" / f"{name}.onnx_adapter"
                                   if name else None), PROMPT, steps)
        theirs = generate(name)
        assert theirs == ours, name
        seen[name] = theirs
    assert len({tuple(t) for t in seen.values()}) == 3  # the three differ: the switch is real


@pytest.mark.slow
def test_into_adds_an_adapter_and_validate_checks_every_section(export_dir, parts, tmp_path, capsys):
    into = tmp_path / "export"
    shutil.copytree(export_dir, into)
    graph_before = (into / "model.onnx.data").read_bytes()
    log_before = (into / "export.log").read_text()
    parity_before = json.loads((into / "parity.json").read_text())
    assert list(parity_before["sections"]) == ["base", "first", "second"]
    rc, out, err = run(["export", "--base", parts["base"], "--adapter", parts["a3"], "--into", into], capsys)
    assert rc == 0, err
    assert (into / "adapters" / "a3.onnx_adapter").is_file()
    assert (into / "model.onnx.data").read_bytes() == graph_before  # the base graph is not rebuilt
    manifest = json.loads((into / "export_manifest.json").read_text())
    assert [e["name"] for e in manifest["adapters"]] == ["first", "second", "a3"]
    assert manifest["parity"]["sections"]["a3"] is True
    # export.log: the first export's log, then this run's under a header line
    log = (into / "export.log").read_text()
    assert log.startswith(log_before) and log.count("===== export --into") == 1
    added = log[len(log_before):]
    assert "===== export --into" in added and str(parts["a3"]) in added and "validating parity" in added
    # the top-level parity.json/md cover every adapter now in the export: the earlier sections as they were
    parity_now = json.loads((into / "parity.json").read_text())
    assert list(parity_now["sections"]) == ["base", "first", "second", "a3"] and parity_now["passed"]
    for name in ("base", "first", "second"):
        assert parity_now["sections"][name] == parity_before["sections"][name]
    assert parity_now["sections"]["a3"]["adapter_retention"] > 0.99
    md = (into / "parity.md").read_text()
    assert "| a3 | a3 | PASS |" in md and "# Section: a3" in md and "# Section: second" in md
    assert not list(into.glob("*.tmp"))

    rc, out, err = run(["validate", into, "--report", tmp_path / "report.json"], capsys)
    assert rc == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] and list(report["sections"]) == ["base", "first", "second", "a3"]
    for name in ("first", "second", "a3"):
        assert report["sections"][name]["adapter_retention"] > 0.99
        assert "# Section: " + name in out


@pytest.mark.slow
def test_qlora_adapters_get_their_nf4_base(parts, tmp_path, capsys):
    """Two QLoRA adapters on the same NF4 base: the base graph is dequant(NF4(W)), so each adapter (and no adapter)
    matches its as-trained reference at fp32 tolerances; a plain LoRA adapter beside them is refused."""
    qlora = []
    for name in ("a1", "a2"):
        q = shutil.copytree(parts[name], tmp_path / f"{name}-qlora")
        (q / "config.json").write_text(json.dumps(NF4_RECORD))
        qlora.append(q)
    rc, _, err = run(["export", "--base", parts["base"], "--adapter", parts["a1"], "--adapter", qlora[1],
                      "--target", TARGET, "--out", tmp_path / "mixed", "--switchable"], capsys)
    assert rc == 2 and "different bases" in err and not (tmp_path / "mixed").exists()
    rc, out, err = run(["export", "--base", parts["base"], "--adapter", qlora[0], "--adapter", qlora[1],
                        "--target", TARGET, "--out", tmp_path / "q", "--switchable"], capsys)
    assert rc == 0, err
    manifest = json.loads((tmp_path / "q" / "export_manifest.json").read_text())
    assert manifest["merge_base"] == "nf4"
    assert all(e["quantization"]["quant_type"] == "nf4" for e in manifest["adapters"])
    assert manifest["parity"]["passed"]


def _peft_logits(base, adapter, ids):
    import torch
    from peft import PeftModel

    from lora_export.base import load_fp32

    model = PeftModel.from_pretrained(load_fp32(base), str(adapter)).eval()  # unmerged: PEFT's own forward
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.float().numpy()


@pytest.mark.slow
def test_graph_covers_the_union_of_the_adapters_target_modules(parts, tmp_path, capsys):
    """Adapters on disjoint modules: the graph has LoRA inputs for all four modules; each adapter's file leaves the
    modules it does not adapt empty (rank 0), and each matches PEFT's unmerged forward. --into takes an adapter on a
    subset of the graph's modules and refuses one that adapts a module the graph has no input for."""
    from lora_export.export.lora_inputs import adapter_ranks, lora_inputs
    from lora_export.runtime import OrtCausalLM

    base = parts["base"]
    x = _make_adapter(base, tmp_path / "x", seed=4, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    y = _make_adapter(base, tmp_path / "y", seed=5, r=8, lora_alpha=8, target_modules=["o_proj", "down_proj"])
    out = tmp_path / "export"
    rc, _, err = run(["export", "--base", base, "--adapter", x, "--adapter", y, "--target", TARGET, "--out", out,
                      "--switchable"], capsys)
    assert rc == 0, err
    inputs = lora_inputs(out / "model.onnx")
    assert {i.module for i in inputs} == {"q_proj", "v_proj", "o_proj", "down_proj"}
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert manifest["parity"]["sections"] == {"base": True, "x": True, "y": True}
    ids, mask = np.array([PROMPT]), np.ones((1, len(PROMPT)), np.int64)
    base_logits = OrtCausalLM(out).step(ids, mask, None)[0]
    for adapter, mine in ((x, {"q_proj", "v_proj"}), (y, {"o_proj", "down_proj"})):
        path = out / "adapters" / f"{adapter.name}.onnx_adapter"
        ranks = adapter_ranks(path)
        for i in inputs:
            rank = ranks[i.name][1] if i.kind == "A" else ranks[i.name][0]
            assert (rank > 0) == (i.module in mine), (adapter.name, i.name, rank)
        ours = OrtCausalLM(out, adapter=path).step(ids, mask, None)[0]
        peft = _peft_logits(base, adapter, [PROMPT])
        assert np.abs(peft - base_logits).max() > 1e-2  # the adapter changes the output ...
        np.testing.assert_allclose(ours, peft, atol=2e-4, rtol=1e-4)  # ... and the export changes it the same way
    if importlib.util.find_spec("onnxruntime_genai"):  # its runtime takes the rank-0 entries too
        generate = _genai(out, ("x", "y"), 8)
        for name in ("x", "y"):
            path = out / "adapters" / f"{name}.onnx_adapter"
            assert generate(name) == _greedy(OrtCausalLM(out, adapter=path), PROMPT, 8), name

    before = sorted(p.name for p in (out / "adapters").iterdir())
    rc, _, err = run(["export", "--base", base, "--adapter", parts["a1"], "--into", out], capsys)  # all-linear
    assert rc == 2 and "Traceback" not in err, err
    assert str(parts["a1"] / "adapter_config.json") in err and "no LoRA input" in err and "Fix:" in err, err
    assert sorted(p.name for p in (out / "adapters").iterdir()) == before
    rc, _, err = run(["export", "--base", base, "--adapter", parts["a3"], "--into", out], capsys)  # q_proj, v_proj
    assert rc == 0, err
    assert json.loads((out / "export_manifest.json").read_text())["parity"]["sections"]["a3"] is True


@pytest.mark.slow
def test_int4_base_graph_with_float_lora_inputs_is_as_faithful_as_the_merged_int4_export(tmp_path, capsys):
    """ort-cpu-int4: the base weights are MatMulNBits, the LoRA side paths float MatMuls whose weights are inputs;
    each section is judged with the int4 target's own tolerances, and an adapter's section measures what the
    merged int4 export of the same adapter measures or better (the switch costs no accuracy over merging). On the
    embedded 4-layer base int4 alone misses the target's top-1 (both exports do): the verdict is compared, not
    required. Each section's weights are the base as trained quantized again, exactly."""
    import onnx

    from lora_export.checkpoint import parameter_count
    from lora_export.export.lora_inputs import lora_inputs
    from lora_export.targets import load_target

    base = EMBEDDED / "base"
    x = _make_adapter(base, tmp_path / "x", seed=4, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    y = _make_adapter(base, tmp_path / "y", seed=5, r=8, lora_alpha=8, target_modules="all-linear")
    out = tmp_path / "switchable"
    rc, _, err = run(["export", "--base", base, "--adapter", x, "--adapter", y, "--target", "ort-cpu-int4", "--out",
                      out, "--switchable"], capsys)
    assert rc in (0, 1) and (out / "adapters" / "y.onnx_adapter").is_file(), err
    nodes = onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node
    side = [n for n in nodes if "/lora_" in n.name]
    layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    assert len(side) == layers * 7 * 2 and {n.op_type for n in side} == {"MatMul"}
    inputs = lora_inputs(out / "model.onnx")
    assert len(inputs) == len(side) and {i.dtype for i in inputs} == {"float32"}
    quantized = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert len(quantized) == layers * 7 + 1  # every base linear layer and lm_head

    report = json.loads((out / "parity.json").read_text())
    assert list(report["sections"]) == ["base", "x", "y"] and (rc == 0) == report["passed"]
    tol, note = load_target("ort-cpu-int4").tolerances.for_model(parameter_count(base))
    assert note is not None  # the embedded base is below 1B parameters: the small-model thresholds apply
    for section in report["sections"].values():
        limits = {c["metric"]: c["threshold"] for c in section["checks"]}
        assert limits["mean_kl"] == tol.mean_kl and limits["top1_agreement"] == tol.top1_agreement
        source = {c["metric"]: (c["observed"], c["passed"]) for c in section["checks"]
                  if c["metric"] in ("matmuls_off_their_source", "matmuls_compared")}
        assert source == {"matmuls_off_their_source": (0, True),  # the base as trained, requantized: exactly
                          "matmuls_compared": (layers * 7, True)}
    assert {c["threshold"] for c in report["sections"]["y"]["checks"] if c["metric"] == "adapter_retention"} == {
        tol.min_adapter_retention}

    rc, _, err = run(["export", "--base", base, "--adapter", y, "--target", "ort-cpu-int4", "--out",
                      tmp_path / "merged"], capsys)
    assert rc in (0, 1), err
    merged = json.loads((tmp_path / "merged" / "parity.json").read_text())
    mine = report["sections"]["y"]
    assert mine["adapter_retention"] > 0.5  # the adapter survives int4 ...
    # ... at least as well as merged: the base graph's blocks are smaller (side_path_block_size 32 against 64)
    assert mine["adapter_retention"] > merged["adapter_retention"] - 0.05
    ratio = mine["stages"]["total"]["mean_kl"] / merged["stages"]["total"]["mean_kl"]
    assert ratio < 1.33, ratio


def _not_switchable(ctx):
    fake = shutil.copytree(ctx["export"], ctx["tmp"] / "merged")
    manifest = json.loads((fake / "export_manifest.json").read_text())
    (fake / "export_manifest.json").write_text(json.dumps({**manifest, "graph": "merged"}))
    return fake


BAD = {  # case: (argv after `export`, fragment of the message)
    "into-not-switchable": (lambda c: ["--base", c["base"], "--adapter", c["a3"], "--into", _not_switchable(c)],
                            "not a switchable export"),
    "into-other-base": (lambda c: ["--base", make_base(c["tmp"] / "other", seed=7), "--adapter", c["a3"],
                                   "--into", c["export"]], "not those of the base"),
    "adapter-of-another-base": (lambda c: ["--base", c["base"], "--adapter", _make_adapter(
        make_base(c["tmp"] / "wide", hidden_size=32, intermediate_size=64), c["tmp"] / "wide-adapter", r=4,
        target_modules="all-linear"), "--target", TARGET, "--out", c["tmp"] / "out", "--switchable"],
        "trained for a different base"),
    "dora": (lambda c: ["--base", c["base"], "--adapter", _make_adapter(c["base"], c["tmp"] / "dora", r=4,
                        use_dora=True, target_modules="all-linear"), "--target", TARGET, "--out", c["tmp"] / "out",
                        "--switchable"], "DoRA"),
    "name-count": (lambda c: ["--base", c["base"], "--adapter", c["a1"], "--adapter", c["a2"], "--adapter-name",
                              "one", "--target", TARGET, "--out", c["tmp"] / "out", "--switchable"], "2 adapters"),
    "same-name": (lambda c: ["--base", c["base"], "--adapter", c["a1"], "--adapter", c["a2"], "--adapter-name",
                             "x", "--adapter-name", "x", "--target", TARGET, "--out", c["tmp"] / "out",
                             "--switchable"], "used twice"),
    "name-taken": (lambda c: ["--base", c["base"], "--adapter", c["a3"], "--adapter-name", "first", "--into",
                              c["export"]], "already has it"),
    "keep-adapter": (lambda c: ["--base", c["base"], "--adapter", c["a1"], "--target", TARGET, "--out",
                                c["tmp"] / "out", "--switchable", "--keep-adapter"], "--keep-adapter"),
    "adapter-weight": (lambda c: ["--base", c["base"], "--adapter", c["a1"], "--adapter-weight", "0.5", "--target",
                                  TARGET, "--out", c["tmp"] / "out", "--switchable"], "--adapter-weight"),
    "name-without-switchable": (lambda c: ["--base", c["base"], "--adapter", c["a1"], "--adapter-name", "x",
                                           "--target", TARGET, "--out", c["tmp"] / "out"], "--switchable"),
    "int8-target": (lambda c: ["--base", c["base"], "--adapter", c["a1"], "--target", "ort-cpu-int8", "--out",
                               c["tmp"] / "out", "--switchable"], "this target quantizes to int8"),
}


@pytest.mark.parametrize("case", tiered(list(BAD), list(BAD), slow={"adapter-of-another-base", "dora"}))
def test_bad_input_exits_2(case, export_dir, parts, tmp_path, capsys):
    argv, fragment = BAD[case]
    ctx = {**parts, "export": export_dir, "tmp": tmp_path}
    before = sorted(p.name for p in (export_dir / "adapters").iterdir())
    rc, _, err = run(["export", *argv(ctx)], capsys)
    assert rc == 2, (case, err)
    assert fragment in err and "Fix:" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in (export_dir / "adapters").iterdir()) == before


def test_bench_times_each_adapter_and_the_switch(export_dir):
    from lora_export.switchable_bench import NO_ADAPTER, bench, markdown

    r = bench(export_dir, PROMPT, rounds=2, new_tokens=4)
    assert set(r.decode_ms) == {NO_ADAPTER, "first", "second"} and set(r.decode_ratio) == {"first", "second"}
    assert r.switch_ms["onnxruntime"] > 0 and all(0 < b < r.base_bytes for b in r.adapter_bytes.values())
    assert "switch the active adapter" in markdown(r)
