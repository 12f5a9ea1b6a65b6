"""The demo's path: on a tiny model built from a config (fast), and once for real on the embedded default."""

import json
import os
import subprocess
import sys

import pytest

from lora_export.demo import default_out, demo

from .conftest import EMBEDDED


def test_demo_path_on_a_tiny_model(tiny_base, tmp_path, monkeypatch):
    """`lora-export demo` through the CLI, on a tiny model (the embedded default is the slow tier's)."""
    import lora_export.demo

    from lora_export.cli import main

    results = []

    def tiny(out, **kwargs):  # the CLI's own call, with the tiny base and a short training in place of the defaults
        results.append(demo(out, base_dir=tiny_base, data_dir=EMBEDDED / "demo", bench_rounds=6,
                            training=dict(rank=8, alpha=16, steps=30, lr=3e-3, batch_size=8, seed=0), **kwargs))
        return results[-1]

    monkeypatch.setattr(lora_export.demo, "demo", tiny)
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out)])
    (r,) = results
    assert rc == (0 if r.passed else 1)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["adapter", "demo.log", "export-ort-cpu-fp32", "export-ort-cpu-int4", "summary.json", "summary.md"]
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # nothing staged is left beside it
    rows = {row.model.split(" (")[0]: row for row in r.rows}
    assert set(rows) == {"base", "adapted", "export ort-cpu-fp32", "export ort-cpu-int4"}
    assert rows["export ort-cpu-fp32"].parity == "PASS" and rows["export ort-cpu-fp32"].max_abs_diff <= 1e-4
    assert rows["export ort-cpu-int4"].latency_ratio > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passed"] == r.passed
    assert r.table == (out / "summary.md").read_text()


def test_default_out_never_overwrites(tmp_path):
    assert default_out(tmp_path).name == "lora-export-demo-1"
    (tmp_path / "lora-export-demo-1").mkdir()
    assert default_out(tmp_path).name == "lora-export-demo-2"


@pytest.mark.slow
def test_lora_export_demo_end_to_end(tmp_path):
    """`lora-export demo` with no arguments, as a newcomer runs it: the adapter must visibly learn the task."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "lora_export.cli", "demo"], cwd=tmp_path, capture_output=True,
                       text=True, env=env, timeout=600)
    out = tmp_path / "lora-export-demo-1"
    assert p.returncode in (0, 1), p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert p.returncode == (0 if summary["passed"] else 1)
    rows = {r["model"].split(" (")[0]: r for r in summary["rows"]}
    assert rows["base"]["accuracy"] < 0.3 < 0.7 < rows["adapted"]["accuracy"]
    assert rows["export ort-cpu-fp32"]["accuracy"] == rows["adapted"]["accuracy"]
    assert rows["export ort-cpu-fp32"]["parity"] == "PASS"
    assert "| model | task accuracy |" in p.stdout
    assert "[0:" in p.stderr  # progress lines while it works
    # one screen: stage lines, the table and the log's path; every library's output is in demo.log instead
    shown = (p.stdout + p.stderr).splitlines()
    assert len(shown) <= 40, "\n".join(shown)
    assert not [line for line in shown if "Warning" in line or "[INFO]" in line or "Loading weights" in line]
    log = (out / "demo.log").read_text()
    # ONNX Runtime's quantizer INFO lines (40 of them flooded the terminal before) are in the log
    assert f"log: {out / 'demo.log'}" in p.stderr and "matmul_nbits_quantizer" in log and len(log.splitlines()) > len(shown)
    for name in ("bench.json", "bench.md", "bench.png"):  # the bench on the embedded model wrote all three
        assert (out / "export-ort-cpu-fp32" / name).is_file(), name
