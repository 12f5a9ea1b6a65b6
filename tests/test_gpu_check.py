"""benchmarks/gpu_check.py cannot rot: its dry run (CPU provider, the 135M shape cut to 2 layers) runs the whole
script in CI and writes the files the GPU run would, labelled as a dry run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the rest of the suite: .ci/run runs it (README, "Run the tests")

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--rounds", "2",
                        "--out-dir", str(tmp_path / "out"), "--work", str(tmp_path / "work")],
                       capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert result["dry_run"] is True and "DRY RUN" in (tmp_path / "out" / "gpu.md").read_text()
    assert result["bandwidth_gbs"] > 0
    rows = result["shapes"]["135m-2l"]
    assert [r["target"] for r in rows] == ["ort-cuda-fp16", "ort-cuda-int4", "ort-cuda-nf4"]
    for row in rows:
        assert row["export_exit"] in (0, 1)  # a verdict (parity on the CPU), never bad input or a crash
        assert row["parity"]["ran_on"] == ["CPUExecutionProvider"]
        assert row["parity"]["not_checked_on"] == ["CUDAExecutionProvider"]
        variants = row["bench"]["variants"]
        # an unmerged export (ort-cuda-nf4) is timed against its base; a merged one also against its side path
        expected = {"merged", "base", "unmerged"} if row["graph"] == "merged" else {"merged", "base"}
        assert row["graph"] == ("unmerged" if row["target"] == "ort-cuda-nf4" else "merged")
        assert set(variants) == expected
        for v in variants.values():
            assert v["decode_ms"] > 0 and v["floor_ms"] > 0 and v["x_floor"] > 0
            assert set(v["prompt_ms_by_length"]) == {"16", "64", "256"}
        assert row["bench"]["merged_over_base"]["ci_low"] <= row["bench"]["merged_over_base"]["median"]
        # onnxruntime-genai's own generator timed the export too (CPU here; plain and CUDA graph on a GPU)
        assert set(row["genai"]) == {"plain"} and row["genai"]["plain"]["decode_ms"] > 0, row["genai"]


def test_gpu_check_budget_skips_targets_and_keeps_what_ran(tmp_path):
    """--budget-s 0: every target after the start is skipped and listed as such (a device lease is short)."""
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--budget-s", "0",
                        "--targets", "ort-cuda-fp16,ort-cuda-int4",
                        "--out-dir", str(tmp_path / "out"), "--work", str(tmp_path / "work")],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 1, p.stderr[-3000:]  # nothing measured: not a success
    rows = json.loads((tmp_path / "out" / "gpu.json").read_text())["shapes"]["135m-2l"]
    assert [(r["target"], r["export_exit"]) for r in rows] == [
        ("ort-cuda-fp16", "skipped (time budget)"), ("ort-cuda-int4", "skipped (time budget)")]
    assert "skipped (time budget)" in (tmp_path / "out" / "gpu.md").read_text()


def test_gpu_torch_dry_run(tmp_path):
    """benchmarks/gpu_torch.py (bitsandbytes' kernels vs our merge; fp16 decode of base/merged/unmerged) on the CPU:
    the tiny shape, so the script cannot rot; its checks hold on the CPU too (fp32 path pinned)."""
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_torch.py"), "--dry-run",
                        "--out-dir", str(tmp_path / "out"), "--work", str(tmp_path / "work")],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "gpu_torch.json").read_text())
    assert result["dry_run"] is True and "DRY RUN" in (tmp_path / "out" / "gpu_torch.md").read_text()
    assert result["errors"] == []
    bnb = result["bnb"]
    assert bnb["codes"]["packed_code_bytes"] > 0 and bnb["codes"]["differing_code_bytes"] == 0  # same kernel: CPU
    assert bnb["faithful_passes"] and bnb["faithful_vs_fp32_compute"] <= 1e-4
    assert bnb["wrong_detected"] and bnb["original_vs_fp32_compute"] >= 1e-2
    (row,) = result["latency"]
    assert set(row["decode_ms"]) == {"base", "merged", "unmerged (PEFT)", "PEFT on NF4 base (as trained)"}
    assert all(ms > 0 for ms in row["decode_ms"].values())
