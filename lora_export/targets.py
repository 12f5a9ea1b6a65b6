"""Deployment targets: TOML profiles under ``targets/`` that fix everything an export needs.

A target is loaded, checked against the schema below (every problem in a file reported at once), and
turned into a frozen ``Target``. ``lora-export targets list|show`` reads the same files.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
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


@dataclass(frozen=True)
class Tolerances:
    """Parity thresholds. A field left as None is not checked."""

    max_abs_diff: float | None = None
    mean_kl: float | None = None
    top1_agreement: float | None = None
    greedy_match: bool = False  # the greedy continuation must be identical to the reference's


@dataclass(frozen=True)
class LatencyBudget:
    max_ratio: float = 1.10  # merged / base median decode latency must stay below this


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    runtime: str
    execution_provider: str
    precision: str
    backend: str
    opset: int
    quantization: Quantization
    tolerances: Tolerances
    latency: LatencyBudget
    source: str

    def to_dict(self) -> dict:
        return asdict(self)


_SECTIONS = {
    "": {"name": str, "description": str, "runtime": str, "execution_provider": str, "precision": str,
         "backend": str, "opset": int},
    "quantization": {"scheme": str, "block_size": int, "symmetric": bool, "lm_head": str},
    "tolerances": {"max_abs_diff": float, "mean_kl": float, "top1_agreement": float, "greedy_match": bool},
    "latency": {"max_ratio": float},
}
_REQUIRED = ("name", "runtime", "execution_provider", "precision", "backend")


def _check_types(where: str, data: dict, problems: list[Problem]) -> None:
    for section, fields in _SECTIONS.items():
        table = data if section == "" else data.get(section, {})
        label = f"[{section}]" if section else "top level"
        if not isinstance(table, dict):
            problems.append(Problem(where, f"{label} must be a table", f"write it as [{section}] with key = value lines"))
            continue
        for key, value in table.items():
            if section == "" and key in _SECTIONS:
                continue
            if key not in fields:
                problems.append(Problem(where, f"unknown field '{key}' in {label}",
                                        f"remove it; known fields there: {', '.join(fields)}"))
                continue
            want = fields[key]
            ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
            if want is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok:
                problems.append(Problem(where, f"'{key}' in {label} must be {want.__name__}, got {value!r}",
                                        f"give {key} a {want.__name__} value"))


def parse_target(data: dict, where: str) -> Target:
    """Check one target's TOML table; raise BadInput listing every problem, else return the Target."""
    from .export import BACKENDS
    from .quantize import SCHEMES

    problems: list[Problem] = []
    _check_types(where, data, problems)
    for key in _REQUIRED:
        if key not in data:
            problems.append(Problem(where, f"missing required field '{key}'", f"add {key} = ... at the top level"))
    raise_if(problems)

    q = Quantization(**data.get("quantization", {}))
    t = Tolerances(**{k: (float(v) if isinstance(v, int) and k != "greedy_match" else v)
                      for k, v in data.get("tolerances", {}).items()})
    lat = LatencyBudget(**{k: float(v) for k, v in data.get("latency", {}).items()})
    if data["runtime"] not in RUNTIMES:
        problems.append(Problem(where, f"unknown runtime '{data['runtime']}'", f"use one of {', '.join(RUNTIMES)}"))
    if data["execution_provider"] not in PROVIDERS:
        problems.append(Problem(where, f"unknown execution_provider '{data['execution_provider']}'",
                                f"use one of {', '.join(PROVIDERS)}"))
    if data["precision"] not in PRECISIONS:
        problems.append(Problem(where, f"unknown precision '{data['precision']}'", f"use one of {', '.join(PRECISIONS)}"))
    if data["backend"] not in BACKENDS:
        problems.append(Problem(where, f"unknown backend '{data['backend']}'", f"use one of {', '.join(BACKENDS)}"))
    if q.scheme not in SCHEMES:
        problems.append(Problem(where, f"unknown quantization scheme '{q.scheme}'", f"use one of {', '.join(SCHEMES)}"))
    elif q.scheme != "none":
        problems += [Problem(where, p, "change [quantization] accordingly") for p in SCHEMES[q.scheme].check(q)]
    if data["precision"] in ("fp16", "bf16") and data["execution_provider"] == "CPUExecutionProvider":
        problems.append(Problem(where, f"precision {data['precision']} is not supported on CPUExecutionProvider",
                                "use precision = \"fp32\" on the CPU, or a CUDA execution provider"))
    if not any(v is not None and v is not False for v in asdict(t).values()):
        problems.append(Problem(where, "[tolerances] sets no check, so parity could never fail",
                                "set at least one of max_abs_diff, mean_kl, top1_agreement, greedy_match"))
    for key in ("mean_kl", "max_abs_diff"):
        if getattr(t, key) is not None and getattr(t, key) < 0:
            problems.append(Problem(where, f"tolerances.{key} is negative", "use a value >= 0"))
    if t.top1_agreement is not None and not 0 <= t.top1_agreement <= 1:
        problems.append(Problem(where, "tolerances.top1_agreement must lie in [0, 1]", "write it as a fraction, e.g. 0.92"))
    if lat.max_ratio <= 0:
        problems.append(Problem(where, "latency.max_ratio must be positive", "use a ratio such as 1.10"))
    raise_if(problems)
    return Target(
        name=data["name"], description=data.get("description", ""), runtime=data["runtime"],
        execution_provider=data["execution_provider"], precision=data["precision"], backend=data["backend"],
        opset=data.get("opset", 21), quantization=q, tolerances=t, latency=lat, source=where,
    )


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
