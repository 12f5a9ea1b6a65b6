"""Read and write safetensors files one tensor at a time, holding only that tensor in memory.

Written by hand, on the documented format (8-byte little-endian header length, a JSON header of
``{name: {dtype, shape, data_offsets}}``, then the raw bytes), because the safetensors library has no
streaming API: ``safe_open`` memory-maps the file, so every page read stays resident (counted in RSS)
until the file is closed, and ``save_file`` serializes the whole dict into one buffer, a second copy of the
shard. For a merge that should peak at about one tensor, both double the memory.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInput

DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
          "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
          "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str  # safetensors code: F32, BF16, ...
    shape: tuple[int, ...]
    start: int  # offset of the bytes in the file
    end: int


def read_header(path: Path) -> tuple[list[Entry], dict]:
    """The file's tensors, in the order their bytes are stored, and its metadata."""
    with open(path, "rb") as f:
        raw = f.read(8)
        size = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 0 < size <= MAX_HEADER:
            raise BadInput.one(str(path), "not a safetensors file (bad header length)", "save the model again")
        try:
            header = json.loads(f.read(size))
        except (ValueError, UnicodeDecodeError) as e:
            raise BadInput.one(str(path), f"the safetensors header is not valid JSON ({e})", "save the model again") from e
    metadata = header.pop("__metadata__", {}) or {}
    entries = []
    for name, info in header.items():
        if info.get("dtype") not in DTYPES:
            raise BadInput.one(str(path), f"tensor {name} has dtype {info.get('dtype')!r}, which is not supported",
                               "save the model in a float or integer dtype")
        begin, end = info["data_offsets"]
        entries.append(Entry(name, info["dtype"], tuple(info["shape"]), 8 + size + begin, 8 + size + end))
    return sorted(entries, key=lambda e: e.start), metadata


def read_tensor(f, entry: Entry):
    """One tensor, read with a plain file read (no memory map) straight into its own storage: no second copy."""
    import torch

    import math

    dtype = getattr(torch, DTYPES[entry.dtype])
    size = entry.end - entry.start
    if math.prod(entry.shape) * _itemsize(entry.dtype) != size:  # checked before allocating what the header says
        raise BadInput.one(str(getattr(f, "name", "?")), f"tensor {entry.name}: {size} bytes for shape "
                           f"{list(entry.shape)} in {entry.dtype}", "the file is damaged: copy or save the model again")
    t = torch.empty(entry.shape, dtype=dtype)
    if not size:
        return t
    f.seek(entry.start)
    if f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) != size:
        raise BadInput.one(str(getattr(f, "name", "?")), f"truncated at tensor {entry.name}",
                           "the file is incomplete: copy or save the model again")
    return t


class Writer:
    """Writes a safetensors file whose tensors (names, dtypes, shapes) are declared up front, then given
    one by one in that order. Written to ``PATH.partial`` and renamed when complete."""

    def __init__(self, path: Path, declared: list[tuple[str, str, tuple[int, ...]]], metadata: dict | None = None):
        import math

        self.path, self.declared, self.next = Path(path), declared, 0
        header, offset = {}, 0
        for name, dtype, shape in declared:
            size = math.prod(shape) * _itemsize(dtype)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        header = {"__metadata__": metadata or {"format": "pt"}, **header}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # align the data, as the library does
        self.tmp = self.path.with_name(self.path.name + ".partial")
        self.f = open(self.tmp, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor) -> None:
        want = self.declared[self.next]
        got = (name, NAMES[str(tensor.dtype).removeprefix("torch.")], tuple(tensor.shape))
        if got != want:
            raise AssertionError(f"tensor {got} written where {want} was declared")
        import torch

        if tensor.numel():
            self.f.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)  # no copy
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.declared):
            raise AssertionError(f"{len(self.declared) - self.next} declared tensors were not written")
        self.f.close()
        self.tmp.replace(self.path)


def _itemsize(code: str) -> int:
    import torch

    return torch.empty((), dtype=getattr(torch, DTYPES[code])).element_size()

