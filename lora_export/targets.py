"""Deployment targets: TOML profiles under ``targets/`` that fix everything an export needs.

A target is loaded, checked against the schema below (every problem in a file reported at once), and
turned into a frozen ``Target``. Every numeric field is range-checked at load (``_RANGES``), so a loaded
target carries no nan, no inf, and nothing the runtime or the checks cannot honour. Parity tolerances
default by precision (``DEFAULT_TOLERANCES``); a target's ``[tolerances]`` table overrides them field by
field. ``lora-export targets list|show`` reads the same files.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field, fields, replace
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
    algo: str = "rtn"  # int4/int8: ONNX Runtime's weight quantizer, "rtn" (round to nearest) or "k_quant"
    # int4: the block size of the base weights in a graph with float LoRA side paths (--switchable, --keep-adapter);
    # 0: block_size. Such a graph quantizes dequant(NF4(W)) itself, not a merge, and a block that coincides with the
    # NF4 block lays the same uniform grid over the same 16 NF4 levels in every block (targets/ort-cpu-int4.toml)
    side_path_block_size: int = 0

    def for_graph(self, side_paths: bool) -> "Quantization":
        """The settings a graph is built and checked with: with LoRA side paths, side_path_block_size if set."""
        return replace(self, block_size=self.side_path_block_size) if side_paths and self.side_path_block_size else self


@dataclass(frozen=True)
class Tolerances:
    """Parity thresholds. A field left as None (or 0 for greedy_tokens) is not checked."""

    max_abs_diff: float | None = None
    # max |logit diff| / max |reference logit|: the same check made independent of the logits' scale
    max_rel_diff: float | None = None
    mean_kl: float | None = None  # KL(reference || export), mean over compared positions
    top1_agreement: float | None = None
    greedy_tokens: int = 0  # this many greedily generated tokens must be identical to the reference's
    min_adapter_retention: float | None = None  # 1 - KL(adapted || export) / KL(adapted || base)
    # the merge stage: the merged fp32 weights the graph is built from against the model as trained. The merge is
    # fp32 math whatever the target, so it is held exact for every target: what an int4 export loses to its
    # weights must not hide a merge into the wrong base (e.g. a QLoRA adapter on the original weights)
    max_merge_kl: float | None = None
    # Models with fewer than small_model_params parameters lose far more to 4-bit weights than 7B ones do
    # (FACTS.md, "What 4-bit costs"); for them the small_* thresholds replace their counterparts. Set in a target
    # file from a measurement on a real small model, and the file says which.
    small_model_params: float | None = None
    small_mean_kl: float | None = None
    small_top1_agreement: float | None = None
    small_min_adapter_retention: float | None = None

    def for_model(self, parameters: int | None) -> tuple["Tolerances", str | None]:
        """The thresholds that apply to a model of ``parameters`` parameters, and a note when the small-model
        ones do (None otherwise)."""
        if self.small_model_params is None or parameters is None or parameters >= self.small_model_params:
            return self, None
        small = {name: getattr(self, f"small_{name}") for name in ("mean_kl", "top1_agreement", "min_adapter_retention")
                 if getattr(self, f"small_{name}") is not None}
        if not small:
            return self, None
        said = ", ".join(f"{k} {v:g}" for k, v in small.items())
        return replace(self, **small), (f"the base has {parameters / 1e6:.0f}M parameters, fewer than "
                                        f"{self.small_model_params / 1e6:.0f}M: the target's small-model thresholds "
                                        f"apply ({said})")


# The merge stage's bound: fp32 rounding of the merge on SmolLM2-135M is a KL of 4e-11 (the right export in
# benchmarks/results/gate_calibration.md); the QLoRA adapter merged into the original weights is far above it there.
MERGE_KL = 1e-6

# Defaults by precision class (the quantization scheme when weights are quantized, else the precision).
DEFAULT_TOLERANCES: dict[str, Tolerances] = {
    # fp32: relative to the reference logits' scale (two exact fp32 computations of a pretrained 135M model
    # differ by ~1e-5 of its largest logit), plus a KL bound and an identical 64-token greedy continuation
    "fp32": Tolerances(max_rel_diff=1e-4, mean_kl=1e-6, greedy_tokens=64, max_merge_kl=MERGE_KL),
    "fp16": Tolerances(mean_kl=1e-3, top1_agreement=0.995, max_merge_kl=MERGE_KL),
    "bf16": Tolerances(mean_kl=1e-3, top1_agreement=0.995, max_merge_kl=MERGE_KL),
    "int8": Tolerances(mean_kl=0.01, top1_agreement=0.98, max_merge_kl=MERGE_KL),
    "int4": Tolerances(mean_kl=0.05, top1_agreement=0.92, min_adapter_retention=0.8, max_merge_kl=MERGE_KL),
    "nf4": Tolerances(mean_kl=0.05, top1_agreement=0.92, min_adapter_retention=0.8, max_merge_kl=MERGE_KL),
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
    #: "merged": the adapter merged into the weights; "unmerged": the base weights as trained with the adapter as a
    #: float side path beside each MatMul (what --keep-adapter asks for; ort-cuda-nf4 keeps the trained NF4 codes so)
    graph: str = "merged"

    @property
    def precision_class(self) -> str:
        return self.quantization.scheme if self.quantization.scheme != "none" else self.precision


_SCHEMA = {
    "": {"name": str, "description": str, "runtime": str, "execution_providers": list, "precision": str,
         "backend": str, "opset": int, "graph": str},
    "quantization": {"scheme": str, "block_size": int, "symmetric": bool, "lm_head": str, "sensitive_layers": str,
                     "accuracy_level": int, "scales": str, "algo": str, "side_path_block_size": int},
    "tolerances": {"max_abs_diff": float, "max_rel_diff": float, "mean_kl": float, "top1_agreement": float,
                   "greedy_tokens": int, "min_adapter_retention": float, "max_merge_kl": float,
                   "small_model_params": float, "small_mean_kl": float, "small_top1_agreement": float,
                   "small_min_adapter_retention": float},
    "latency": {"max_ratio": float},
}
GRAPHS = ("merged", "unmerged")
_REQUIRED = ("name", "runtime", "execution_providers", "precision", "backend")


@dataclass(frozen=True)
class _Range:
    """What one numeric field may hold. Checked at load, so a loaded Target never carries nan, inf or nonsense."""

    low: float
    high: float = math.inf
    low_open: bool = False  # the low end itself is not allowed
    power_of_two: bool = False
    example: str = ""
    why: str = ""

    def describe(self, whole: bool) -> str:
        if self.power_of_two:
            return f"a power of two between {self.low:g} and {self.high:g}"
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"a whole number in {self.low:g}..{self.high:g}" if whole else f"in [{self.low:g}, {self.high:g}]"

    def holds(self, value) -> bool:
        if self.power_of_two and (value < 1 or value & (value - 1)):
            return False
        return (value > self.low if self.low_open else value >= self.low) and value <= self.high


# Every numeric field of _SCHEMA has its range here (a test checks that none is missing).
MAX_GREEDY_TOKENS = 4096
_RANGES: dict[str, dict[str, _Range]] = {
    "": {"opset": _Range(14, 23, example="21", why=" (the opsets ONNX Runtime 1.32 supports for these graphs)")},
    "quantization": {
        "block_size": _Range(16, 4096, power_of_two=True, example="32",
                             why=" (what ONNX Runtime's block quantizers take)"),
        "side_path_block_size": _Range(16, 4096, power_of_two=True, example="32",
                                       why=" (what ONNX Runtime's block quantizers take)"),
        "accuracy_level": _Range(0, 4, example="0",
                                 why=" (MatMulNBits: 0 default, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations)"),
    },
    "tolerances": {
        "max_abs_diff": _Range(0, example="1e-4"),
        "max_rel_diff": _Range(0, example="1e-3"),
        "mean_kl": _Range(0, example="0.05"),
        "top1_agreement": _Range(0, 1, example="0.92", why=" (a fraction)"),
        "greedy_tokens": _Range(0, MAX_GREEDY_TOKENS, example="64", why=" (0 turns the check off)"),
        "min_adapter_retention": _Range(0, 1, example="0.8", why=" (a fraction)"),
        "max_merge_kl": _Range(0, example="1e-6"),
        "small_model_params": _Range(0, low_open=True, example="1e9"),
        "small_mean_kl": _Range(0, example="0.5"),
        "small_top1_agreement": _Range(0, 1, example="0.75", why=" (a fraction)"),
        "small_min_adapter_retention": _Range(0, 1, example="0.9", why=" (a fraction)"),
    },
    "latency": {"max_ratio": _Range(0, low_open=True, example="1.10", why=" (merged / base median decode latency)")},
}


def _out_of_range(where: str, good: dict[str, dict]) -> dict[str, Problem]:
    """One problem per numeric field that is not finite or not in its range, by 'section.key'."""
    bad: dict[str, Problem] = {}
    for section, ranges in _RANGES.items():
        for key, rng in ranges.items():
            value = good[section].get(key)
            name, allowed = f"{section}.{key}" if section else key, rng.describe(_SCHEMA[section][key] is int)
            if value is None:
                continue
            if isinstance(value, float) and not math.isfinite(value):
                bad[name] = Problem(where, f"{name} = {value} is not a finite number",
                                    f"use e.g. {key} = {rng.example} ({allowed}; nan and inf are no thresholds)")
            elif not rng.holds(value):
                bad[name] = Problem(where, f"{name} {value!r} must be {allowed}{rng.why}",
                                    f"use e.g. {key} = {rng.example} ({allowed})")
    return bad


def _type_ok(value, want) -> bool:
    if isinstance(value, bool):
        return want is bool
    if want is float:
        return isinstance(value, (int, float))
    return isinstance(value, want)


def _typed(where: str, data: dict, problems: list[Problem]) -> dict[str, dict]:
    """Every field of known name and right type, by section; problems for the rest."""
    good: dict[str, dict] = {}
    for section, known in _SCHEMA.items():
        table = data if section == "" else data.get(section, {})
        label = f"[{section}]" if section else "the top level"
        good[section] = {}
        if not isinstance(table, dict):
            problems.append(Problem(where, f"{section} must be a table", f"write it as [{section}] with key = value lines"))
            continue
        for key, value in table.items():
            if section == "" and key in _SCHEMA:
                continue
            if key not in known:
                problems.append(Problem(where, f"unknown field '{key}' in {label}",
                                        f"remove it; known fields there: {', '.join(known)}"))
            elif not _type_ok(value, known[key]):
                problems.append(Problem(where, f"'{key}' in {label} must be {known[key].__name__}, got {value!r}",
                                        f"give {key} a {known[key].__name__} value"))
            elif known[key] is float and isinstance(value, int) and abs(value) > sys.float_info.max:
                problems.append(Problem(where, f"'{key}' in {label} is too large to be a number",
                                        f"give {key} a value in its range"))
            else:
                good[section][key] = float(value) if known[key] is float else value
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
    one_of("graph", GRAPHS)
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
    bad = _out_of_range(where, good)
    backend = BACKENDS.get(top.get("backend"))
    if (backend is not None and "opset" in top and "opset" not in bad
            and not backend.opsets[0] <= top["opset"] <= backend.opsets[1]):
        low, high = backend.opsets  # a field the backend cannot honour is refused, never silently changed
        can = f"opset {low}" if low == high else f"opsets {low} to {high}"
        problems.append(Problem(where, f"opset = {top['opset']}: the {backend.name} backend writes {can} only",
                                f"set opset = {backend.default_opset}, or leave it out"))
    if top.get("graph") == "unmerged" and backend is not None and not backend.side_paths:
        problems.append(Problem(where, f'graph = "unmerged": the {backend.name} backend exports merged graphs only',
                                'use backend = "genai-builder", or graph = "merged"'))
    if quant.scheme in SCHEMES:
        given = data.get("quantization") if isinstance(data.get("quantization"), dict) else {}
        ignored = sorted(k for k in given if k != "scheme" and k in _SCHEMA["quantization"]
                         and k not in SCHEMES[quant.scheme].honours)
        if ignored:  # a field the scheme would not read is refused, never silently ignored
            problems.append(Problem(where, f"quantization.{', quantization.'.join(ignored)} has no effect with scheme "
                                    f"{quant.scheme}", f"remove it (scheme {quant.scheme} reads "
                                    f"{', '.join(SCHEMES[quant.scheme].honours) or 'no other field'})"))
        if backend is not None and quant.scheme not in backend.schemes:
            problems.append(Problem(where, f"scheme {quant.scheme} is not produced by the {backend.name} backend",
                                    f"use one of {', '.join(backend.schemes)}, or another backend"))
        for what in SCHEMES[quant.scheme].check(quant):
            # a field already out of the general range is one problem; the scheme's narrower rule is its fix
            # (the field as a whole word: block_size is not the one side_path_block_size's rule names)
            same = [name for name in bad if name.startswith("quantization.")
                    and re.search(rf"(?<!\w){re.escape(name.split('.')[1])}\b", what)]
            if same:
                bad[same[0]].fix = f"for scheme {quant.scheme}: {what}"
            else:
                problems.append(Problem(where, what, "change [quantization] accordingly"))
    problems += bad.values()
    raise_if(problems)

    target = Target(
        name=top["name"], description=top.get("description", ""), runtime=top["runtime"],
        execution_providers=tuple(providers), precision=top["precision"], backend=top["backend"],
        opset=top.get("opset", BACKENDS[top["backend"]].default_opset), quantization=quant, tolerances=Tolerances(), latency=LatencyBudget(**good["latency"]),
        source=where, graph=top.get("graph", "merged"),
    )
    return replace(target, tolerances=replace(DEFAULT_TOLERANCES[target.precision_class], **good["tolerances"]))


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
        raise BadInput.one(str(path), f"not valid TOML ({e})", "fix the syntax; see targets/ort-cpu-fp32.toml") from e
    return parse_target(data, str(path))


def available() -> list[str]:
    return sorted(p.stem for p in TARGETS_DIR.glob("*.toml"))


def check_against_context(target: Target, max_positions: int, where: str) -> None:
    """Raise BadInput when the greedy-token check cannot fit the model's context (``where``: the model's config).

    Comparing ``greedy_tokens`` generated tokens needs at least one prompt position before them.
    """
    greedy = target.tolerances.greedy_tokens
    if greedy and greedy + 1 > max_positions:
        fix = (f"lower greedy_tokens to at most {max_positions - 1}" if max_positions > 1 else "set greedy_tokens = 0")
        raise BadInput.one(target.source or where,
                           f"tolerances.greedy_tokens = {greedy} needs {greedy + 1} positions (a prompt token and "
                           f"{greedy} generated ones), but the model ({where}) has a context of {max_positions}",
                           f"{fix} in [tolerances] of {target.source or 'the target'}")


def _original_file(target: Target) -> Path | None:
    """The TOML file ``target`` came from: its source when that is a .toml file, else the shipped one by name."""
    source = Path(target.source) if target.source else None
    if source is not None and source.suffix == ".toml" and source.is_file():
        return source
    if target.name in available():
        return TARGETS_DIR / f"{target.name}.toml"
    return None


def _show(value) -> str:
    if value is None:
        return "not set"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def tolerance_differences(target: Target) -> list[str]:
    """One line per tolerance or latency field whose value differs from the target file it came from.

    An export's manifest carries its target's table, and validate/bench apply that one; a threshold edited
    there shows up here, so a report can say so. [] when every value matches.
    """
    path = _original_file(target)
    if path is None:
        return [f"no target file to compare with: {target.source or 'the target'} is not a .toml file and "
                f"'{target.name}' is not a shipped target ({', '.join(available())})"]
    try:
        original = load_target(path)
    except BadInput as e:
        return [f"no target file to compare with: {path} does not load ({'; '.join(p.what for p in e.problems)})"]
    label = path.name if path.resolve().parent == TARGETS_DIR else str(path)
    lines = []
    for section in ("tolerances", "latency"):
        mine, theirs = getattr(target, section), getattr(original, section)
        for f in fields(mine):
            now, then = getattr(mine, f.name), getattr(theirs, f.name)
            if now != then:
                lines.append(f"{section}.{f.name} = {_show(now)} (target file {label} says {_show(then)})")
    return lines
