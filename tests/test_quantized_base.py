"""QLoRA adapters made by other tools (PEFT + Trainer, TRL, axolotl, Unsloth): the 4-bit base they were trained
against, from command-line flags, records beside the adapter, defaults, or a pre-quantized checkpoint.

"Faithful" is checked against the truth: PEFT's own adapted model on the bitsandbytes 4-bit base loaded as the
training script loaded it (its non-4-bit weights cast to fp32 and bitsandbytes' fp32 matmul path pinned, so
that the comparison is of weights, not of bf16 activations). Tolerances, on logits of scale ~2.5:
faithful <= 1e-4 x max |logit| (measured ~1e-6); a wrong merge base > 1e-2 x max |logit| (measured 0.3-0.5).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import make_base

FAITHFUL = 1e-4  # max |diff| / max |logit| for the merge the adapter was trained against
WRONG = 1e-2  # ... and at least this for a merge into other weights


def _bnb(**kw):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, **kw)


def _peft_adapter(base: Path, out: Path, load_dtype="float32", targets="all-linear", bnb: dict | None = None) -> Path:
    """A QLoRA adapter as a PEFT + Trainer script leaves it: 4-bit base, LoRA attached, trained (here: lora_B
    drawn at random, seeded), save_pretrained: no training_manifest.json."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    quantized = {} if bnb is None else {"quantization_config": _bnb(**bnb)}  # None: a pre-quantized base's own
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=getattr(torch, load_dtype), **quantized)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    torch.manual_seed(1)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    peft.save_pretrained(str(out))
    return out


def _truth(base: Path, adapter: Path, ids, load_dtype="float32", bnb: dict | None = None):
    """PEFT's adapted model on the 4-bit base as the training script loaded it, fp32 activations."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_export.base import pin_fp32_path

    quantized = {} if bnb is None else {"quantization_config": _bnb(**bnb)}  # None: a pre-quantized base's own
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=getattr(torch, load_dtype), **quantized)
    for p in model.parameters():
        if p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
    pin_fp32_path(model)
    with torch.no_grad():
        return PeftModel.from_pretrained(model, str(adapter)).eval()(ids).logits.float()


def _merged_logits(base: Path, adapter_dir: Path, work: Path, ids, merge_base=None, request=None, notes=None):
    import torch

    from lora_export.adapters import load_adapter
    from lora_export.base import load_fp32
    from lora_export.merge import merge
    from lora_export.quantized_base import QuantRequest, plain_base, resolve

    adapter, chosen = resolve(load_adapter(adapter_dir, base), base, merge_base, request or QuantRequest(),
                              (notes.append if notes is not None else print))
    plain = plain_base(base, work)
    merge(plain, [adapter], work / "merged", chosen)
    with torch.no_grad():
        return load_fp32(work / "merged")(ids).logits, adapter, chosen


@pytest.fixture(scope="module")
def qbase(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("qbase") / "base", seed=3)


@pytest.fixture(scope="module")
def ids():
    import torch

    return torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))


AXOLOTL_YAML = "base_model: ./base\nadapter: qlora\nload_in_4bit: true\nlora_r: 8\nsequence_len: 512\n"
OLD_PEFT_CARD = """---
library_name: peft
---
## Training procedure


The following `bitsandbytes` quantization config was used during training:
- quant_method: bitsandbytes
- load_in_8bit: False
- load_in_4bit: True
- llm_int8_threshold: 6.0
- llm_int8_skip_modules: None
- llm_int8_enable_fp32_cpu_offload: False
- llm_int8_has_fp16_weight: False
- bnb_4bit_quant_type: nf4
- bnb_4bit_use_double_quant: True
- bnb_4bit_compute_dtype: bfloat16

### Framework versions


- PEFT 0.6.2
"""
NF4_CONFIG = {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                      "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False}}

# (id, how training loaded the base, what the export is told, extra file beside the adapter, faithful?, chosen base)
CASES = [
    ("peft-nf4-flag", dict(bnb_4bit_quant_type="nf4"), dict(merge_base="nf4"), None, True, "nf4"),
    ("peft-fp4-default-config", dict(), dict(merge_base="fp4"), None, True, "fp4"),
    ("peft-nf4-double-quant-flags", dict(bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
     dict(merge_base="nf4", double_quant=True), None, True, "nf4"),
    # a bf16 checkpoint loaded as transformers 5 loads it by default (dtype="auto": bf16): the assumed load dtype
    ("peft-bf16-checkpoint", dict(bnb_4bit_quant_type="nf4", load_dtype="bfloat16", checkpoint="bf16"),
     dict(merge_base="nf4"), None, True, "nf4"),
    # axolotl stores the codes as bfloat16 (quant_storage): the same codes, and bitsandbytes' CPU forward cannot run
    # that storage, so the truth model here uses uint8
    ("axolotl-yaml", dict(bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True), dict(),
     ("axolotl.yml", AXOLOTL_YAML), True, "nf4"),
    ("trainer-config-json", dict(bnb_4bit_quant_type="nf4"), dict(), ("config.json", json.dumps(NF4_CONFIG)), True,
     "nf4"),
    ("old-peft-model-card", dict(bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True), dict(),
     ("README.md", OLD_PEFT_CARD), True, "nf4"),
    ("wrong-quant-type", dict(bnb_4bit_quant_type="nf4"), dict(merge_base="fp4"), None, False, "fp4"),
    ("no-record-merges-original", dict(bnb_4bit_quant_type="nf4"), dict(), None, False, "original"),
]


@pytest.fixture(scope="module")
def qbase_bf16(qbase, tmp_path_factory) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("qbase-bf16") / "base"
    AutoModelForCausalLM.from_pretrained(str(qbase), dtype=torch.bfloat16).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(qbase)).save_pretrained(str(out))
    return out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_faithful_merge_of_adapters_made_elsewhere(case, qbase, qbase_bf16, ids, tmp_path):
    from lora_export.quantized_base import QuantRequest

    _, trained, told, extra, faithful, chosen_want = case
    trained = dict(trained)
    load_dtype = trained.pop("load_dtype", "float32")
    qbase = qbase_bf16 if trained.pop("checkpoint", "fp32") == "bf16" else qbase
    adapter = _peft_adapter(qbase, tmp_path / "adapter", load_dtype=load_dtype, bnb=trained)
    if extra:
        (adapter / extra[0]).write_text(extra[1])
    truth = _truth(qbase, adapter, ids, load_dtype=load_dtype, bnb=trained)
    told = dict(told)
    merge_base = told.pop("merge_base", None)
    notes: list[str] = []
    got, resolved, chosen = _merged_logits(qbase, adapter, tmp_path / "work", ids, merge_base, QuantRequest(**told),
                                           notes)
    rel = ((got - truth).abs().max() / truth.abs().max()).item()
    print(f"{case[0]}: merge base {chosen}, max |diff| / max |logit| = {rel:.2e}")
    assert chosen == chosen_want
    if faithful:
        assert rel <= FAITHFUL, f"{case[0]}: {rel:.2e}"
    else:
        assert rel > WRONG, f"{case[0]}: {rel:.2e}"
    if chosen == "original":  # said, not silent
        assert any("--merge-base nf4" in n for n in notes), notes
    if extra:
        assert any(extra[0] in s for s in resolved.quantization.sources.values()), resolved.quantization.sources


def test_provenance_of_each_setting(qbase, tmp_path):
    from lora_export.adapters import load_adapter
    from lora_export.quantized_base import QuantRequest, resolve

    adapter = _peft_adapter(qbase, tmp_path / "a", bnb=dict(bnb_4bit_quant_type="nf4"))
    (adapter / "axolotl.yml").write_text(AXOLOTL_YAML + "bnb_config_kwargs:\n  bnb_4bit_use_double_quant: false\n")
    notes: list[str] = []
    resolved, chosen = resolve(load_adapter(adapter, qbase), qbase, None, QuantRequest(blocksize=128), notes.append)
    q = resolved.quantization
    assert chosen == "nf4"
    assert q.settings.double_quant is False and "axolotl.yml" in q.sources["double_quant"]
    assert "axolotl's default" in q.sources["quant_type"]
    assert q.settings.blocksize == 128 and q.sources["blocksize"] == "command line (--bnb-block-size)"
    assert q.sources["load_dtype"].startswith("assumed")
    assert "lm_head" not in q.modules and len(q.modules) == 14  # transformers' own rule: every Linear but the head


@pytest.fixture(scope="module")
def prequantized(qbase, tmp_path_factory):
    """A "-bnb-4bit" checkpoint (save_pretrained of the base loaded in NF4 with double quant, bf16) and a PEFT
    adapter trained on it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("prequantized")
    model = AutoModelForCausalLM.from_pretrained(str(qbase), dtype=torch.bfloat16, quantization_config=_bnb(
        bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True))
    model.save_pretrained(str(root / "base-bnb-4bit"))
    AutoTokenizer.from_pretrained(str(qbase)).save_pretrained(str(root / "base-bnb-4bit"))
    adapter = _peft_adapter(root / "base-bnb-4bit", root / "adapter", targets=["q_proj", "v_proj", "up_proj"])
    return root / "base-bnb-4bit", adapter


def test_prequantized_base_merges_its_codes(prequantized, ids, tmp_path):
    base, adapter = prequantized
    truth = _truth(base, adapter, ids)
    got, resolved, chosen = _merged_logits(base, adapter, tmp_path, ids)
    assert chosen == "nf4" and resolved.quantization.prequantized
    assert resolved.quantization.settings.double_quant and resolved.quantization.settings.blocksize == 64
    assert ((got - truth).abs().max() / truth.abs().max()).item() <= FAITHFUL


@pytest.mark.parametrize("told", [dict(merge_base="original"), dict(request=dict(blocksize=128)),
                                  dict(merge_base="fp4")], ids=["original", "block-size", "fp4"])
def test_prequantized_base_refuses_other_merge_bases(prequantized, told):
    from lora_export.adapters import load_adapter
    from lora_export.errors import BadInput
    from lora_export.quantized_base import QuantRequest, resolve

    base, adapter = prequantized
    with pytest.raises(BadInput) as e:
        resolve(load_adapter(adapter, base), base, told.get("merge_base"), QuantRequest(**told.get("request", {})))
    assert "Fix:" in str(e.value)


@pytest.mark.parametrize("qc, says", [
    ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "8-bit bitsandbytes"),
    ({"quant_method": "gptq", "bits": 4}, "gptq-quantized"),
    ({"quant_method": "fp8"}, "fp8-quantized"),
], ids=["bnb-8bit", "gptq", "fp8"])
def test_other_quantized_bases_are_refused(qc, says, qbase, tmp_path):
    from lora_export.base import check_base
    from lora_export.errors import BadInput

    base = shutil.copytree(qbase, tmp_path / "base")
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "quantization_config": qc}))
    with pytest.raises(BadInput) as e:
        check_base(base)
    assert says in str(e.value) and "full-precision" in str(e.value)


def _cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "lora_export.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
def test_cli_export_and_validate_of_a_peft_qlora_adapter(qbase, tmp_path):
    """As a user types it: --merge-base nf4 alone; the manifest says where each setting came from, parity passes,
    and `validate` later rebuilds the same reference from the manifest."""
    adapter = _peft_adapter(qbase, tmp_path / "adapter", bnb=dict(bnb_4bit_quant_type="nf4"))
    out = tmp_path / "export"
    r = _cli("export", "--base", qbase, "--adapter", adapter, "--target", "ort-cpu-fp32", "--out", out,
             "--merge-base", "nf4", "-v")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "4-bit base of adapter: nf4 [command line (--merge-base nf4)]" in r.stdout + r.stderr
    manifest = json.loads((out / "export_manifest.json").read_text())
    quant = manifest["adapters"][0]["quantization"]
    assert manifest["merge_base"] == "nf4" and quant["quant_type"] == "nf4" and quant["double_quant"] is False
    assert quant["sources"]["blocksize"].startswith("assumed")
    assert "NF4 base as trained" in json.loads((out / "parity.json").read_text())["reference"]
    assert _cli("validate", out).returncode == 0


@pytest.mark.slow
def test_cli_export_of_an_adapter_on_a_prequantized_base(prequantized, tmp_path):
    base, adapter = prequantized
    out = tmp_path / "export"
    r = _cli("export", "--base", base, "--adapter", adapter, "--target", "ort-cpu-fp32", "--out", out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert manifest["merge_base"] == "nf4" and manifest["base"]["prequantized"] is True
    assert manifest["adapters"][0]["quantization"]["prequantized"] is True
    # validate dequantizes the base again into its temporary folder; bench builds the base graph from it
    assert _cli("validate", out).returncode == 0
    r = _cli("bench", out, "--rounds", "2")
    assert r.returncode in (0, 1), r.stdout[-2000:] + r.stderr[-2000:]  # 1: over the latency budget, on 2 rounds
    assert (out / "bench-base" / "model.onnx").is_file() and not list(out.glob(".bench-base.dequantized-*"))
    bad = _cli("export", "--base", base, "--adapter", adapter, "--target", "ort-cpu-fp32", "--out", tmp_path / "x",
               "--merge-base", "original")
    assert bad.returncode == 2 and "no original" in bad.stderr + bad.stdout and not (tmp_path / "x").exists()


# Records and flags that must be refused (exit 2 naming the file or flag), not misread or crashed on.
BAD_RECORDS = [
    ("skip modules not a list", "config.json", json.dumps({"quantization_config": {
        **NF4_CONFIG["quantization_config"], "llm_int8_skip_modules": 5}}), {}, "llm_int8_skip_modules = '5'"),
    ("double quant neither true nor false", "config.json", json.dumps({"quantization_config": {
        **NF4_CONFIG["quantization_config"], "bnb_4bit_use_double_quant": "maybe"}}), {}, "must be true or false"),
    ("axolotl kwargs not a mapping", "axolotl.yml", AXOLOTL_YAML + "bnb_config_kwargs: [1, 2]\n", {}, "not a mapping"),
    ("model card with a monstrous value", "README.md", OLD_PEFT_CARD.replace("- bnb_4bit_quant_type: nf4",
                                                                             "- bnb_4bit_quant_type: " + "-" * 200000),
     {}, "bnb_4bit_quant_type"),
    ("records that disagree", "config.json", json.dumps({"quantization_config": {
        **NF4_CONFIG["quantization_config"], "bnb_4bit_quant_type": "fp4"}}), {"extra": ("axolotl.yml", AXOLOTL_YAML)},
     "two records of the 4-bit base disagree"),
    ("a sub-flag without the type", None, None, {"request": dict(double_quant=True)}, "--bnb-double-quant"),
]


@pytest.mark.parametrize("case", BAD_RECORDS, ids=[c[0] for c in BAD_RECORDS])
def test_bad_records_are_refused_by_name(case, qbase, tmp_path):
    from lora_export.adapters import load_adapter
    from lora_export.errors import BadInput
    from lora_export.quantized_base import QuantRequest, resolve

    _, name, text, more, says = case
    adapter = _peft_adapter(qbase, tmp_path / "adapter", bnb=dict(bnb_4bit_quant_type="nf4"))
    if name:
        (adapter / name).write_text(text)
    if "extra" in more:
        (adapter / more["extra"][0]).write_text(more["extra"][1])
    with pytest.raises(BadInput) as e:
        resolve(load_adapter(adapter, qbase), qbase, None, QuantRequest(**more.get("request", {})))
    assert says in str(e.value) and "Fix:" in str(e.value), str(e.value)


def test_a_false_string_is_not_4bit(qbase, tmp_path):
    from lora_export.adapters import load_adapter
    from lora_export.quantized_base import QuantRequest, resolve

    adapter = _peft_adapter(qbase, tmp_path / "adapter", bnb=dict(bnb_4bit_quant_type="nf4"))
    (adapter / "config.json").write_text(json.dumps({"quantization_config": {
        **NF4_CONFIG["quantization_config"], "load_in_4bit": "false"}}))
    assert resolve(load_adapter(adapter, qbase), qbase, None, QuantRequest(), lambda m: None)[1] == "original"


def _broken_prequantized(prequantized, tmp_path, change):
    from safetensors.torch import load_file, save_file

    base = shutil.copytree(prequantized[0], tmp_path / "base-bnb-4bit")
    tensors = load_file(str(base / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(base / "model.safetensors"))
    return base


def _set_state(key, text):
    import torch

    def change(t):
        t[key] = torch.tensor(list(text.encode()), dtype=torch.uint8)
    return change


Q = "model.layers.0.self_attn.q_proj.weight"
BROKEN = [
    ("absmax missing", lambda t: t.pop(f"{Q}.absmax"), "lacks absmax"),
    ("state not JSON", _set_state(f"{Q}.quant_state.bitsandbytes__nf4", "{not json"), "quant_state cannot be read"),
    ("state names int3", _set_state(f"{Q}.quant_state.bitsandbytes__nf4", json.dumps(
        {"quant_type": "int3", "blocksize": 64, "dtype": "bfloat16", "shape": [64, 64], "nested_blocksize": 256,
         "nested_dtype": "float32", "nested_offset": 0.05})), "not a bitsandbytes 4-bit setting"),
    ("state shape does not fit", _set_state(f"{Q}.quant_state.bitsandbytes__nf4", json.dumps(
        {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [64, 32], "nested_blocksize": 256,
         "nested_dtype": "float32", "nested_offset": 0.05})), "does not fit"),
    ("packed weight without state", lambda t: t.pop(f"{Q}.quant_state.bitsandbytes__nf4"), "have no quant_state"),
]


@pytest.mark.parametrize("case", BROKEN, ids=[c[0] for c in BROKEN])
def test_broken_prequantized_bases_are_refused_before_any_work(case, prequantized, tmp_path):
    from lora_export.errors import BadInput
    from lora_export.quantized_base import prequantized_quantization

    base = _broken_prequantized(prequantized, tmp_path, case[1])
    with pytest.raises(BadInput) as e:
        prequantized_quantization(base)
    assert case[2] in str(e.value) and "Fix:" in str(e.value), str(e.value)


def test_adapters_trained_on_different_bases_are_not_combined(qbase, tmp_path):
    from lora_export.adapters import load_adapter
    from lora_export.errors import BadInput
    from lora_export.pipeline import check_same_base
    from lora_export.quantized_base import QuantRequest, resolve

    a = _peft_adapter(qbase, tmp_path / "a", bnb=dict(bnb_4bit_quant_type="nf4"))
    b = _peft_adapter(qbase, tmp_path / "b", bnb=dict(bnb_4bit_quant_type="nf4"))
    (b / "config.json").write_text(json.dumps(NF4_CONFIG))  # b on record, a not
    resolved = [resolve(load_adapter(p, qbase), qbase, None, QuantRequest(), lambda m: None)[0] for p in (a, b)]
    with pytest.raises(BadInput, match="was trained against another base"):
        check_same_base(resolved)


@pytest.mark.slow
def test_train_on_a_prequantized_base_and_export_it(prequantized, tmp_path):
    """`train` takes a "-bnb-4bit" base as it is (no second quantization); its manifest records the base's own
    4-bit settings, and the export merges into those codes with parity PASS."""
    from tests.conftest import EMBEDDED

    base = prequantized[0]
    adapter = tmp_path / "adapter"
    r = _cli("train", "--base", base, "--data", EMBEDDED / "demo" / "train.jsonl", "--out", adapter, "--steps", "4",
             "--batch-size", "4", "--max-length", "64")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    quant = json.loads((adapter / "training_manifest.json").read_text())["quantization"]
    assert quant["prequantized"] is True and quant["quant_type"] == "nf4" and quant["double_quant"] is True
    r = _cli("export", "--base", base, "--adapter", adapter, "--target", "ort-cpu-fp32", "--out", tmp_path / "export")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((tmp_path / "export" / "export_manifest.json").read_text())["merge_base"] == "nf4"
    bad = _cli("train", "--base", base, "--data", EMBEDDED / "demo" / "train.jsonl", "--out", tmp_path / "x",
               "--no-quant")
    assert bad.returncode == 2 and "already 4-bit" in bad.stderr + bad.stdout
