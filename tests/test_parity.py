"""Parity as a CI gate: a good export passes; one perturbed weight fails with exit 1 naming the metric."""

import shutil
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
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


@pytest.mark.slow
def test_good_export_passes(fp32_export, tmp_path, capsys):
    rc = main(["validate", str(fp32_export.out), "--junit", str(tmp_path / "p.xml"), "--report", str(tmp_path / "p.json")])
    assert rc == 0, capsys.readouterr()
    suite = ET.parse(tmp_path / "p.xml").getroot()
    # one test case per metric and shape: 3 shapes x (max_rel_diff, mean_kl, greedy_identical_tokens), and the
    # merge stage's KL
    assert suite.get("failures") == "0" and int(suite.get("tests")) == 10
    assert {c.get("classname") for c in suite} >= {"parity.ort-cpu-fp32.merge"}


def test_perturbed_export_fails_naming_the_metric(fp32_export, tmp_path, capsys):
    bad = tmp_path / "bad"
    _perturb(fp32_export.out, bad)
    rc = main(["validate", str(bad), "--junit", str(tmp_path / "p.xml")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "parity FAILED: b1-short/max_rel_diff" in err and "needs <= 0.0001" in err
    suite = ET.parse(tmp_path / "p.xml").getroot()
    failed = [(c.get("classname").rsplit(".", 1)[-1], c.get("name")) for c in suite.iter("testcase")
              if c.find("failure") is not None]
    assert ("b2-padded", "max_rel_diff") in failed and suite.get("failures") == str(len(failed))


def test_report_schema_and_stages(fp32_export):
    import json

    report = json.loads((fp32_export.out / "parity.json").read_text())
    assert report["schema_version"] == 4 and report["passed"] is True
    assert set(report["shapes"]) == {"b1-short", "b1-long", "b2-padded"}
    assert report["steps"] == 64  # fp32: a 64-token greedy continuation must be identical
    for m in report["shapes"].values():
        assert m["greedy_min_identical"] == 64 and m["positions"] > 64 * m["sequences"]
        # metrics along the continuation: one value per generated position, within the shape's own maximum
        assert len(m["along_max_abs_diff"]) == len(m["along_mean_kl"]) == 64
        assert 0 < max(m["along_max_abs_diff"]) <= m["max_abs_diff"]
    png = fp32_export.out / "parity.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "(parity.png)" in (fp32_export.out / "parity.md").read_text()
    # merging into the nf4 base reproduces the trained model; the adapter changed the model a lot more
    assert report["stages"]["merge"]["max_abs_diff"] < 1e-4
    assert report["stages"]["adapter"]["mean_kl"] > 1e3 * report["stages"]["total"]["mean_kl"]
    assert report["adapter_retention"] > 0.999


@pytest.mark.slow
def test_a_targets_tolerances_are_the_ones_applied(tiny_base, tiny_adapter, tmp_path, capsys):
    strict = tmp_path / "strict.toml"
    strict.write_text('name = "strict"\nruntime = "onnxruntime"\nexecution_providers = ["CPUExecutionProvider"]\n'
                      'precision = "fp32"\nbackend = "genai-builder"\n[tolerances]\nmax_abs_diff = 1e-12\n')
    rc = main(["export", "--base", str(tiny_base), "--adapter", str(tiny_adapter), "--target", str(strict),
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and "max_abs_diff" in err and "needs <= 1e-12" in err
    assert (tmp_path / "out" / "model.onnx").is_file()  # the export is complete; its verdict is the exit code


def test_metrics_on_synthetic_logits():
    from lora_export.parity import compare
    from lora_export.runtime import Generation

    rng = np.random.default_rng(0)
    ref = [Generation([1, 2], rng.normal(0, 3, (5, 50)))]
    same = compare(ref, ref, own=ref)
    assert same.max_abs_diff == 0 and same.mean_kl == 0 and same.top1_agreement == 1 and same.rel_l2 == 0
    assert same.cosine == pytest.approx(1) and same.greedy_min_identical == 2
    shifted = compare(ref, [Generation([1, 3], ref[0].logits + 5.0)], own=[Generation([1, 3], ref[0].logits)])
    assert shifted.max_abs_diff == pytest.approx(5) and shifted.mean_kl == pytest.approx(0, abs=1e-12)
    assert shifted.greedy_min_identical == 1  # softmax ignores the shift; the second greedy token differs


@pytest.mark.slow
def test_thresholds_edited_in_the_manifest_show_in_the_report(fp32_export, tmp_path, capsys):
    """Loosening a threshold in export_manifest.json cannot pass silently: the report names the edit."""
    import json

    edited = tmp_path / "edited"
    shutil.copytree(fp32_export.out, edited)
    manifest = json.loads((edited / "export_manifest.json").read_text())
    manifest["target"]["tolerances"]["max_rel_diff"] = 1e6
    (edited / "export_manifest.json").write_text(json.dumps(manifest))
    rc = main(["validate", str(edited)])
    out = capsys.readouterr().out
    report = json.loads((edited / "parity.json").read_text())
    assert rc == 0 and report["tolerance_notes"] and "max_rel_diff" in report["tolerance_notes"][0]
    assert "About the thresholds" in out and "max_rel_diff" in out and "target file" in out
    clean = json.loads((fp32_export.out / "parity.json").read_text())
    assert clean["tolerance_notes"] == [] and clean["reference_dtype"] == "float32"
    assert "dequantized once" in clean["reference"]


def test_streamed_metrics_equal_the_whole_array_formulas():
    """The accumulator reads logits a chunk of rows at a time; its figures are the whole-array ones."""
    from lora_export.parity import Accumulator

    rng = np.random.default_rng(1)
    r = [rng.normal(0, 8, (n, 300)).astype(np.float32) for n in (70, 33, 5)]
    c = [x + rng.normal(0, 0.05, x.shape).astype(np.float32) for x in r]
    acc = Accumulator()
    for a, b in zip(r, c):
        acc.add(a, b)
    m = acc.metrics()
    R, C = np.concatenate(r).astype(np.float64), np.concatenate(c).astype(np.float64)
    lp = R - R.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = C - C.max(-1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
    assert m.positions == 108 and m.sequences == 3
    assert m.max_abs_diff == pytest.approx(np.abs(R - C).max()) and m.mean_abs_diff == pytest.approx(np.abs(R - C).mean())
    assert m.max_rel_diff == pytest.approx(np.abs(R - C).max() / np.abs(R).max())
    assert m.rel_l2 == pytest.approx(np.linalg.norm(R - C) / np.linalg.norm(R))
    assert m.mean_kl == pytest.approx((np.exp(lp) * (lp - lq)).sum(-1).mean())
    assert m.top1_agreement == pytest.approx((R.argmax(-1) == C.argmax(-1)).mean())


def test_metrics_along_the_continuation_locate_the_drift():
    """A candidate that is exact on the prompt and drifts from the 3rd generated position on: the curve says so."""
    from lora_export.parity import Accumulator

    rng = np.random.default_rng(0)
    prompt, generated, vocab = 5, 20, 32
    r = rng.normal(size=(prompt - 1 + generated, vocab)).astype(np.float32)
    c = r.copy()
    c[prompt - 1 + 3:, 0] += 0.5 * np.arange(1, generated - 2)  # one logit, growing with the position
    acc = Accumulator()
    acc.add(r, c, None, continuation=prompt - 1)
    acc.add(r, r, None, continuation=prompt - 1)  # a second, exact sequence: the max is over sequences
    m = acc.metrics()
    assert len(m.along_max_abs_diff) == generated
    assert m.along_max_abs_diff[:3] == (0.0, 0.0, 0.0) and m.along_max_abs_diff[3] == pytest.approx(0.5)
    assert m.along_max_abs_diff[-1] == pytest.approx(0.5 * (generated - 3))
    assert m.along_mean_kl[:3] == (0.0, 0.0, 0.0) and 0 < m.along_mean_kl[3] < m.along_mean_kl[-1]


def test_the_merge_stage_is_judged_and_its_failure_says_why():
    """The merge stage (merged fp32 vs as trained) is a check of its own: whatever the export's own loss, a merge
    into the wrong base fails, and the message points at --merge-base. (Real weights: tests/test_real_model.py.)"""
    from lora_export.parity import Metrics, judge
    from lora_export.targets import DEFAULT_TOLERANCES

    def metrics(kl):
        return Metrics(sequences=1, positions=1, max_abs_diff=0, mean_abs_diff=0, rel_l2=0, cosine=1, mean_kl=kl,
                       max_kl=kl, top1_agreement=1)

    tol = DEFAULT_TOLERANCES["int4"]
    good = judge({"s": metrics(0.01)}, {"merge": metrics(1e-11), "total": metrics(0.01)}, 0.95, tol, "t", "r", 17)
    bad = judge({"s": metrics(0.01)}, {"merge": metrics(0.02), "total": metrics(0.01)}, 0.95, tol, "t", "r", 17)
    assert good.passed and not bad.passed
    (failure,) = bad.failures
    assert failure.shape == "merge" and "--merge-base" in str(failure)


VERIFY_SEQS = [[1, 5, 9, 200, 7, 3, 88, 13], [1, 44, 2], [1, 9, 9, 9, 9, 9, 9, 9, 9, 10, 11, 12, 13, 14]]


@pytest.mark.parametrize("guess", ["greedy", "last token off", "first token off", "random"])
def test_verified_greedy_gives_the_greedy_continuations_and_their_logits(tiny_base, tmp_path, guess):
    """A layerwise reference checks a guess (the export's greedy tokens) in teacher-forced passes instead of decoding
    token by token: whatever the guess, the tokens are greedy decoding's and the stored rows are the teacher-forced
    logits on them (tolerance: 1e-5 absolute on the logits: a pass batches only the sequences left, and batches of
    other widths move fp32 sums by a few ulps; the tokens exactly, the tiny model's having no near ties), in one pass
    for a right guess and at most one per token otherwise."""
    from lora_export.base import load_fp32
    from lora_export.parity import verified_greedy
    from lora_export.runtime import LogitStore, TorchCausalLM, greedy_tokens, teacher_forced

    model, steps = TorchCausalLM(load_fp32(tiny_base)), 8
    want = greedy_tokens(model, VERIFY_SEQS, steps)
    rng = np.random.default_rng(0)
    draft = {"greedy": want, "last token off": [t[:-1] + [(t[-1] + 1) % 1000] for t in want],
             "first token off": [[(t[0] + 1) % 1000] + t[1:] for t in want],
             "random": [rng.integers(0, 1000, steps).tolist() for _ in want]}[guess]
    lines: list[str] = []
    store = LogitStore(tmp_path / "ref.f32")
    tokens = verified_greedy(model, VERIFY_SEQS, [list(d) for d in draft], 64, store, lines.append)
    assert tokens == want
    passes = [line for line in lines if "teacher-forced pass" in line]
    # a guess wrong in its last token only (no input) needs no second pass
    assert (len(passes) == 1) == (guess in ("greedy", "last token off")) and len(passes) <= steps
    expected = dict(teacher_forced(model, [p + t[:-1] for p, t in zip(VERIFY_SEQS, want)], 64))
    for i, rows in expected.items():
        assert np.allclose(store[i], rows, rtol=0, atol=1e-5), (i, float(np.abs(store[i] - rows).max()))
    store.close()


def test_verified_greedy_decodes_what_does_not_settle_within_a_pass_per_token(tmp_path):
    """The guard: a model whose argmax moves with every forward (as a near tie could between batches of other widths)
    never confirms a guess; after one pass per token it is decoded instead, and every sequence gets its rows."""
    from lora_export.parity import verified_greedy
    from lora_export.runtime import LogitStore

    class Restless:
        calls = 0

        def step(self, ids, mask, past, last_only=False, use_cache=True):
            self.calls += 1
            logits = np.zeros((*ids.shape, 10), np.float32)
            logits[..., self.calls % 10] = 1.0
            return (logits[:, -1:] if last_only else logits), past

    seqs, steps, lines = [[1, 2, 3], [4, 5]], 5, []
    store = LogitStore(tmp_path / "ref.f32")
    tokens = verified_greedy(Restless(), seqs, [[0] * steps, [0] * steps], 64, store, lines.append)
    assert len([line for line in lines if "teacher-forced pass" in line]) == steps
    assert any("not settled in 5 passes" in line for line in lines)
    assert [len(t) for t in tokens] == [steps, steps]
    assert [store[i].shape for i in range(2)] == [(len(s) + steps - 1, 10) for s in seqs]
    store.close()
