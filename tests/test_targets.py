"""Targets: every shipped file loads; a bad file gets every problem reported at once."""

import pytest

from lora_export.errors import BadInput
from lora_export.targets import DEFAULT_TOLERANCES, TARGETS_DIR, available, load_target


def test_every_shipped_target_loads():
    names = available()
    assert {"ort-cpu-fp32", "ort-cpu-int8", "ort-cpu-int4", "ort-cuda-fp16", "ort-cuda-int4", "ort-cuda-nf4",
            "ort-tensorrt-fp16"} <= set(names)
    for name in names:
        t = load_target(name)
        assert t.name == name, f"{name}.toml declares name {t.name}"
        assert (TARGETS_DIR / f"{name}.toml").samefile(t.source)


def test_fp32_target_tolerances_are_the_documented_ones():
    t = load_target("ort-cpu-fp32").tolerances
    assert t.max_rel_diff == 1e-4 and t.mean_kl == 1e-6 and t.max_abs_diff is None and t.greedy_tokens == 64


def test_bad_target_lists_every_problem(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nruntime = "onnxruntime"\nprecision = "fp8"\nbackend = "nope"\ncolour = "red"\n'
                   '[quantization]\nscheme = "int4"\nblock_size = 33\n[tolerances]\nmean_kl = "small"\n')
    with pytest.raises(BadInput) as e:
        load_target(bad)
    text = str(e.value)
    # type errors are reported first, with the unknown field, in one error
    assert "colour" in text and "mean_kl" in text
    assert str(bad) in text


def test_semantic_problems_reported_together(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nruntime = "onnxruntime"\nexecution_providers = ["CPUExecutionProvider"]\n'
                   'precision = "fp8"\nbackend = "nope"\ncolour = 1\n[quantization]\nscheme = "int4"\nblock_size = 33\n'
                   '[tolerances]\ntop1_agreement = 1.5\n')
    with pytest.raises(BadInput) as e:
        load_target(bad)
    problems = [p.what for p in e.value.problems]
    assert len(problems) == 5, problems  # unknown field, precision, backend, block size, top-1 range
    assert any("fp8" in p for p in problems) and any("nope" in p for p in problems)
    assert any("block_size 33" in p for p in problems) and any("top1_agreement" in p for p in problems)


MINIMAL = ('name = "mine"\nruntime = "onnxruntime"\nexecution_providers = ["CPUExecutionProvider"]\n'
           'precision = "fp32"\nbackend = "genai-builder"\n')


@pytest.mark.parametrize("quant, expected", [
    ("", DEFAULT_TOLERANCES["fp32"]),
    ('[quantization]\nscheme = "int8"\n', DEFAULT_TOLERANCES["int8"]),
    ('[quantization]\nscheme = "int4"\n', DEFAULT_TOLERANCES["int4"]),
    ('[quantization]\nscheme = "nf4"\nblock_size = 64\nlm_head = "unquantized"\n', DEFAULT_TOLERANCES["nf4"]),
])
def test_tolerances_default_by_precision(tmp_path, quant, expected):
    f = tmp_path / "mine.toml"
    f.write_text(MINIMAL + quant)
    assert load_target(f).tolerances == expected


def test_a_target_overrides_one_tolerance_and_keeps_the_rest(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text(MINIMAL + '[quantization]\nscheme = "int4"\n[tolerances]\nmean_kl = 0.02\n')
    t = load_target(f).tolerances
    assert t.mean_kl == 0.02 and t.top1_agreement == DEFAULT_TOLERANCES["int4"].top1_agreement


def test_fp16_on_the_cpu_is_refused(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text(MINIMAL.replace('"fp32"', '"fp16"'))
    with pytest.raises(BadInput, match="not supported on CPUExecutionProvider"):
        load_target(f)


def test_unknown_target_name_lists_the_shipped_ones():
    with pytest.raises(BadInput, match="ort-cpu-fp32"):
        load_target("no-such-target")


def test_malformed_toml(tmp_path):
    bad = tmp_path / "broken.toml"
    bad.write_text("name = \n")
    with pytest.raises(BadInput, match="not valid TOML"):
        load_target(bad)


# --- targets that cannot lie: every numeric field is range-checked at load --------------------------------

def _with(section: str, line: str, scheme: str | None = None) -> str:
    """MINIMAL plus one line in one section (top level when section is ""); a [quantization] line goes with
    int4, a scheme that reads every one of those fields."""
    scheme = scheme or ("int4" if section == "quantization" else "none")
    quant = f'[quantization]\nscheme = "{scheme}"\n' + (line + "\n" if section == "quantization" else "")
    text = MINIMAL + (line + "\n" if section == "" else "") + quant
    return text + (f"[{section}]\n{line}\n" if section in ("tolerances", "latency") else "")


BAD_VALUES = [  # section, line, what the message must name
    ("tolerances", "max_abs_diff = nan", "tolerances.max_abs_diff = nan is not a finite number"),
    ("tolerances", "max_abs_diff = inf", "tolerances.max_abs_diff = inf is not a finite number"),
    ("tolerances", "max_abs_diff = -inf", "tolerances.max_abs_diff = -inf is not a finite number"),
    ("tolerances", "max_abs_diff = -1e-4", "tolerances.max_abs_diff -0.0001 must be >= 0"),
    ("tolerances", "max_rel_diff = nan", "tolerances.max_rel_diff = nan is not a finite number"),
    ("tolerances", "max_rel_diff = -0.5", "tolerances.max_rel_diff -0.5 must be >= 0"),
    ("tolerances", "mean_kl = inf", "tolerances.mean_kl = inf is not a finite number"),
    ("tolerances", "mean_kl = -0.01", "tolerances.mean_kl -0.01 must be >= 0"),
    ("tolerances", "top1_agreement = nan", "tolerances.top1_agreement = nan is not a finite number"),
    ("tolerances", "top1_agreement = 1.5", "tolerances.top1_agreement 1.5 must be in [0, 1]"),
    ("tolerances", "top1_agreement = -0.1", "tolerances.top1_agreement -0.1 must be in [0, 1]"),
    ("tolerances", "min_adapter_retention = inf", "tolerances.min_adapter_retention = inf is not a finite number"),
    ("tolerances", "min_adapter_retention = 2", "tolerances.min_adapter_retention 2.0 must be in [0, 1]"),
    ("tolerances", "greedy_tokens = -1", "tolerances.greedy_tokens -1 must be a whole number in 0..4096"),
    ("tolerances", "greedy_tokens = 1_000_000_000", "greedy_tokens 1000000000 must be a whole number in 0..4096"),
    ("tolerances", "greedy_tokens = 4097", "tolerances.greedy_tokens 4097 must be"),
    ("", "opset = -1", "opset -1 must be a whole number in 14..23 (the opsets ONNX Runtime 1.32 supports"),
    ("", "opset = 13", "opset 13 must be a whole number in 14..23"),
    ("", "opset = 24", "opset 24 must be a whole number in 14..23"),
    ("quantization", "block_size = 7", "quantization.block_size 7 must be a power of two between 16 and 4096"),
    ("quantization", "block_size = 48", "quantization.block_size 48 must be a power of two"),
    ("quantization", "block_size = 8192", "quantization.block_size 8192 must be a power of two"),
    ("quantization", "block_size = 0", "quantization.block_size 0 must be a power of two"),
    ("quantization", "side_path_block_size = 48", "quantization.side_path_block_size 48 must be a power of two"),
    ("quantization", "accuracy_level = 9", "quantization.accuracy_level 9 must be a whole number in 0..4"),
    ("quantization", "accuracy_level = -1", "quantization.accuracy_level -1 must be a whole number in 0..4"),
    ("latency", "max_ratio = inf", "latency.max_ratio = inf is not a finite number"),
    ("latency", "max_ratio = nan", "latency.max_ratio = nan is not a finite number"),
    ("latency", "max_ratio = 0", "latency.max_ratio 0.0 must be > 0"),
    ("tolerances", "small_model_params = 0", "tolerances.small_model_params 0.0 must be > 0"),
    ("tolerances", "small_mean_kl = nan", "tolerances.small_mean_kl = nan is not a finite number"),
    ("latency", "max_ratio = -1.1", "latency.max_ratio -1.1 must be > 0"),
]


@pytest.mark.parametrize("section, line, message", BAD_VALUES, ids=[b[1] for b in BAD_VALUES])
def test_a_bad_number_is_bad_input_naming_the_field(tmp_path, section, line, message):
    f = tmp_path / "mine.toml"
    f.write_text(_with(section, line))
    with pytest.raises(BadInput) as e:
        load_target(f)
    assert len(e.value.problems) == 1, e.value.problems
    (problem,) = e.value.problems
    assert message in problem.what and problem.where == str(f)
    # every message names a fix with a value that works (or the scheme's own list of them)
    assert "e.g." in problem.fix or (problem.fix.startswith("for scheme int4:") and "one of" in problem.fix)


GOOD_VALUES = [  # the edges of each range load
    ("tolerances", "max_abs_diff = 0"), ("tolerances", "mean_kl = 0.0"), ("tolerances", "max_rel_diff = 1e-3"),
    ("tolerances", "top1_agreement = 1"), ("tolerances", "min_adapter_retention = 0"),
    ("tolerances", "greedy_tokens = 0"), ("tolerances", "greedy_tokens = 4096"), ("tolerances", "max_merge_kl = 0"),
    ("tolerances", "small_model_params = 1"), ("tolerances", "small_top1_agreement = 1"),
    ("", "opset = 22"), ("quantization", "block_size = 16"),
    ("quantization", "block_size = 256"), ("quantization", "accuracy_level = 4"), ("latency", "max_ratio = 1e-3"),
]


@pytest.mark.parametrize("section, line", GOOD_VALUES, ids=[g[1] for g in GOOD_VALUES])
def test_the_edges_of_each_range_load(tmp_path, section, line):
    f = tmp_path / "mine.toml"
    f.write_text(_with(section, line))
    load_target(f)


def test_every_numeric_field_has_a_range():
    from lora_export.targets import _RANGES, _SCHEMA

    numeric = {(s, k) for s, fields in _SCHEMA.items() for k, t in fields.items() if t in (int, float)}
    assert numeric == {(s, k) for s, ranges in _RANGES.items() for k in ranges}


@pytest.mark.parametrize("scheme, block, narrower", [("int4", 7, "MatMulNBits"), ("int8", 8192, "MatMulNBits"),
                                                     ("nf4", 0, "nf4 block_size")])
def test_an_out_of_range_block_size_is_one_problem_with_the_schemes_rule_as_fix(tmp_path, scheme, block, narrower):
    f = tmp_path / "mine.toml"
    lm_head = 'lm_head = "unquantized"\n' if scheme == "nf4" else ""
    f.write_text(_with("quantization", f"block_size = {block}\n{lm_head}", scheme=scheme))
    with pytest.raises(BadInput) as e:
        load_target(f)
    (problem,) = e.value.problems
    assert f"quantization.block_size {block}" in problem.what and narrower in problem.fix


def test_block_size_and_side_path_block_size_out_of_range_are_two_problems(tmp_path):
    """side_path_block_size's rule names a field that contains "block_size": each problem keeps its own fix."""
    f = tmp_path / "mine.toml"
    f.write_text(_with("quantization", "block_size = 8192\nside_path_block_size = 512", scheme="int4"))
    with pytest.raises(BadInput) as e:
        load_target(f)
    problems = {p.what.split()[0]: p for p in e.value.problems}
    assert set(problems) == {"quantization.block_size", "side_path_block_size"}, problems
    assert "side_path" not in problems["quantization.block_size"].fix


def test_a_block_size_in_range_but_not_the_schemes_is_still_refused_by_the_scheme(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text(_with("quantization", "block_size = 1024", scheme="int4"))
    with pytest.raises(BadInput, match="block_size 1024 is not supported for MatMulNBits"):
        load_target(f)


def test_every_bad_number_in_one_file_is_reported_together(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text(MINIMAL + 'opset = 99\n[quantization]\nscheme = "int4"\nblock_size = 7\naccuracy_level = 9\n'
                 '[tolerances]\nmax_abs_diff = nan\nmax_rel_diff = -1\nmean_kl = inf\ntop1_agreement = 2\n'
                 'greedy_tokens = 1000000000\nmin_adapter_retention = -inf\n[latency]\nmax_ratio = 0\n')
    with pytest.raises(BadInput) as e:
        load_target(f)
    named = sorted(p.what.split()[0] for p in e.value.problems)
    assert named == ["latency.max_ratio", "opset", "quantization.accuracy_level", "quantization.block_size",
                     "tolerances.greedy_tokens", "tolerances.max_abs_diff", "tolerances.max_rel_diff",
                     "tolerances.mean_kl", "tolerances.min_adapter_retention", "tolerances.top1_agreement"]
    assert str(e.value).startswith("10 problems:")


def test_a_manifest_table_with_an_absurd_number_is_bad_input():
    from lora_export.targets import parse_target

    data = {**_shipped_table("ort-cpu-fp32"), "tolerances": {"max_abs_diff": 10 ** 400, "mean_kl": float("nan")}}
    with pytest.raises(BadInput) as e:
        parse_target(data, "m.json:target")
    assert len(e.value.problems) == 2 and all(p.where == "m.json:target" for p in e.value.problems)


def test_max_rel_diff_parses_and_is_the_fp32_default(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text(_with("tolerances", "max_rel_diff = 0.002"))
    assert load_target(f).tolerances.max_rel_diff == 0.002
    assert DEFAULT_TOLERANCES["fp32"].max_rel_diff == 1e-4
    assert all(t.max_rel_diff is None for k, t in DEFAULT_TOLERANCES.items() if k != "fp32")


# --- greedy tokens against the model's context --------------------------------------------------------------

@pytest.mark.parametrize("greedy, positions, fits", [(64, 128, True), (127, 128, True), (128, 128, False),
                                                     (4096, 2048, False), (0, 1, True), (1, 1, False)])
def test_check_against_context(greedy, positions, fits):
    from dataclasses import replace

    from lora_export.targets import check_against_context

    base = load_target("ort-cpu-fp32")
    target = replace(base, tolerances=replace(base.tolerances, greedy_tokens=greedy))
    if fits:
        check_against_context(target, positions, "base/config.json")
        return
    with pytest.raises(BadInput) as e:
        check_against_context(target, positions, "base/config.json")
    (problem,) = e.value.problems
    assert problem.where == target.source
    assert f"greedy_tokens = {greedy}" in problem.what and f"context of {positions}" in problem.what
    assert "base/config.json" in problem.what
    assert (f"lower greedy_tokens to at most {positions - 1}" if positions > 1 else "greedy_tokens = 0") in problem.fix


# --- thresholds edited after the fact show -----------------------------------------------------------------

def _shipped_table(name):
    from lora_export.targets import tomllib

    return tomllib.loads((TARGETS_DIR / f"{name}.toml").read_text())


def test_a_shipped_target_has_no_differences():
    from lora_export.targets import tolerance_differences

    assert all(tolerance_differences(load_target(n)) == [] for n in available())


def test_an_edited_manifest_target_lists_each_changed_threshold():
    from lora_export.targets import parse_target, tolerance_differences

    data = _shipped_table("ort-cpu-int4")
    where = "/exports/x/export_manifest.json:target"
    assert tolerance_differences(parse_target(data, where)) == []
    data["tolerances"] = {**data["tolerances"], "mean_kl": 1, "max_rel_diff": 0.5}
    data["latency"] = {"max_ratio": 3.0}
    assert tolerance_differences(parse_target(data, where)) == [
        "tolerances.max_rel_diff = 0.5 (target file ort-cpu-int4.toml says not set)",
        "tolerances.mean_kl = 1 (target file ort-cpu-int4.toml says 0.05)",
        "latency.max_ratio = 3 (target file ort-cpu-int4.toml says 1.1)",
    ]


def test_a_users_target_file_is_compared_with_itself(tmp_path):
    from dataclasses import replace

    from lora_export.targets import tolerance_differences

    f = tmp_path / "mine.toml"
    f.write_text(_with("tolerances", "greedy_tokens = 8"))
    target = load_target(f)
    assert tolerance_differences(target) == []
    edited = replace(target, tolerances=replace(target.tolerances, greedy_tokens=16))
    assert tolerance_differences(edited) == [f"tolerances.greedy_tokens = 16 (target file {f} says 8)"]


def test_no_target_file_to_compare_with():
    from lora_export.targets import parse_target, tolerance_differences

    data = {**_shipped_table("ort-cpu-fp32"), "name": "somebody-elses"}
    (line,) = tolerance_differences(parse_target(data, "/gone/export_manifest.json:target"))
    assert line.startswith("no target file to compare with:") and "somebody-elses" in line


@pytest.mark.parametrize("backend, opset, loads", [
    ("genai-builder", 22, True), ("genai-builder", 21, False), ("genai-builder", 14, False),
    ("torch-dynamo", 18, True), ("torch-dynamo", 21, True), ("torch-dynamo", 17, False), ("torch-dynamo", 23, False),
])
def test_an_opset_the_backend_cannot_write_is_refused(tmp_path, backend, opset, loads):
    """The builder writes one opset and has no option for another: a target asking for one is refused, not
    silently given the builder's (the shipped targets said 21 while the graphs were 22)."""
    f = tmp_path / "mine.toml"
    f.write_text(MINIMAL.replace("genai-builder", backend) + f"opset = {opset}\n")
    if loads:
        assert load_target(f).opset == opset
    else:
        with pytest.raises(BadInput, match=f"opset = {opset}: the {backend} backend writes"):
            load_target(f)


def test_without_an_opset_a_target_gets_its_backends(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text(MINIMAL)
    assert load_target(f).opset == 22
    f.write_text(MINIMAL.replace("genai-builder", "torch-dynamo"))
    assert load_target(f).opset == 21


@pytest.mark.parametrize("scheme, line, ignored", [
    ("none", "block_size = 32", "quantization.block_size has no effect with scheme none"),
    ("int8", 'lm_head = "int4"', "quantization.lm_head has no effect with scheme int8"),
    ("int8", "side_path_block_size = 32", "quantization.side_path_block_size has no effect with scheme int8"),
    ("nf4", "symmetric = false\nlm_head = \"unquantized\"", "quantization.symmetric has no effect with scheme nf4"),
])
def test_a_quantization_field_the_scheme_would_ignore_is_refused(tmp_path, scheme, line, ignored):
    f = tmp_path / "mine.toml"
    f.write_text(_with("quantization", line, scheme=scheme))
    with pytest.raises(BadInput, match=ignored):
        load_target(f)


def test_a_scheme_the_backend_cannot_produce_is_refused(tmp_path):
    """The generic backend has no MatMulNBits pass: an int4 target on it would ship fp32 weights."""
    f = tmp_path / "mine.toml"
    f.write_text(_with("quantization", "block_size = 32", scheme="int4").replace("genai-builder", "torch-dynamo"))
    with pytest.raises(BadInput, match="scheme int4 is not produced by the torch-dynamo backend"):
        load_target(f)


def test_every_shipped_target_sets_only_fields_it_uses():
    for name in available():
        load_target(name)  # refused otherwise


def test_small_model_thresholds_apply_below_their_size_only(tmp_path):
    """A model under small_model_params gets the small_* thresholds (with a note saying so); a larger one the rest."""
    f = tmp_path / "mine.toml"
    f.write_text(MINIMAL + '[quantization]\nscheme = "int4"\n[tolerances]\nmean_kl = 0.05\nsmall_model_params = 1e9\n'
                 'small_mean_kl = 0.5\nsmall_top1_agreement = 0.7\n')
    t = load_target(f).tolerances
    small, note = t.for_model(135_000_000)
    assert (small.mean_kl, small.top1_agreement) == (0.5, 0.7) and small.min_adapter_retention == t.min_adapter_retention
    assert "135M parameters" in note and "mean_kl 0.5" in note
    assert t.for_model(8_000_000_000) == (t, None) and t.for_model(None) == (t, None)
    assert DEFAULT_TOLERANCES["int4"].for_model(1000) == (DEFAULT_TOLERANCES["int4"], None)  # none set: unchanged


def test_every_default_holds_the_merge_exact():
    assert all(t.max_merge_kl is not None and t.max_merge_kl <= 1e-6 for t in DEFAULT_TOLERANCES.values())


def test_an_unknown_int4_algo_is_refused(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text(MINIMAL + '[quantization]\nscheme = "int4"\nalgo = "gptq"\n')
    with pytest.raises(BadInput, match="algo = 'gptq' is not one of"):
        load_target(f)


def test_side_path_block_size_applies_to_graphs_with_side_paths_only(tmp_path):
    """int4: a graph with float LoRA side paths (--switchable, --keep-adapter) is built and checked at
    side_path_block_size; a merged graph at block_size; unset, both at block_size. A size MatMulNBits lacks is refused."""
    f = tmp_path / "mine.toml"
    f.write_text(_with("quantization", "block_size = 64\nside_path_block_size = 32", scheme="int4"))
    q = load_target(f).quantization
    assert (q.for_graph(side_paths=False).block_size, q.for_graph(side_paths=True).block_size) == (64, 32)
    f.write_text(_with("quantization", "block_size = 64", scheme="int4"))
    assert load_target(f).quantization.for_graph(side_paths=True).block_size == 64
    f.write_text(_with("quantization", "side_path_block_size = 1024", scheme="int4"))
    with pytest.raises(BadInput, match="side_path_block_size 1024 is not supported for MatMulNBits"):
        load_target(f)
