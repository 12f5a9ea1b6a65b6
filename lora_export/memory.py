"""Memory, checked up front: the peak a command needs for a base and a target, and what this process may use.

``estimate`` is a pure function of the parameter count (read from the shard headers, as the disk check reads
it) and the target's backend and weight scheme: fixed bytes plus a multiplier times the fp32 weight bytes, both
fitted through peaks measured here (see ``EXPORT``). ``available`` reads what the kernel will still give this
process: the smaller of MemAvailable and, under a cgroup (v2 or v1) memory limit, the limit minus the group's
working set. ``check_memory`` refuses a command whose estimate exceeds that, before any heavy work, instead of
letting the kernel kill it half-way; ``LORA_EXPORT_MEMORY_LIMIT`` states the memory to plan against instead
(``0`` or ``off`` skips the check).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import parameter_count
from .errors import BadInput

ENV = "LORA_EXPORT_MEMORY_LIMIT"
GB = 1e9
UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63


@dataclass(frozen=True)
class Cost:
    """Peak RSS of a command's whole process tree: ``fixed`` bytes + ``per_fp32`` x the fp32 weight bytes, + for
    quantized builds ``per_vocab`` x the fp32 bytes of one vocab x hidden matrix (the graph keeps the embedding in
    fp32 and quantizes lm_head whole: a cost that grows with the vocabulary, not with the layers)."""

    fixed: float
    per_fp32: float
    per_vocab: float = 0.0

    def of(self, fp32_bytes: int, vocab_bytes: int = 0) -> int:
        return int(self.fixed + self.per_fp32 * fp32_bytes + self.per_vocab * vocab_bytes)


# Fitted through README's "Export cost, measured as users run it" (peak tree RSS, MB = 1e6 bytes; 135M shape:
# 538 MB of fp32 weights, TinyLlama-1.1B shape: 4400 MB, Llama-3.1-8B widths cut to 2 layers: 5948 MB) and rounded up
# so that every measured run is estimated a few % above its own peak. Precisions and schemes nobody measured take the
# row of what they run. The whole `export` command also validates: it is never estimated below VALIDATE.
EXPORT = {  # (backend, quantized weights[, precision]) -> the graph build and the checks around it
    # `export --target ort-cpu-fp32`: 1171 MB at 135M (2.18x), 5575 MB at 1.1B (1.27x): a line of 0.56 GB + 1.14x;
    # estimated 1.30 GB (+11%) and 6.32 GB (+13%). fp16 targets: unmeasured; the builder reads the same fp32 merge.
    ("genai-builder", False): Cost(0.6 * GB, 1.3),
    # its fp16 build, streamed (ort-cuda-fp16): 6647 MB at 8B widths, 2 layers (benchmarks/results/
    # export_scale-8b-2l-layerwise.md, the build's stage): 0.6 GB + 1.05 x 5.95 GB = 6.85 GB (+3%). At 8B, 34 GB: an
    # upper bound, since a streamed layer keeps its fp16 bytes (0.5x), unmeasured beyond 2 layers.
    ("genai-builder", False, "fp16"): Cost(0.6 * GB, 1.05),
    # The int4 build, fed one layer at a time (export/builder_stream.py): a layer adds what it keeps, 0.17 x its fp32
    # bytes (146 MB at Llama-3.1-8B widths: tests/test_builder_stream.py, 2 and 4 layers); the rest is the fp32
    # embedding kept in the graph and lm_head quantized whole: `export --target ort-cpu-int4` at 8B widths cut to 2
    # layers (5948 MB of fp32 weights, a 2101 MB vocab x hidden matrix) peaked at 11457 MB, in the build
    # (benchmarks/results/export_scale-8b-2l-int4.md): 0.6 GB + 0.17 x 5.95 GB + 5.0 x 2.10 GB = 12.1 GB estimated
    # (+6%). At 8B the build: 16.6 GB; the whole 8B export then peaked at 15815 MB, in its build (+5%; benchmarks/
    # results/export_scale-8b.md). int8 and nf4: unmeasured, given int4's.
    ("genai-builder", True): Cost(0.6 * GB, 0.17, 5.0),
    # the same in a graph of fp16 activations (ort-cuda-int4): the embedding and lm_head's input in fp16, 9235 MB
    # at 8B widths, 2 layers (benchmarks/results/export_scale-8b-2l-layerwise.md):
    # 0.6 GB + 0.17 x 5.95 GB + 3.8 x 2.10 GB = 9.6 GB (+4%).
    ("genai-builder", True, "fp16"): Cost(0.6 * GB, 0.17, 3.8),
    # README's "Merge and graph build only" rows for the generic dynamo export (not the whole command; its parity
    # run needs less, see VALIDATE): 1796 and 4918 MiB at 135M and 0.5B (1976 MB of fp32 weights), i.e. 1.88 and
    # 5.16 GB: a line of 0.66 GB + 2.28x; estimated 2.09 GB (+11%) and 5.54 GB (+7%). nf4 after it: unmeasured, given
    # the larger multiplier of this and the builder's int4 row.
    ("torch-dynamo", False): Cost(0.8 * GB, 2.4),
    ("torch-dynamo", True): Cost(0.8 * GB, 3.0),
}
# `lora-export validate` (fp32 export): 1210 MB at 135M (2.25x), 4795 MB at 1.1B (1.09x): a line of 0.71 GB + 0.93x;
# estimated 1.36 GB (+12%) and 5.42 GB (+13%). Its models are fp32 PyTorch ones whatever the export's precision, each
# loaded whole up to 5 GiB of fp32 weights (above, see LAYERWISE_TORCH). A base stored in 16 bits adds its file's bytes
# (``estimate``'s ``half_bytes``): transformers maps the file while it makes the fp32 copy (Llama-3.1-8B widths, 2
# layers, bf16, when its models were whole: the unadapted base's parity stage peaked at 9490 MB; estimated 0.8 GB +
# 1.05 x 5.95 GB + 2.97 GB = 10.0 GB, +6%).
VALIDATE = Cost(0.8 * GB, 1.05)
# Above ``reference.LAYERWISE_ABOVE`` (5 GiB of fp32 weights) parity reads each PyTorch model a unit at a time from
# disk: one decoder layer, or the embedding or lm_head in fp32, plus a pass's logits; no mapped 16-bit file. Its peak
# grows with the vocabulary, barely with the layers. Llama-3.1-8B widths, 2 layers, ort-cpu-int4 export (benchmarks/
# results/export_scale-8b-2l-layerwise.md): the reference's stage 4788 MB, the merged model's 4706 MB, the base's
# 3669 MB (whole: 9461 MB), the ONNX Runtime session's 4586 MB with a 3026 MB graph. A line through the PyTorch stages:
# 1.6 GB + 0.02x the fp32 bytes + 1.6x one vocab x hidden fp32 matrix, 5.08 GB there (+6%); at 8B 5.6 GB, where
# tests/test_layerwise.py projects a layerwise model alone (2 and 4 layers measured, 7 MB a layer) to 3.8 GB.
LAYERWISE_TORCH = Cost(1.6 * GB, 0.02, 1.6)
# ... and the export's ONNX Runtime session: 1.7 GB + 1.05x the graph's bytes (4.88 GB there, +6%). The graph's bytes:
# the fp32 weights, halved for fp16; quantized, 0.16x them + the fp32 embedding (3053 MB there for 3026 MB).
ORT_SESSION = Cost(1.7 * GB, 1.05)
# `lora-export bench --rounds 10` (fp32 export): 3314 MB at 135M (6.16x), 17451 MB at 1.1B (3.97x, three ONNX
# Runtime sessions held at once; stopped while doubling its rounds): a line of 1.35 GB + 3.66x; estimated 3.65 GB
# (+10%) and 19.1 GB (+9%). It also builds the base export for the target: never less than that export's row.
BENCH = Cost(1.5 * GB, 4.0)
# An fp16 target's export first runs the merged model in fp32 over the parity prompts, to find weights and
# activations beyond fp16's range (precision.py). Whole: 8509 MB at 8B widths, 2 layers (export --target
# ort-cuda-fp16, the same file, when it loaded the model whole): 0.8 GB + 1.35 x 5.95 GB = 8.8 GB (+4%). Above
# reference.LAYERWISE_ABOVE it runs layerwise, as parity's models (LAYERWISE_TORCH): the check alone then peaked at
# 3464 MB there (its process's VmHWM, 47 s for 8 prompts instead of 7 s).
FP16_CHECK = Cost(0.8 * GB, 1.35)
COMMANDS = ("export", "validate", "bench")


def estimate(command: str, params: int, target, vocab_params: int = 0, half_bytes: int = 0) -> int:
    """Bytes of memory ``command`` needs at its peak for a base of ``params`` weights and ``target``;
    ``vocab_params``: vocab x hidden, the size of one embedding matrix; ``half_bytes``: the base's bytes stored in
    fp16/bf16 (mapped while parity makes their fp32 copy)."""
    fp32, vocab = 4 * params, 4 * vocab_params
    quantized = target.quantization.scheme != "none"
    build = (EXPORT.get((target.backend, quantized, target.precision)) or EXPORT.get((target.backend, quantized))
             or max(EXPORT.values(), key=lambda c: c.of(fp32, vocab)))
    validate = _validate(params, target, vocab, half_bytes)
    if command == "export":
        return max(build.of(fp32, vocab), validate, _fp16_check(params, target, vocab))
    if command == "validate":
        return validate
    if command == "bench":
        return max(BENCH.of(fp32), build.of(fp32, vocab))
    raise ValueError(f"no memory estimate for {command!r}: one of {COMMANDS}")


def _validate(params: int, target, vocab: int, half_bytes: int) -> int:
    """Parity's peak: its PyTorch models, whole or a layer at a time (``reference.layerwise_for``), or the export's
    session, whichever is larger."""
    from .reference import layerwise_for

    fp32 = 4 * params
    if not layerwise_for(params):
        return VALIDATE.of(fp32) + half_bytes
    if target.quantization.scheme != "none":
        graph = 0.16 * fp32 + vocab
    else:
        graph = fp32 * (0.5 if target.precision in ("fp16", "bf16") else 1.0)
    return max(LAYERWISE_TORCH.of(fp32, vocab), ORT_SESSION.of(int(graph)))


def _fp16_check(params: int, target, vocab: int) -> int:
    from .reference import layerwise_for

    if target.precision != "fp16":
        return 0
    return LAYERWISE_TORCH.of(4 * params, vocab) if layerwise_for(params) else FP16_CHECK.of(4 * params)


def half_bytes(base: Path) -> int:
    """Bytes of the base's fp16 and bf16 tensors, from its shard headers."""
    import math

    from .checkpoint import shard_files
    from .tensorfile import read_header

    return sum(2 * math.prod(e.shape) for shard in shard_files(base) for e in read_header(shard)[0]
               if e.dtype in ("F16", "BF16"))


def vocab_params(base: Path) -> int:
    """vocab_size x hidden_size from the base's config (its text model's, for a multimodal config); 0 if unknown."""
    import json

    try:
        config = json.loads((Path(base) / "config.json").read_text())
    except (OSError, ValueError):
        return 0
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    vocab, hidden = text.get("vocab_size", config.get("vocab_size")), text.get("hidden_size", config.get("hidden_size"))
    return int(vocab) * int(hidden) if isinstance(vocab, int) and isinstance(hidden, int) else 0


@dataclass(frozen=True)
class Memory:
    """Bytes this process may still use, and where that figure came from (for the message)."""

    bytes: int
    source: str


def parse_size(text: str) -> int | None:
    """``LORA_EXPORT_MEMORY_LIMIT``'s value in bytes: a whole number of bytes, or a number with K/M/G/T (powers of
    1000, also KB/MB/GB/TB) or KiB/MiB/GiB/TiB (powers of 1024); None for ``0`` or ``off`` (no check)."""
    value = text.strip().lower()
    if value in ("0", "off"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(i?)b?|b?)", value)
    if not m or float(m.group(1)) <= 0:
        raise BadInput.one(ENV, f"{text!r} is not a memory size",
                           f"set {ENV} to the memory to plan against, in bytes or like 20G or 64GiB, or to 0 or off to "
                           "skip the memory check (or unset it: the check then reads this machine's free memory)")
    power = "kmgt".index(m.group(2)) + 1 if m.group(2) else 0
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


def _number(path: Path, key: str | None = None) -> int | None:
    """The number in a /proc or cgroup file (``key``: on its line ``key N``); None where absent or "max"."""
    try:
        text = path.read_text()
    except OSError:
        return None
    if key is not None:
        found = re.search(rf"^{re.escape(key)}:?\s+(\d+)", text, re.M)
        return int(found.group(1)) if found else None
    return int(text.strip()) if text.strip().isdigit() else None


def _cgroup_dirs(proc: Path) -> list[tuple[str, Path, Path]]:
    """(version, this process's memory cgroup folder, its hierarchy's mount point) for each mounted hierarchy
    that can hold a memory limit, from /proc/self/cgroup and /proc/self/mountinfo."""
    try:
        groups = [(line.split(":", 2) + ["", ""])[:3] for line in (proc / "self" / "cgroup").read_text().splitlines()]
        mounts = (proc / "self" / "mountinfo").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in mounts:  # "ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS ... - FSTYPE SOURCE SUPER_OPTIONS"
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) < 5 or not tail:
            continue
        root, point, fstype = fields[3], Path(fields[4]), tail[0]
        if fstype == "cgroup2":
            version, paths = "v2", [path for ids, _, path in groups if ids == "0"]
        elif fstype == "cgroup" and "memory" in (tail[2] if len(tail) > 2 else "").split(","):
            version, paths = "v1", [path for _, controllers, path in groups if "memory" in controllers.split(",")]
        else:
            continue
        for path in paths:  # relative to the hierarchy's root; the mount shows the part below ROOT
            relative = os.path.relpath(path, root) if path.startswith(root) else path.lstrip("/")
            here = point / relative
            found.append((version, here if here.is_dir() else point, point))
    return found


def _cgroup_headroom(version: str, folder: Path, top: Path) -> tuple[int, Path] | None:
    """The least (limit - working set) over ``folder`` and its parents up to ``top``, and where it is; None when
    no level sets a limit. The working set is the usage less the inactive file cache the kernel reclaims first."""
    names = (("memory.max", "memory.current", "inactive_file") if version == "v2" else
             ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"))
    least = None
    while True:
        limit, usage = _number(folder / names[0]), _number(folder / names[1])
        if limit is not None and limit < UNLIMITED and usage is not None:
            headroom = max(limit - usage + (_number(folder / "memory.stat", names[2]) or 0), 0)
            if least is None or headroom < least[0]:
                least = (headroom, folder)
        if folder == top or folder == folder.parent or top not in folder.parents:
            return least
        folder = folder.parent


def available(proc: Path = Path("/proc")) -> Memory | None:
    """The memory this process may still use: MemAvailable, or less where a cgroup's limit leaves less. None where
    neither can be read (not Linux): then psutil's figure, else no check."""
    proc = Path(proc)
    best = None
    host = _number(proc / "meminfo", "MemAvailable")  # in kB
    if host is not None:
        best = Memory(host * 1024, f"MemAvailable in {proc / 'meminfo'}")
    for version, folder, top in _cgroup_dirs(proc):
        found = _cgroup_headroom(version, folder, top)
        if found is not None and (best is None or found[0] < best.bytes):
            best = Memory(found[0], f"the cgroup {version} memory limit of {found[1]} less its usage")
    if best is None and not (proc / "meminfo").exists():
        try:
            import psutil

            best = Memory(int(psutil.virtual_memory().available), "psutil's available memory")
        except (ImportError, OSError):
            return None
    return best


def planned(environ=None, proc: Path = Path("/proc")) -> Memory | None:
    """The memory to plan against: ``LORA_EXPORT_MEMORY_LIMIT`` where it is set (None: ``0``/``off``, no check),
    else ``available()``."""
    value = (os.environ if environ is None else environ).get(ENV, "").strip()
    if value:
        size = parse_size(value)
        return Memory(size, f"{ENV}={value}") if size is not None else None
    return available(proc)


def check_memory(command: str, base: Path, target, where: str, environ=None, proc: Path = Path("/proc")) -> None:
    """Refuse ``command`` up front when its estimated peak for ``base`` and ``target`` exceeds ``planned()``."""
    memory = planned(environ, proc)
    if memory is None:
        return
    params, vocab, half = parameter_count(base, unpack_4bit=True), vocab_params(base), half_bytes(base)
    need = estimate(command, params, target, vocab, half)
    if need <= memory.bytes:
        return
    cheaper = _fitting_targets(params, vocab, half, memory.bytes, target.name) if command == "export" else []
    instead = (f"; or a target whose export fits: {', '.join(f'{n} (about {b / GB:.1f} GB)' for n, b in cheaper)}"
               if cheaper else "")
    raise BadInput.one(where, f"`lora-export {command}` of this {params / 1e9:.2f}B-parameter model for {target.name} "
                       f"needs about {need / GB:.1f} GB of memory at its peak (estimated from the peaks measured here, "
                       f"see README's export-cost tables; {4 * params / GB:.1f} GB of fp32 weights), and "
                       f"{memory.bytes / GB:.1f} GB is available ({memory.source})",
                       f"run it on a machine with at least {need / GB:.0f} GB of free memory, or stop what else uses "
                       f"memory here{instead}; if this process can use more than that figure says, set {ENV} to the "
                       "memory to plan against (e.g. 64G), or to off to skip this check")


def _fitting_targets(params: int, vocab: int, half: int, memory: int, current: str) -> list[tuple[str, int]]:
    """The shipped targets whose export fits ``memory``, cheapest first (at most three)."""
    from .targets import available as shipped
    from .targets import load_target

    costs = sorted((estimate("export", params, load_target(n), vocab, half), n) for n in shipped() if n != current)
    return [(n, b) for b, n in costs if b <= memory][:3]
