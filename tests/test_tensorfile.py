"""The streaming safetensors reader/writer agrees with the safetensors library, both ways, bit for bit."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_export import tensorfile
from lora_export.errors import BadInput

TENSORS = {"b.weight": torch.randn(7, 5), "a.half": torch.randn(3, 4).to(torch.bfloat16),
           "c.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3), "d.flag": torch.tensor([True, False]),
           "e.empty": torch.zeros(0, 4), "f.scalar": torch.tensor(2.5)}


def test_reads_what_the_library_writes(tmp_path):
    save_file(TENSORS, str(tmp_path / "x.safetensors"))
    entries, meta = tensorfile.read_header(tmp_path / "x.safetensors")
    assert [e.start for e in entries] == sorted(e.start for e in entries)
    with open(tmp_path / "x.safetensors", "rb") as f:
        got = {e.name: tensorfile.read_tensor(f, e) for e in entries}
    assert set(got) == set(TENSORS)
    assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in TENSORS.items())


def test_the_library_reads_what_we_write(tmp_path):
    declared = [(k, tensorfile.NAMES[str(v.dtype).removeprefix("torch.")], tuple(v.shape)) for k, v in TENSORS.items()]
    w = tensorfile.Writer(tmp_path / "y.safetensors", declared)
    for k, v in TENSORS.items():
        w.write(k, v)
    assert not (tmp_path / "y.safetensors").exists()  # only the .partial until closed
    w.close()
    got = load_file(str(tmp_path / "y.safetensors"))
    assert all(torch.equal(got[k], v) for k, v in TENSORS.items())


def test_refuses_a_truncated_or_foreign_file(tmp_path):
    save_file(TENSORS, str(tmp_path / "x.safetensors"))
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-20])
    entries, _ = tensorfile.read_header(tmp_path / "t.safetensors")
    with open(tmp_path / "t.safetensors", "rb") as f, pytest.raises(BadInput, match="truncated"):
        for e in entries:
            tensorfile.read_tensor(f, e)
    (tmp_path / "n.safetensors").write_bytes(b"PK\x03\x04 not safetensors")
    with pytest.raises(BadInput, match="not a safetensors file"):
        tensorfile.read_header(tmp_path / "n.safetensors")


def test_a_header_whose_shape_disagrees_with_its_bytes_is_refused_before_allocating(tmp_path):
    """A damaged header claiming 10^12 floats for 8 bytes: refused by name, not a MemoryError."""
    import dataclasses

    save_file({"w": torch.ones(2)}, str(tmp_path / "x.safetensors"))
    (entry,), _ = tensorfile.read_header(tmp_path / "x.safetensors")
    lying = dataclasses.replace(entry, shape=(10**12,))
    with open(tmp_path / "x.safetensors", "rb") as f, pytest.raises(BadInput, match=r"tensor w: 8 bytes for shape"):
        tensorfile.read_tensor(f, lying)
