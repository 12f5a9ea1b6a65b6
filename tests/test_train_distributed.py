"""`lora-export train` under `torchrun`: two CPU processes (DDP over gloo), as README promises for many GPUs.

Both ranks train (the world size is in the log and the manifest, and every optimizer step consumes both ranks'
batches), only rank 0 writes the adapter (nothing else appears beside it, no log of rank 1 is left anywhere), the
adapter loads in plain PEFT and exports with parity PASS; a run terminated by SIGTERM after a checkpoint resumes
from it with --resume and finishes.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import EMBEDDED

pytestmark = pytest.mark.slow  # the rest of the suite: .ci/run runs it (README, "Run the tests")

DATA = EMBEDDED / "demo" / "train.jsonl"
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "training_manifest.json", "tokenizer.json",
                 "tokenizer_config.json", "README.md", "train.log"}


def _torchrun(*train_args: str) -> list[str]:
    torchrun = Path(sys.executable).parent / "torchrun"
    launcher = [str(torchrun)] if torchrun.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    return [*launcher, "--standalone", "--nproc_per_node", "2", "-m", "lora_export.cli", "train", *train_args]


@pytest.fixture
def env(tmp_path) -> dict:
    """One thread per process (two ranks on a small machine), and a private TMPDIR to see what is left there."""
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    return {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp), "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}


def _trainer_logs(log: Path) -> list[dict]:
    """The Trainer's own log records (dict lines) in train.log."""
    return [ast.literal_eval(line) for line in log.read_text().splitlines() if line.startswith("{'")]


def _our_leftovers(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.rglob("*lora-export*"))


def test_two_processes_train_and_only_rank_0_writes(tiny_base, tmp_path, env):
    from peft import PeftModel

    from lora_export.base import Nf4Settings, load_nf4

    work = tmp_path / "work"
    work.mkdir()
    out = work / "adapter"
    steps, batch = 6, 4
    p = subprocess.run(_torchrun("--base", str(tiny_base), "--data", str(DATA), "--out", str(out), "--steps",
                                 str(steps), "--batch-size", str(batch)),
                       env=env, cwd=work, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    # the terminal: rank 0 speaks for both (one result line, one log line)
    assert p.stdout.count("adapter written to") == 1, p.stdout
    assert p.stderr.count("log: ") == 1 and "[rank 1]" not in p.stderr, p.stderr

    # only rank 0 wrote: the adapter's files and nothing else, beside it or in the temporary folder
    assert {f.name for f in out.iterdir()} == ADAPTER_FILES
    assert sorted(f.name for f in work.iterdir()) == ["adapter"]  # no lock, partial or checkpoint sibling
    assert _our_leftovers(Path(env["TMPDIR"])) == []  # rank 1's log is removed once the run succeeded

    # both ranks trained: two processes over gloo, and each step took a batch from each of them
    log = (out / "train.log").read_text()
    assert "in 2 processes (DDP over gloo)" in log
    manifest = json.loads((out / "training_manifest.json").read_text())
    assert manifest["training"]["world_size"] == 2 and manifest["training"]["device"] == "cpu"
    assert manifest["training"]["gradient_checkpointing"] is True
    sequences = manifest["data"]["sequences"]
    last = [r for r in _trainer_logs(out / "train.log") if "loss" in r][-1]
    assert float(last["epoch"]) == pytest.approx(steps * batch * 2 / sequences, rel=1e-3)
    assert manifest["training"]["final_loss"] < manifest["training"]["first_loss"]

    # the adapter is plain PEFT, and it exports with parity
    model = PeftModel.from_pretrained(load_nf4(tiny_base, Nf4Settings()), str(out))
    b = [m for n, m in model.named_modules() if n.endswith("q_proj.lora_B.default")][0]
    assert b.weight.abs().max() > 0
    export = subprocess.run([sys.executable, "-m", "lora_export.cli", "export", "--base", str(tiny_base), "--adapter",
                             str(out), "--target", "ort-cpu-fp32", "--out", str(tmp_path / "export")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert export.returncode == 0, export.stdout[-3000:] + export.stderr[-3000:]
    assert "PASS" in export.stdout


def test_terminated_run_resumes_from_its_checkpoint(tiny_base, tmp_path, env):
    """SIGTERM to torchrun's process group (what a scheduler does) once the first checkpoint is complete; the
    rerun with --resume starts from the last complete checkpoint and finishes."""
    from lora_export.train import checkpoint_dir

    work = tmp_path / "work"
    work.mkdir()
    out = work / "adapter"
    steps = 80  # ~40 ms a step here: the first checkpoint (step 4) comes seconds before the end
    args = ("--base", str(tiny_base), "--data", str(DATA), "--out", str(out), "--steps", str(steps),
            "--save-steps", "4", "--batch-size", "2", "--max-length", "32")
    ckpt = checkpoint_dir(out)
    run = subprocess.Popen(_torchrun(*args), env=env, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(ckpt.glob("checkpoint-*/trainer_state.json")):  # written last: the checkpoint is complete
        assert run.poll() is None, f"exited ({run.returncode}) before a checkpoint:\n{run.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.01)
    os.killpg(run.pid, signal.SIGTERM)
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode != 0, "the run finished before it was terminated: raise steps"
    assert "terminated (SIGTERM)" in stderr and "rerun with --resume" in stderr, stderr[-3000:]
    assert not out.exists() and "adapter written" not in stdout
    assert sorted(f.name for f in work.iterdir()) == [ckpt.name]  # no lock or partial sibling, no adapter
    kept = sorted(int(c.name.split("-")[1]) for c in ckpt.glob("checkpoint-*") if (c / "trainer_state.json").is_file())
    assert kept and kept[-1] < steps

    p = subprocess.run(_torchrun(*args, "--resume"), env=env, cwd=work, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    log = (out / "train.log").read_text()
    assert f"resuming from checkpoint-{kept[-1]} (step {kept[-1]} of {steps})" in log
    logged = [int(n) for n in re.findall(rf"step (\d+)/{steps}: loss", log)]
    assert logged and logged[0] > kept[-1] and logged[-1] == steps, log  # continued, not started again
    m = json.loads((out / "training_manifest.json").read_text())["training"]
    assert m["resumed"] is True and m["resumed_from_step"] == kept[-1] and m["world_size"] == 2
    assert m["steps"] == steps and m["final_loss"] < m["first_loss"]
    assert {f.name for f in out.iterdir()} == ADAPTER_FILES
    assert sorted(f.name for f in work.iterdir()) == ["adapter"]  # the checkpoints are removed at the end
    assert _our_leftovers(Path(env["TMPDIR"])) == []
