"""Parity as a CI gate: a good export passes; one perturbed weight fails with exit 1 naming the metric."""

import shutil
import xml.etree.ElementTree as ET

import numpy as np
import onnx
from onnx import numpy_helper

from lora_export.cli import main


def _perturb(src, dst, scale=0.05):
    """Copy an export, adding noise to one weight matrix (the first MLP down projection)."""
    shutil.copytree(src, dst)
    for f in ("model.onnx", "model.onnx.data"):
        (dst / f).unlink()
    model = onnx.load(str(src / "model.onnx"))
    for init in model.graph.initializer:
        if "mlp.down_proj" in init.name:
            w = numpy_helper.to_array(init)
            noisy = w + np.random.default_rng(0).normal(0, scale, w.shape).astype(w.dtype)
            init.CopyFrom(numpy_helper.from_array(noisy, init.name))
            break
    else:
        raise AssertionError("no down_proj weight found")
    onnx.save_model(model, str(dst / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
                    all_tensors_to_one_file=True)


def test_good_export_passes(fp32_export, tmp_path, capsys):
    rc = main(["validate", str(fp32_export.out), "--junit", str(tmp_path / "p.xml"), "--report", str(tmp_path / "p.json")])
    assert rc == 0, capsys.readouterr()
    suite = ET.parse(tmp_path / "p.xml").getroot()
    assert suite.get("failures") == "0" and int(suite.get("tests")) == 2


def test_perturbed_export_fails_naming_the_metric(fp32_export, tmp_path, capsys):
    bad = tmp_path / "bad"
    _perturb(fp32_export.out, bad)
    rc = main(["validate", str(bad), "--junit", str(tmp_path / "p.xml")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "parity FAILED: max_abs_diff" in err and "needs <= 0.0001" in err
    suite = ET.parse(tmp_path / "p.xml").getroot()
    failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None]
    assert "max_abs_diff" in failed and suite.get("failures") == str(len(failed))


def test_targets_tolerances_are_the_ones_applied(fp32_export, tmp_path):
    import json

    report = json.loads((fp32_export.out / "parity.json").read_text())
    assert report["schema_version"] == 1
    checks = {c["metric"]: c for c in report["checks"]}
    assert checks["max_abs_diff"]["threshold"] == 1e-4 and checks["greedy_match"]["threshold"] == 1.0
    assert report["metrics"]["positions"] > report["metrics"]["prompts"]  # decode steps were compared too
