"""Targets: every shipped file loads; a bad file gets every problem reported at once."""

import pytest

from lora_export.errors import BadInput
from lora_export.targets import TARGETS_DIR, available, load_target


def test_every_shipped_target_loads():
    names = available()
    assert {"ort-cpu-fp32", "ort-cpu-int4"} <= set(names)
    for name in names:
        t = load_target(name)
        assert t.name == name, f"{name}.toml declares name {t.name}"
        assert (TARGETS_DIR / f"{name}.toml").samefile(t.source)


def test_fp32_target_tolerances_are_the_documented_ones():
    t = load_target("ort-cpu-fp32").tolerances
    assert t.max_abs_diff == 1e-4 and t.greedy_match is True


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
    bad.write_text('name = "x"\nruntime = "onnxruntime"\nexecution_provider = "CPUExecutionProvider"\n'
                   'precision = "fp8"\nbackend = "nope"\n[quantization]\nscheme = "int4"\nblock_size = 33\n'
                   '[tolerances]\ntop1_agreement = 1.5\n')
    with pytest.raises(BadInput) as e:
        load_target(bad)
    problems = [p.what for p in e.value.problems]
    assert len(problems) == 4, problems
    assert any("fp8" in p for p in problems) and any("nope" in p for p in problems)
    assert any("block_size 33" in p for p in problems) and any("top1_agreement" in p for p in problems)


def test_target_without_any_check_is_refused(tmp_path):
    bad = tmp_path / "lax.toml"
    bad.write_text('name = "lax"\nruntime = "onnxruntime"\nexecution_provider = "CPUExecutionProvider"\n'
                   'precision = "fp32"\nbackend = "genai-builder"\n')
    with pytest.raises(BadInput, match="parity could never fail"):
        load_target(bad)


def test_unknown_target_name_lists_the_shipped_ones():
    with pytest.raises(BadInput, match="ort-cpu-fp32"):
        load_target("no-such-target")


def test_malformed_toml(tmp_path):
    bad = tmp_path / "broken.toml"
    bad.write_text("name = \n")
    with pytest.raises(BadInput, match="not valid TOML"):
        load_target(bad)
