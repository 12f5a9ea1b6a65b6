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
    assert t.max_abs_diff == 1e-4 and t.greedy_tokens == 64


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
