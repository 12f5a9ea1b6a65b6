"""benchmarks/gpu_check.py cannot rot: its dry run (CPU provider, the 135M shape cut to 2 layers) runs the whole
script in CI and writes the files the GPU run would, labelled as a dry run."""

import json
import subprocess
import sys
from pathlib import Path

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
        assert set(variants) == {"merged", "base", "unmerged"}
        for v in variants.values():
            assert v["decode_ms"] > 0 and v["floor_ms"] > 0 and v["x_floor"] > 0
            assert set(v["prompt_ms_by_length"]) == {"16", "64", "256"}
        assert row["bench"]["merged_over_base"]["ci_low"] <= row["bench"]["merged_over_base"]["median"]
