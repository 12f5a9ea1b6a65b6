"""Faults: a full disk or a SIGKILL in the middle of an export leaves no output directory, and the rerun succeeds."""

import os
import signal
import subprocess
import sys
import time

import pytest

from lora_export.outputs import sweep_stale
from lora_export.pipeline import ExportRequest, export

from .conftest import tiered


@pytest.mark.slow
def test_full_disk_during_the_write_leaves_nothing(tiny_base, tiny_adapter, tmp_path, monkeypatch):
    import lora_export.pipeline as pipeline

    real = pipeline.write_export_manifest

    def disk_full(export_dir, manifest):
        (export_dir / "export_manifest.json").write_text('{"half": ')
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline, "write_export_manifest", disk_full)
    out = tmp_path / "exports" / "model"
    with pytest.raises(OSError, match="No space left"):
        export(ExportRequest(base=tiny_base, adapter=tiny_adapter, target="ort-cpu-fp32", out=out))
    assert list(out.parent.iterdir()) == []
    monkeypatch.setattr(pipeline, "write_export_manifest", real)
    assert export(ExportRequest(base=tiny_base, adapter=tiny_adapter, target="ort-cpu-fp32", out=out)).parity.passed


@pytest.mark.slow
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


def _wait_for(predicate, proc, what: str, timeout: float = 120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"the command ended (exit {proc.returncode}) before {what}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"never reached {what}")


@pytest.mark.parametrize("sig, code, stage", tiered([(signal.SIGTERM, 143, "build"), (signal.SIGINT, 130, "merge")],
                                                     ["SIGTERM-build", "SIGINT-merge"], slow={"SIGTERM-build"}))
def test_a_signal_mid_export_cleans_up_before_exiting(sig, code, stage, tiny_base, tiny_adapter, tmp_path):
    """SIGTERM (a CI job cancelled, a pod evicted) and SIGINT remove the staging and scratch folders, the lock
    and the child processes' work before the command exits; nothing is left beside --out."""
    out = tmp_path / "exports" / "model"
    argv = [sys.executable, "-m", "lora_export.cli", "export", "--base", str(tiny_base), "--adapter",
            str(tiny_adapter), "--target", "ort-cpu-fp32", "--out", str(out)]
    # A background job (`pytest &`) inherits SIGINT ignored; give the child the default handling a terminal gives it.
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    if stage == "build":
        _wait_for(lambda: any(p.stat().st_size > 0 for p in out.parent.glob(f".{out.name}.partial-*/build.log")),
                  proc, "the graph build")
    else:
        _wait_for(lambda: any(out.parent.glob(f".{out.name}.merged-*/checkpoint*")), proc, "the merge")
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err[-2000:]
    assert "nothing partial was left behind" in err and "Traceback" not in err
    assert list(out.parent.iterdir()) == []  # no output, no hidden staging or scratch folder, no lock


@pytest.mark.slow
def test_sigterm_mid_validate_removes_its_temporary_merge(fp32_export, tmp_path):
    """validate merges again into a temporary folder (a 7B model: 28 GB); SIGTERM removes it, and one left by a
    SIGKILL is swept by the next validate."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    argv = [sys.executable, "-m", "lora_export.cli", "validate", str(fp32_export.out)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _wait_for(lambda: any(tmp.glob("lora-export-parity-*/merged*")), proc, "the temporary merge")
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in err, err[-2000:]
    # ours: the parity folder (merge, logits) and the log; ONNX Runtime keeps a 51-byte session id file (.ses)
    assert [p.name for p in tmp.iterdir() if p.name != ".ses"] == []
    stale = tmp / "lora-export-parity-999999999-abc"  # a SIGKILLed validate's folder (its process is gone)
    (stale / "merged").mkdir(parents=True)
    from lora_export.outputs import sweep_temp

    kept = tmp / f"lora-export-parity-{os.getpid()}-live"  # a running validate's folder stays
    kept.mkdir()
    import tempfile

    old = tempfile.tempdir
    tempfile.tempdir = str(tmp)
    try:
        assert sweep_temp("lora-export-parity-") == [stale]
    finally:
        tempfile.tempdir = old
    assert kept.exists() and not stale.exists()


def test_an_output_claimed_by_a_live_run_is_refused_at_once(tmp_path):
    from lora_export.errors import BadInput
    from lora_export.outputs import staged

    out = tmp_path / "x"
    with staged(out):
        with pytest.raises(BadInput, match="another lora-export"):
            with staged(out):
                pass
    (tmp_path / ".x.lock").write_text("999999999")  # a killed run's lock file: nobody holds its lock
    with staged(out) as tmp:
        (tmp / "f").write_text("done")
    assert (out / "f").read_text() == "done" and sorted(p.name for p in tmp_path.iterdir()) == ["x"]
