"""Faults: a full disk or a SIGKILL in the middle of an export leaves no output directory, and the rerun succeeds."""

import os
import signal
import subprocess
import sys
import time

import pytest

from lora_export.outputs import sweep_stale
from lora_export.pipeline import ExportRequest, export


def test_full_disk_during_the_write_leaves_nothing(tiny_base, tiny_adapter, tmp_path, monkeypatch):
    import lora_export.pipeline as pipeline

    real = pipeline._write_manifest

    def disk_full(export_dir, manifest):
        (export_dir / "export_manifest.json").write_text('{"half": ')
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline, "_write_manifest", disk_full)
    out = tmp_path / "exports" / "model"
    with pytest.raises(OSError, match="No space left"):
        export(ExportRequest(base=tiny_base, adapter=tiny_adapter, target="ort-cpu-fp32", out=out))
    assert list(out.parent.iterdir()) == []
    monkeypatch.setattr(pipeline, "_write_manifest", real)
    assert export(ExportRequest(base=tiny_base, adapter=tiny_adapter, target="ort-cpu-fp32", out=out)).parity.passed


def test_sigkill_mid_export_leaves_no_output_and_the_rerun_succeeds(tiny_base, tiny_adapter, tmp_path):
    out = tmp_path / "exports" / "model"
    argv = [sys.executable, "-m", "lora_export.cli", "export", "--base", str(tiny_base), "--adapter",
            str(tiny_adapter), "--target", "ort-cpu-fp32", "--out", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the graph builder is writing into the staging folder
        logs = list(out.parent.glob(f".{out.name}.partial-*/build.log")) if out.parent.exists() else []
        if logs and logs[0].stat().st_size > 0:
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the export never reached the build")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)  # the builder child dies with its parent (PR_SET_PDEATHSIG)
    assert not out.exists()
    leftovers = list(out.parent.iterdir())
    assert leftovers and all(p.name.startswith(f".{out.name}.") for p in leftovers)  # hidden, never at out
    rerun = subprocess.run(argv, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert (out / "model.onnx").is_file()
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # the killed run's staging was swept


def test_sweep_keeps_a_live_runs_staging(tmp_path):
    out = tmp_path / "x"
    live = tmp_path / f".x.partial-{os.getpid()}-abc"
    dead = tmp_path / ".x.partial-999999999-abc"
    live.mkdir()
    dead.mkdir()
    assert sweep_stale(out) == [dead]
    assert live.exists() and not dead.exists()


def test_too_little_disk_is_refused_before_any_work(tiny_base, tiny_adapter, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from lora_export.errors import BadInput

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**5, 10**5))
    out = tmp_path / "exports" / "model"
    with pytest.raises(BadInput, match="GB free on its disk"):
        export(ExportRequest(base=tiny_base, adapter=tiny_adapter, target="ort-cpu-fp32", out=out))
    assert not out.exists() and not list(tmp_path.glob("exports/.*"))
