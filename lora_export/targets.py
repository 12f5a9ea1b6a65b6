"""Deployment targets: TOML profiles under ``targets/`` that fix everything an export needs.

A target is loaded, checked against the schema below (every problem in a file reported at once), and
turned into a frozen ``Target``. Parity tolerances default by precision (``DEFAULT_TOLERANCES``); a
target's ``[tolerances]`` table overrides them field by field. ``lora-export targets list|show`` reads the
same files.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import BadInput, Problem, raise_if

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

TARGETS_DIR = Path(__file__).resolve().parent / "targets_data"

PRECISIONS = ("fp32", "fp16", "bf16")
RUNTIMES = ("onnxruntime",)
PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider")


@dataclass(frozen=True)
class Quantization:
    scheme: str = "none"  # a name in lora_export.quantize.SCHEMES
    block_size: int = 32
    symmetric: bool = True
    lm_head: str = "int8"  # precision kept for the output projection when the body is quantized
    sensitive_layers: str = "int4"  # "int8": llama.cpp's mixed strategy (first/last eighth, every third qkv/down)
    accuracy_level: int = 0  # MatMulNBits compute type: 1 fp32, 2 fp16, 3 bf16, 4 int8 activations; 0 the default
    scales: str = "fresh"  # nf4 only: "original" keeps the absmax of the NF4 blocks the adapter trained against


@dataclass(frozen=True)
class Tolerances:
    """Parity thresholds. A field left as None (or 0 for greedy_tokens) is not checked."""

    max_abs_diff: float | None = None
    mean_kl: float | None = None  # KL(reference || export), mean over compared positions
    top1_agreement: float | None = None
    greedy_tokens: int = 0  # this many greedily generated tokens must be identical to the reference's
    min_adapter_retention: float | None = None  # 1 - KL(adapted || export) / KL(adapted || base)


# Defaults by precision class (the quantization scheme when weights are quantized, else the precision).
DEFAULT_TOLERANCES: dict[str, Tolerances] = {
    "fp32": Tolerances(max_abs_diff=1e-4, greedy_tokens=64),
    "fp16": Tolerances(mean_kl=1e-3, top1_agreement=0.995),
    "bf16": Tolerances(mean_kl=1e-3, top1_agreement=0.995),
    "int8": Tolerances(mean_kl=0.01, top1_agreement=0.98),
    "int4": Tolerances(mean_kl=0.05, top1_agreement=0.92, min_adapter_retention=0.8),
    "nf4": Tolerances(mean_kl=0.05, top1_agreement=0.92, min_adapter_retention=0.8),
}


@dataclass(frozen=True)
class LatencyBudget:
    max_ratio: float = 1.10  # merged / base median decode latency must stay at or below this


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    runtime: str
    execution_providers: tuple[str, ...]  # in priority order, as ONNX Runtime takes them
    precision: str
    backend: str
    opset: int
    quantization: Quantization
    tolerances: Tolerances
    latency: LatencyBudget
    source: str = field(default="", compare=False)

    @property
    def precision_class(self) -> str:
        return self.quantization.scheme if self.quantization.scheme != "none" else self.precision


_SCHEMA = {
    "": {"name": str, "description": str, "runtime": str, "execution_providers": list, "precision": str,
         "backend": str, "opset": int},
    "quantization": {"scheme": str, "block_size": int, "symmetric": bool, "lm_head": str, "sensitive_layers": str,
                     "accuracy_level": int, "scales": str},
    "tolerances": {"max_abs_diff": float, "mean_kl": float, "top1_agreement": float, "greedy_tokens": int,
                   "min_adapter_retention": float},
    "latency": {"max_ratio": float},
}
_REQUIRED = ("name", "runtime", "execution_providers", "precision", "backend")


def _type_ok(value, want) -> bool:
    if isinstance(value, bool):
        return want is bool
    if want is float:
        return isinstance(value, (int, float))
    return isinstance(value, want)


def _typed(where: str, data: dict, problems: list[Problem]) -> dict[str, dict]:
    """Every field of known name and right type, by section; problems for the rest."""
    good: dict[str, dict] = {}
    for section, fields in _SCHEMA.items():
        table = data if section == "" else data.get(section, {})
        label = f"[{section}]" if section else "the top level"
        good[section] = {}
        if not isinstance(table, dict):
            problems.append(Problem(where, f"{section} must be a table", f"write it as [{section}] with key = value lines"))
            continue
        for key, value in table.items():
            if section == "" and key in _SCHEMA:
                continue
            if key not in fields:
                problems.append(Problem(where, f"unknown field '{key}' in {label}",
                                        f"remove it; known fields there: {', '.join(fields)}"))
            elif not _type_ok(value, fields[key]):
                problems.append(Problem(where, f"'{key}' in {label} must be {fields[key].__name__}, got {value!r}",
                                        f"give {key} a {fields[key].__name__} value"))
            else:
                good[section][key] = float(value) if fields[key] is float else value
    return good


def parse_target(data: dict, where: str) -> Target:
    """Check one target's TOML table; raise BadInput listing every problem, else return the Target."""
    from .export import BACKENDS
    from .quantize import SCHEMES

    problems: list[Problem] = []
    good = _typed(where, data, problems)
    top = good[""]
    for key in _REQUIRED:
        if key not in data:
            problems.append(Problem(where, f"missing required field '{key}'", f"add {key} = ... at the top level"))

    def one_of(key, allowed, section=""):
        value = (good[section] if section else top).get(key)
        if value is not None and value not in allowed:
            problems.append(Problem(where, f"unknown {key} '{value}'", f"use one of {', '.join(allowed)}"))

    one_of("runtime", RUNTIMES)
    one_of("precision", PRECISIONS)
    one_of("backend", tuple(BACKENDS))
    one_of("scheme", tuple(SCHEMES), "quantization")
    providers = top.get("execution_providers")
    if providers is not None:
        unknown = [p for p in providers if p not in PROVIDERS]
        if unknown or not providers:
            problems.append(Problem(where, f"execution_providers {providers!r} has unknown or no entries",
                                    f"list one or more of {', '.join(PROVIDERS)}"))
        elif top.get("precision") in ("fp16", "bf16") and providers[0] == "CPUExecutionProvider":
            problems.append(Problem(where, f"precision {top['precision']} is not supported on CPUExecutionProvider",
                                    'use precision = "fp32" on the CPU, or a CUDA execution provider'))
    quant = Quantization(**good["quantization"])
    if quant.scales not in ("fresh", "original") or (quant.scales == "original" and quant.scheme != "nf4"):
        problems.append(Problem(where, f'quantization.scales = "{quant.scales}": "original" applies to nf4 only',
                                'use scales = "fresh", or "original" with scheme = "nf4"'))
    if quant.scheme in SCHEMES:
        problems += [Problem(where, p, "change [quantization] accordingly") for p in SCHEMES[quant.scheme].check(quant)]

    tol = good["tolerances"]
    for key in ("mean_kl", "max_abs_diff"):
        if tol.get(key, 0) < 0:
            problems.append(Problem(where, f"tolerances.{key} is negative", "use a value >= 0"))
    for key in ("top1_agreement", "min_adapter_retention"):
        if not 0 <= tol.get(key, 0) <= 1:
            problems.append(Problem(where, f"tolerances.{key} must lie in [0, 1]", "write it as a fraction, e.g. 0.92"))
    if tol.get("greedy_tokens", 0) < 0:
        problems.append(Problem(where, "tolerances.greedy_tokens is negative", "use a token count such as 64, or 0"))
    if good["latency"].get("max_ratio", 1.0) <= 0:
        problems.append(Problem(where, "latency.max_ratio must be positive", "use a ratio such as 1.10"))
    raise_if(problems)

    target = Target(
        name=top["name"], description=top.get("description", ""), runtime=top["runtime"],
        execution_providers=tuple(providers), precision=top["precision"], backend=top["backend"],
        opset=top.get("opset", 21), quantization=quant, tolerances=Tolerances(), latency=LatencyBudget(**good["latency"]),
        source=where,
    )
    return replace(target, tolerances=replace(DEFAULT_TOLERANCES[target.precision_class], **tol))


def load_target(name_or_path: str | Path) -> Target:
    """Load a target by shipped name (``ort-cpu-fp32``) or by path to a TOML file."""
    path = Path(name_or_path)
    if path.suffix != ".toml" and not path.exists():
        path = TARGETS_DIR / f"{name_or_path}.toml"
        if not path.exists():
            raise BadInput.one(str(name_or_path), "no such target",
                               f"use one of {', '.join(available())} or a path to a .toml file")
    if not path.is_file():
        raise BadInput.one(str(path), "target file not found", "check the path, or run `lora-export targets list`")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise BadInput.one(str(path), f"not valid TOML ({e})", "fix the syntax; see targets/ort-cpu-fp32.toml") from None
    return parse_target(data, str(path))


def available() -> list[str]:
    return sorted(p.stem for p in TARGETS_DIR.glob("*.toml"))
