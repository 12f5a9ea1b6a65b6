"""The 4-bit base a QLoRA adapter was trained against: its settings, where each came from, and 4-bit checkpoints.

A QLoRA adapter learned its update against dequant(quant_4bit(W)), not W. Merging faithfully needs the exact
settings bitsandbytes quantized with. They come from, most trusted first:

- a pre-quantized base (a bitsandbytes 4-bit ``save_pretrained``, the "-bnb-4bit" checkpoints): the codes
  themselves, with the quant_state stored beside each weight; nothing to choose;
- the training manifest lora-export's trainer writes ("trained here");
- a record the training tool left: a ``quantization_config`` in a config.json, PEFT's model card
  (README.md: "The following `bitsandbytes` quantization config was used during training", written by
  PEFT versions up to 0.6 and found on many hub adapters), an axolotl YAML (``adapter: qlora``), in the
  adapter directory or given with ``--training-config``;
- the command line (``--merge-base nf4|fp4`` and the ``--bnb-*`` flags), which overrides a record and says so;
- defaults for what none of these gives: transformers' ``BitsAndBytesConfig`` (block size 64, no double
  quantization, uint8 storage) and ``from_pretrained``'s default dtype "auto" (the checkpoint's dtype).

The settings and the source of each go to the progress output and into the export manifest, and the parity
reference is built with the same settings, so the gate measures the merge that was asked for.
"""

from __future__ import annotations

import ast
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .base import BLOCKSIZES, Nf4Settings, is_prequantized, quantization_config
from .checkpoint import shard_files, shard_names, tensor_index, write_fp32_config, write_index
from .errors import BadInput, Problem, raise_if
from .jsonfile import read_object
from .progress import Progress, quiet

FOUR_BIT = ("nf4", "fp4")  # merge bases that reproduce the 4-bit base (named by the quant type)
DTYPES = ("float32", "bfloat16", "float16")
TRAINED_HERE = "trained here (training_manifest.json)"
ASSUMED = "assumed: transformers' default"
PEFT_CARD = "The following `bitsandbytes` quantization config was used during training:"
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
QUANT_STATE = ".quant_state.bitsandbytes__"
FLAGS = {"quant_type": "--bnb-quant-type", "blocksize": "--bnb-block-size", "double_quant": "--bnb-double-quant",
         "load_dtype": "--bnb-load-dtype"}


@dataclass(frozen=True)
class QuantRequest:
    """What the command line says about the 4-bit base (None: not given)."""

    quant_type: str | None = None
    blocksize: int | None = None
    double_quant: bool | None = None
    load_dtype: str | None = None
    training_config: Path | None = None  # a file the training tool wrote that records the settings

    def given(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and k != "training_config"}


@dataclass(frozen=True)
class Quantization:
    """How the base a QLoRA adapter saw was quantized: settings, the 4-bit modules, and where each setting came from."""

    settings: Nf4Settings
    modules: tuple[str, ...]
    sources: dict = field(default_factory=dict)  # setting -> where it came from
    prequantized: bool = False  # the base checkpoint holds the 4-bit codes themselves

    def to_dict(self) -> dict:
        return {**self.settings.to_dict(), "quantized_modules": list(self.modules), "sources": dict(self.sources),
                "prequantized": self.prequantized}

    @classmethod
    def from_dict(cls, d: dict) -> Quantization:
        """From a training manifest's quantization block or an export manifest's record of one."""
        d = dict(d)
        modules = tuple(d.pop("quantized_modules"))
        sources = d.pop("sources", None) or trained_here()  # a training manifest records none
        prequantized = bool(d.pop("prequantized", False))
        return cls(settings=Nf4Settings(**d), modules=modules, sources=sources, prequantized=prequantized)

    def key(self) -> str:
        """Equal for adapters that saw the same 4-bit codes (compute dtype and storage dtype do not change them)."""
        codes = {k: v for k, v in self.settings.to_dict().items() if k not in ("compute_dtype", "quant_storage")}
        return json.dumps([codes, sorted(self.modules)], sort_keys=True)

    def describe(self) -> str:
        s, src = self.settings, self.sources
        if self.prequantized:
            return (f"{s.quant_type} codes of the pre-quantized base (block {s.blocksize}, double quant "
                    f"{'on' if s.double_quant else 'off'}; {src.get('quant_type', '')})")
        parts = [f"{s.quant_type} [{src.get('quant_type', '?')}]", f"block {s.blocksize} [{src.get('blocksize', '?')}]",
                 f"double quant {'on' if s.double_quant else 'off'} [{src.get('double_quant', '?')}]",
                 f"quantized from {s.load_dtype} [{src.get('load_dtype', '?')}]"]
        return ", ".join(parts)


def trained_here() -> dict:
    """The sources of a quantization the training chose itself (a training manifest's block records no sources)."""
    return {k: TRAINED_HERE for k in Nf4Settings.__dataclass_fields__}


def quantization_of(adapter) -> tuple[list[str], Nf4Settings]:
    """The 4-bit modules and settings a QLoRA adapter was trained against (``resolve``)."""
    return list(adapter.quantization.modules), adapter.quantization.settings


# --- pre-quantized bases -------------------------------------------------------------------------------------


def prequantized_quantization(base_dir: Path) -> Quantization:
    """The settings of a pre-quantized 4-bit base, read from the quant_state stored with its weights."""

    where = str(Path(base_dir) / "config.json")
    qc = quantization_config(base_dir) or {}
    entries = tensor_index(base_dir)
    states = sorted(n for n in entries if QUANT_STATE in n)
    if not states:
        raise BadInput.one(where, "says the weights are bitsandbytes 4-bit, but no weight has a quant_state",
                           "save the 4-bit model again with save_pretrained(), or pass its full-precision original")
    state = check_prequantized(base_dir, entries, states)
    source = f"read from the quant_state in {Path(base_dir).name}'s weights"
    settings = Nf4Settings(quant_type=state["quant_type"], blocksize=int(state["blocksize"]),
                           double_quant="nested_blocksize" in state,
                           quant_storage=str(qc.get("bnb_4bit_quant_storage", "uint8")).replace("torch.", ""),
                           load_dtype=state.get("dtype", "float32"))
    modules = tuple(n.split(QUANT_STATE)[0].rpartition(".")[0] for n in states)
    return Quantization(settings=settings, modules=modules, sources={k: source for k in FLAGS} |
                        {"quant_storage": f"read from {where}"}, prequantized=True)


def check_prequantized(base_dir: Path, entries: dict, states: list[str]) -> dict:
    """Every 4-bit weight of a pre-quantized base, before any work: its quant_state parses, names nf4/fp4 and a
    shape its packed codes fit, its parts (absmax, quant_map, the nested ones with double quantization) are
    there, every packed weight has a state and every state a weight, and all share one setting. Returns it."""
    from .tensorfile import read_tensor

    fix = "save the 4-bit model again with save_pretrained(), or pass its full-precision original with --base"
    problems: list[Problem] = []
    settings = None
    for name in states:
        weight = name.split(QUANT_STATE)[0]
        shard, entry = entries[name]
        where = f"{shard}:{weight}"
        try:
            with open(shard, "rb") as f:
                state = json.loads(bytes(read_tensor(f, entry).tolist()).decode())
            shape = [int(d) for d in state["shape"]]
            setting = (state["quant_type"], int(state["blocksize"]), "nested_blocksize" in state,
                       state.get("dtype", "float32"))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            problems.append(Problem(where, f"its quant_state cannot be read ({type(e).__name__}: {str(e)[:80]})", fix))
            continue
        if setting[0] not in FOUR_BIT or setting[1] not in BLOCKSIZES or setting[3] not in DTYPES:
            problems.append(Problem(where, f"its quant_state says {setting[0]!r}, block {setting[1]}, dtype "
                                    f"{setting[3]!r}: not a bitsandbytes 4-bit setting", fix))
            continue
        needed = ["absmax", "quant_map"] + (["nested_absmax", "nested_quant_map"] if setting[2] else [])
        missing = [p for p in needed if f"{weight}.{p}" not in entries]
        if weight not in entries or missing:
            problems.append(Problem(where, f"lacks {', '.join(missing) or 'its packed weight'}", fix))
            continue
        packed = math.prod(entries[weight][1].shape)
        if len(shape) != 2 or packed * 2 not in (math.prod(shape), math.prod(shape) + 1):
            problems.append(Problem(where, f"its quant_state shape {shape} does not fit {packed} packed bytes", fix))
        if settings is None:
            settings = (setting, state)
        elif setting != settings[0]:
            problems.append(Problem(where, f"quantized with {setting[:3]}, other layers with {settings[0][:3]}: "
                                    "lora-export reproduces one setting per base", fix))
    stated = {n.split(QUANT_STATE)[0] for n in states}
    loose = sorted(n for n, (_, e) in entries.items() if e.dtype == "U8" and n.endswith(".weight") and n not in stated)
    if loose:
        problems.append(Problem(f"{entries[loose[0]][0]}:{loose[0]}", f"{len(loose)} packed weight(s) have no "
                                "quant_state", fix))
    raise_if(problems)
    return settings[1]


def dequantize_base(base_dir: Path, out_dir: Path, progress: Progress = quiet) -> Path:
    """Write the pre-quantized base as an fp32 checkpoint: every 4-bit weight dequantized once by bitsandbytes
    (exactly the weights its fp32 path multiplies with in training), the rest as stored; shard by shard."""
    import bitsandbytes.functional as bnbf
    import torch

    from .base import load_tokenizer
    from .tensorfile import Writer, read_tensor

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = tensor_index(base_dir)
    parts = {}  # weight name -> its quant-state component names
    for name in entries:
        if QUANT_STATE in name:
            weight = name.split(QUANT_STATE)[0]
            parts[weight] = [n for n in entries if n.startswith(weight + ".")]
    skip = {n for names in parts.values() for n in names}
    shards = shard_files(base_dir)
    files = shard_names(len(shards))
    weight_map = {}
    handles = {shard: open(shard, "rb") for shard in shards}
    try:
        for i, shard in enumerate(shards):
            progress(f"  dequantizing 4-bit shard {i + 1}/{len(shards)} ({shard.name})")
            mine = [(n, e) for n, (s, e) in entries.items() if s == shard and n not in skip]
            declared = []
            for name, e in mine:
                if name in parts:
                    state = _state(name, parts[name], entries, handles)
                    declared.append((name, "F32", tuple(state.shape)))
                else:
                    declared.append((name, "F32" if e.dtype in SAFETENSORS_DTYPES else e.dtype, e.shape))
            writer = Writer(out_dir / files[i], declared)
            for name, e in mine:
                t = read_tensor(handles[shard], e)
                if name in parts:
                    state = _state(name, parts[name], entries, handles)
                    t = bnbf.dequantize_4bit(t, state)
                if t.is_floating_point():
                    t = t.to(torch.float32)
                writer.write(name, t)
                weight_map[name] = files[i]
            writer.close()
    finally:
        for f in handles.values():
            f.close()
    if len(files) > 1:
        write_index(out_dir, weight_map)
    write_fp32_config(base_dir, out_dir)
    if (base_dir / "generation_config.json").is_file():
        (out_dir / "generation_config.json").write_bytes((base_dir / "generation_config.json").read_bytes())
    load_tokenizer(base_dir).save_pretrained(str(out_dir))
    return out_dir


def _state(weight: str, names: list[str], entries: dict, handles: dict):
    import bitsandbytes.functional as bnbf
    import torch

    from .tensorfile import read_tensor

    qs = {n[len(weight) + 1:]: read_tensor(handles[entries[n][0]], entries[n][1]) for n in names}
    state = bnbf.QuantState.from_dict(qs, device="cpu")
    state.dtype = torch.float32  # code x scale exactly, as bitsandbytes' matmul computes it for fp32 inputs
    return state


def plain_base(base_dir: Path, work: Path, progress: Progress = quiet) -> Path:
    """The base as full-precision weights: itself, or a pre-quantized base dequantized into ``work``."""
    if not is_prequantized(base_dir):
        return Path(base_dir)
    out = Path(work) / "base-dequantized"
    if not (out / "config.json").is_file():
        progress("dequantizing the pre-quantized 4-bit base once (the weights the adapter was trained against)")
        dequantize_base(base_dir, out, progress)
    return out


# --- records the training tools leave -------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """Settings a file says the adapter was trained with (bitsandbytes / BitsAndBytesConfig names)."""

    path: str
    where: str
    values: dict  # quant_type, blocksize, double_quant, quant_storage, load_dtype, skip_modules (any subset)
    four_bit: bool  # the file says the base was loaded in 4-bit
    eight_bit: bool = False
    defaults: dict = field(default_factory=dict)  # the tool's own defaults for what the file leaves out
    defaults_from: str = ""


def _flag(value, where: str, key: str, problems: list[Problem]) -> bool | None:
    """A true/false setting as JSON, YAML or a model card writes it; anything else is a problem, not False."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    problems.append(Problem(where, f"{key} = {str(value)[:40]!r}: it must be true or false",
                            "restore the file the training run wrote, or remove it"))
    return None


def _from_bnb_config(qc, where: str, problems: list[Problem]) -> dict:
    """BitsAndBytesConfig.to_dict() names -> ours, each value checked (a wrong type names the file)."""
    fix = "restore the file the training run wrote, or remove it"
    if not isinstance(qc, dict):
        problems.append(Problem(where, f"the quantization settings are a {type(qc).__name__}, not a mapping", fix))
        return {}
    out = {}
    for key, ours in (("bnb_4bit_quant_type", "quant_type"), ("bnb_4bit_quant_storage", "quant_storage")):
        if qc.get(key) is not None:
            value = str(qc[key]).replace("torch.", "")
            allowed = FOUR_BIT if ours == "quant_type" else DTYPES + ("uint8",)
            if value not in allowed:
                problems.append(Problem(where, f"{key} = {value[:40]!r} is not one of {', '.join(allowed)}", fix))
            out[ours] = value
    double = _flag(qc.get("bnb_4bit_use_double_quant"), where, "bnb_4bit_use_double_quant", problems)
    if double is not None:
        out["double_quant"] = double
    skip = qc.get("llm_int8_skip_modules")
    if skip is not None:  # [] quantizes the output head too (transformers' rule); None leaves it out
        if not (isinstance(skip, list) and all(isinstance(m, str) for m in skip)):
            problems.append(Problem(where, f"llm_int8_skip_modules = {str(skip)[:60]!r}: it must be a list of module "
                                    "names", fix))
        else:
            out["skip_modules"] = list(skip)
    return out


def _loaded_in(qc: dict, where: str, problems: list[Problem]) -> tuple[bool, bool]:
    """(4-bit, 8-bit) as a BitsAndBytesConfig dict says; a method other than bitsandbytes is neither."""
    if qc.get("quant_method", "bitsandbytes") != "bitsandbytes":
        return False, False
    four = _flag(qc.get("load_in_4bit", qc.get("_load_in_4bit")), where, "load_in_4bit", problems)
    eight = _flag(qc.get("load_in_8bit", qc.get("_load_in_8bit")), where, "load_in_8bit", problems)
    return bool(four), bool(eight)


def _card_record(path: Path, problems: list[Problem]) -> Record | None:
    """PEFT's model card block (PEFT <= 0.6 wrote it on save_pretrained of a model loaded in 4-bit)."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
    except OSError:
        return None
    if PEFT_CARD not in lines:
        return None
    if lines.count(PEFT_CARD) > 1:
        problems.append(Problem(str(path), "holds two bitsandbytes quantization blocks", "keep the one of this adapter"))
        return None
    qc = {}
    for line in lines[lines.index(PEFT_CARD) + 1:]:
        if not line.startswith("- "):
            if qc:
                break
            continue
        key, _, value = line[2:].partition(":")
        value = value.strip()
        try:  # values are Python reprs: True, None, 'nf4', ['lm_head']; a long one is not a setting
            qc[key.strip()] = ast.literal_eval(value) if len(value) < 1000 else value
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            qc[key.strip()] = value
    where = f"{path} (PEFT's model card)"
    four, eight = _loaded_in(qc, where, problems)
    return Record(path=str(path), where=f"read from {where}", values=_from_bnb_config(qc, where, problems), four_bit=four,
                  eight_bit=eight)


def _config_record(path: Path, problems: list[Problem]) -> Record | None:
    cfg = read_object(path, "restore the file, or remove it", problems)
    qc = cfg.get("quantization_config") if cfg else None
    if qc is None:
        return None
    where = f"{path} (quantization_config)"
    if not isinstance(qc, dict):
        problems.append(Problem(where, f"is a {type(qc).__name__}, not a mapping", "restore the file, or remove it"))
        return None
    four, eight = _loaded_in(qc, where, problems)
    return Record(path=str(path), where=f"read from {where}", values=_from_bnb_config(qc, where, problems), four_bit=four,
                  eight_bit=eight)


# axolotl's bitsandbytes settings for `adapter: qlora` with `load_in_4bit: true` (src/axolotl/loaders/model.py),
# before its bnb_config_kwargs; other 4-bit runs get transformers' BitsAndBytesConfig defaults
AXOLOTL_DEFAULTS = {"quant_type": "nf4", "double_quant": True, "quant_storage": "bfloat16"}


def _axolotl_record(path: Path, problems: list[Problem]) -> Record | None:
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, RecursionError, yaml.YAMLError) as e:
        problems.append(Problem(str(path), f"is not readable YAML ({type(e).__name__})", "restore the file, or remove it"))
        return None
    if not isinstance(cfg, dict) or not ("adapter" in cfg or "load_in_4bit" in cfg):
        return None
    where = f"{path} (axolotl config)"
    four = bool(_flag(cfg.get("load_in_4bit"), where, "load_in_4bit", problems))
    eight = bool(_flag(cfg.get("load_in_8bit"), where, "load_in_8bit", problems))
    qlora = cfg.get("adapter") == "qlora" and four
    if cfg.get("adapter") == "qlora" and not four and not eight:
        four = qlora = True  # axolotl's qlora recipe loads in 4-bit
    values = _from_bnb_config(cfg.get("bnb_config_kwargs") or {}, where, problems)
    dtype = next((d for key, d in (("bf16", "bfloat16"), ("fp16", "float16")) if cfg.get(key) in (True, "auto")),
                 None)
    if dtype:
        values["load_dtype"] = dtype  # axolotl loads the model in its torch_dtype, then quantizes
    return Record(path=str(path), where=f"read from {where}", values=values, four_bit=four, eight_bit=eight and not four,
                  defaults=dict(AXOLOTL_DEFAULTS) if qlora else {},
                  defaults_from=f"axolotl's default for adapter: qlora ({path.name})")


def _read_any(path: Path, problems: list[Problem]) -> Record | None:
    if path.suffix in (".yml", ".yaml"):
        return _axolotl_record(path, problems)
    return _card_record(path, problems) if path.suffix == ".md" else _config_record(path, problems)


def find_record(records: list[Record], problems: list[Problem], adapter_dir: Path,
                training_config: Path | None = None) -> tuple[Record | None, list[str]]:
    """(the record of the 4-bit settings, the other files that hold one): --training-config, else the files in
    the adapter directory (``records``, read by ``_records_in`` with ``problems``), which must agree."""
    if training_config is not None:
        path = Path(training_config)
        if not path.is_file():
            raise BadInput.one(str(path), "--training-config file not found",
                               "pass the axolotl YAML, config.json or README.md the training run wrote")
        own: list[Problem] = []
        record = _read_any(path, own)
        raise_if(own)
        if record is None or not (record.four_bit or record.eight_bit):
            raise BadInput.one(str(path), "records no bitsandbytes quantization settings",
                               "pass the file the training tool wrote (axolotl YAML with adapter: qlora, a config.json "
                               "with quantization_config, PEFT's README.md), or give them with --bnb-* flags")
        return record, [r.where for r in records if r.where != record.where]
    raise_if(problems)
    if not records:
        return None, []
    first = records[0]
    for other in records[1:]:
        if _disagree(first, other):
            raise BadInput.one(str(adapter_dir), f"two records of the 4-bit base disagree: {first.where} says "
                               f"{_effective(first)}, {other.where} says {_effective(other)}",
                               "remove the one that does not belong to this adapter, or pass the right one with "
                               "--training-config")
    return first, []


def _records_in(adapter_dir: Path, problems: list[Problem]) -> list[Record]:
    paths = [adapter_dir / "config.json", *sorted(adapter_dir.glob("*.y*ml")), adapter_dir / "README.md"]
    found = [_read_any(p, problems) for p in paths if p.is_file()]
    return [r for r in found if r is not None and (r.four_bit or r.eight_bit)]


def _effective(record: Record) -> dict:
    return {**record.defaults, **record.values}


def _disagree(a: Record, b: Record) -> bool:
    """Two records of one run disagree on a setting that changes the codes (storage dtype does not)."""
    ea, eb = _effective(a), _effective(b)
    return a.four_bit != b.four_bit or any(ea[k] != eb[k] for k in set(ea) & set(eb) - {"quant_storage"})


# --- resolution ------------------------------------------------------------------------------------------------


def checkpoint_dtype(base_dir: Path) -> str:
    """transformers' dtype="auto": the config's dtype, else the first floating weight's."""
    try:
        cfg = json.loads((Path(base_dir) / "config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    for key in ("dtype", "torch_dtype"):
        if str(cfg.get(key, "")).replace("torch.", "") in DTYPES:
            return str(cfg[key]).replace("torch.", "")
    for _, e in tensor_index(base_dir).values():
        if e.dtype in SAFETENSORS_DTYPES:
            return SAFETENSORS_DTYPES[e.dtype]
    return "float32"


def default_modules(base_dir: Path, skip: list[str] | None = None) -> tuple[str, ...]:
    """The layers transformers quantizes for BitsAndBytesConfig(load_in_4bit=True): its own rule, run on the
    base's module tree on the meta device (every Linear but the output head, tied weights and ``skip``)."""
    from transformers import BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.base import HfQuantizer

    from .base import skeleton

    model = skeleton(base_dir)
    keep = HfQuantizer.get_modules_to_not_convert(model, skip, getattr(model, "_keep_in_fp32_modules", None))
    model = replace_with_bnb_linear(model, modules_to_not_convert=keep,
                                    quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    return tuple(n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit")


def check_request(req: QuantRequest) -> None:
    """The --bnb-* flags' values and the --training-config file's presence, before anything is read."""
    if req.training_config is not None and not Path(req.training_config).is_file():
        raise BadInput.one(str(req.training_config), "--training-config file not found",
                           "pass the axolotl YAML, config.json or README.md the training run wrote")
    if req.quant_type is not None and req.quant_type not in FOUR_BIT:
        raise BadInput.one("--bnb-quant-type", f"{req.quant_type!r} is not a bitsandbytes 4-bit type",
                           "use nf4 or fp4")
    if req.blocksize is not None and req.blocksize not in BLOCKSIZES:
        raise BadInput.one("--bnb-block-size", f"block size {req.blocksize} is not supported by bitsandbytes",
                           f"use one of {', '.join(map(str, BLOCKSIZES))}")
    if req.load_dtype is not None and req.load_dtype not in DTYPES + ("auto",):
        raise BadInput.one("--bnb-load-dtype", f"{req.load_dtype!r} is not a dtype weights are loaded in",
                           f"use one of auto, {', '.join(DTYPES)}")


def resolve(adapter, base_dir: Path, merge_base: str | None, request: QuantRequest = QuantRequest(),
            progress: Progress = quiet):
    """(the adapter with the 4-bit base it was trained against, or None for plain LoRA; the merge base).

    ``merge_base``: "nf4", "fp4", "original" or None (the default for this adapter)."""
    check_request(request)
    given = request.given()
    if merge_base in FOUR_BIT and "quant_type" in given and given["quant_type"] != merge_base:
        raise BadInput.one("--bnb-quant-type", f"{given['quant_type']} disagrees with --merge-base {merge_base}",
                           "give the quant type once: --merge-base nf4 or --merge-base fp4")
    read_problems: list[Problem] = []  # the adapter directory's records, read once: used, or named as ignored
    records = _records_in(Path(adapter.path), read_problems)
    if is_prequantized(base_dir):
        _note_ignored(records, request, "the pre-quantized base's own codes decide", progress)
        return _prequantized(adapter, base_dir, merge_base, given)
    known = adapter.quantization  # from lora-export's training manifest
    if known:
        _note_ignored(records, request, "training_manifest.json records the run", progress)
        record = None
    else:
        record, ignored = find_record(records, read_problems, adapter.path, request.training_config)
        for where in ignored:
            progress(f"  {where} ignored: --training-config {request.training_config} is used instead")
    partial = sorted(k for k in given if k != "quant_type")
    if partial and merge_base is None and "quant_type" not in given and not known and not (record and record.four_bit):
        raise BadInput.one(FLAGS[partial[0]], "gives one setting of the 4-bit base but not its type, and nothing on "
                           "record says the adapter was trained on a 4-bit base",
                           "add --merge-base nf4 (or fp4) to merge into the 4-bit base it was trained against")
    if record is not None and record.eight_bit and not record.four_bit:
        if merge_base in FOUR_BIT or given:
            raise BadInput.one(record.path, "says the base was loaded in 8-bit, not 4-bit",
                               "use --merge-base original (lora-export does not reproduce 8-bit bases)")
        progress(f"  the adapter was trained on an 8-bit base ({record.where}): merging into the original weights")
        return replace(adapter, quantization=None), "original"
    four_bit = merge_base in FOUR_BIT or (merge_base is None and bool(known or (record and record.four_bit) or given))
    if not (four_bit or known or (record and record.four_bit)):
        progress(f"  no record of a 4-bit base for {adapter.path.name} (no training_manifest.json, quantization_config, "
                 "axolotl YAML or PEFT model card): merging into the original weights as for plain LoRA; if it was "
                 "trained with QLoRA, pass --merge-base nf4 (and --bnb-* for settings other than transformers' defaults)")
        return replace(adapter, quantization=None), "original"
    if known:
        settings, sources, modules = known.settings.to_dict(), dict(known.sources), known.modules
    else:
        settings = {**Nf4Settings().to_dict(), "quant_type": "fp4", "double_quant": False, "blocksize": 64,
                    "quant_storage": "uint8", "load_dtype": checkpoint_dtype(base_dir)}
        sources = {k: f"{ASSUMED} BitsAndBytesConfig" for k in settings}
        sources["load_dtype"] = "assumed: transformers' from_pretrained default dtype='auto' (the checkpoint's dtype)"
        skip = None
        if record is not None:
            for k, v in record.defaults.items():
                settings[k], sources[k] = v, record.defaults_from
            skip = record.values.get("skip_modules")
            for k, v in record.values.items():
                if k in settings:
                    settings[k], sources[k] = v, record.where
        modules = default_modules(base_dir, skip)
    if merge_base in FOUR_BIT:
        given.setdefault("quant_type", merge_base)
    for k, v in given.items():
        flag = FLAGS[k] if k != "quant_type" or request.quant_type else f"--merge-base {merge_base}"
        if v == "auto" and k == "load_dtype":
            v = checkpoint_dtype(base_dir)
        if settings[k] != v and (known or record):
            progress(f"  {flag} overrides {k} = {settings[k]} ({sources[k]})")
        settings[k], sources[k] = v, f"command line ({flag})"
    problems = []
    if settings["quant_type"] not in FOUR_BIT:
        problems.append(Problem(sources["quant_type"], f"quant type {settings['quant_type']!r} is not nf4 or fp4",
                                "pass --bnb-quant-type nf4 or fp4"))
    if settings["blocksize"] not in BLOCKSIZES:
        problems.append(Problem(sources["blocksize"], f"block size {settings['blocksize']} is not one bitsandbytes has",
                                "pass --bnb-block-size with the block size used in training"))
    if settings["load_dtype"] not in DTYPES:
        problems.append(Problem(sources["load_dtype"], f"load dtype {settings['load_dtype']!r} is not one bitsandbytes "
                                "quantizes from", "pass --bnb-load-dtype float32, bfloat16 or float16"))
    if settings["quant_storage"] not in DTYPES + ("uint8",):
        problems.append(Problem(sources["quant_storage"], f"storage dtype {settings['quant_storage']!r} is not one "
                                "bitsandbytes stores codes in", "restore the file the training run wrote"))
    raise_if(problems)
    quant = Quantization(settings=Nf4Settings(**settings), modules=tuple(modules), sources=sources)
    chosen = merge_base or (quant.settings.quant_type if four_bit else "original")
    return replace(adapter, quantization=quant), chosen


def _note_ignored(records: list[Record], request: QuantRequest, why: str, progress: Progress) -> None:
    """Say which records of the 4-bit settings were not used, and why."""
    files = [r.path for r in records]
    if request.training_config is not None:
        files.append(f"--training-config {request.training_config}")
    for f in files:
        progress(f"  {f} ignored: {why}")


def _prequantized(adapter, base_dir: Path, merge_base: str | None, given: dict):
    """A base saved in bitsandbytes 4-bit: the merge base is its codes; there is nothing to choose."""
    where = str(Path(base_dir) / "config.json")
    quant = prequantized_quantization(base_dir)
    if merge_base == "original":
        raise BadInput.one(where, "a bitsandbytes 4-bit checkpoint holds only the 4-bit codes: there are no original "
                           "weights to merge into", "omit --merge-base: the merge uses these codes, which is what the "
                           "adapter was trained against (or pass the full-precision original with --base)")
    settings = quant.settings.to_dict()
    wrong = [f"{FLAGS[k]} {v}" for k, v in given.items() if k in settings and v not in (settings[k], "auto")]
    if merge_base in FOUR_BIT and merge_base != quant.settings.quant_type:
        wrong.append(f"--merge-base {merge_base}")
    if wrong:
        raise BadInput.one(", ".join(wrong), f"the base {Path(base_dir).name} is already quantized "
                           f"({quant.settings.quant_type}, block {quant.settings.blocksize}); flags cannot change its codes",
                           "drop the flag(s): the merge uses the codes as stored")
    return replace(adapter, quantization=quant), quant.settings.quant_type
