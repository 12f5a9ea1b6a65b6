"""lora_export/exportdir.py: the export's records of its inputs, and each command hashing the base once.

The base is the biggest file a command reads besides its own graph (4.4 GB for a 1.1B model in fp32); before the
fingerprint was handed on, export, validate and bench each hashed it twice. The count is taken in every process
the command starts: a ``sitecustomize`` on PYTHONPATH wraps ``fingerprint.sha256_file`` in each child before any
module binds it, and the test wraps it in its own process in every module that already holds it.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import replace

import pytest

from lora_export.errors import BadInput
from lora_export.exportdir import base_entry, check_base_unchanged, locate
from lora_export.fingerprint import fingerprint
from lora_export.manifests import read_export_manifest

from .conftest import copy_tree

CHILD_COUNTER = """
import os
import lora_export.fingerprint as f
_real = f.sha256_file
def _counted(path, *a, **k):
    with open(os.environ["LORA_EXPORT_HASH_LOG"], "a") as log:
        log.write(os.path.realpath(path) + "\\n")
    return _real(path, *a, **k)
f.sha256_file = _counted
"""


@pytest.fixture
def hashed(tmp_path, monkeypatch):
    """A function returning {real path: times hashed} since its last call, over this process and its children."""
    import lora_export.fingerprint as f

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(CHILD_COUNTER)
    log = tmp_path / "hashes.log"
    log.touch()
    monkeypatch.setenv("LORA_EXPORT_HASH_LOG", str(log))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    real = f.sha256_file

    def counted(path, *a, **k):
        with open(log, "a") as out:
            out.write(os.path.realpath(path) + "\n")
        return real(path, *a, **k)

    import sys

    for module in [m for name, m in sys.modules.items() if name.startswith("lora_export")]:
        if getattr(module, "sha256_file", None) is real:  # `from .fingerprint import sha256_file` made a copy
            monkeypatch.setattr(module, "sha256_file", counted)

    def taken() -> Counter:
        lines = log.read_text().splitlines()
        log.write_text("")
        return Counter(lines)

    return taken


@pytest.mark.slow
def test_each_command_hashes_the_base_once(tiny_base, tiny_adapter, tmp_path, hashed):
    from lora_export.pipeline import ExportRequest, bench, export, validate
    from lora_export.switchable import SwitchRequest, add
    from lora_export.switchable import export as export_switchable

    weights = str((tiny_base / "model.safetensors").resolve())
    out, switchable = tmp_path / "merged", tmp_path / "switchable"
    second = copy_tree(tiny_adapter, tmp_path / "second")
    runs = {
        "export": lambda: export(ExportRequest(base=tiny_base, adapter=tiny_adapter, target="ort-cpu-fp32", out=out)),
        "validate": lambda: validate(out),
        "bench": lambda: bench(out, rounds=2, memory=False, new_tokens=4),
        "export --switchable": lambda: export_switchable(SwitchRequest(
            base=tiny_base, adapters=(tiny_adapter,), target="ort-cpu-fp32", out=switchable)),
        "export --into": lambda: add(SwitchRequest(base=tiny_base, adapters=(second,), target=None, into=switchable)),
        "validate (switchable)": lambda: validate(switchable),
        "bench (switchable)": lambda: bench(switchable, rounds=2, memory=False, new_tokens=4),
    }
    counts = {}
    for name, run in runs.items():
        run()
        counts[name] = hashed()[weights]
    assert counts == {name: 1 for name in runs}, f"times the base's weights were hashed, per command: {counts}"


def test_records_and_checks_of_the_base(tiny_base, fp32_export, tmp_path):
    manifest = read_export_manifest(fp32_export.out)
    entry = base_entry(tiny_base, fp32_export.out)
    assert entry == manifest.base  # hashed here, or handed the fingerprint: the same record
    assert base_entry(tiny_base, fp32_export.out, fingerprint(tiny_base)) == entry
    assert check_base_unchanged(tiny_base, manifest) == fingerprint(tiny_base)
    changed = copy_tree(tiny_base, tmp_path / "changed")
    with open(changed / "model.safetensors", "r+b") as f:  # one byte of the last tensor's data
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(BadInput, match="the base's weights changed since this export was made"):
        check_base_unchanged(changed, manifest)
    # a moved export finds its base by the relative path; a base gone from both is named with the fix
    moved = replace(manifest.base, path=str(tmp_path / "nowhere"))
    assert locate(moved, fp32_export.out, "base model").resolve() == tiny_base.resolve()
    with pytest.raises(BadInput, match="the base model this export was made from is gone"):
        locate(replace(moved, relative_path="../nowhere"), fp32_export.out, "base model")


def test_the_free_disk_estimate_counts_the_as_trained_copy_only_below_the_layerwise_size(tiny_base, monkeypatch):
    """Above the layerwise size the reference rounds the 4-bit layers as it reads them: no as-trained fp32 copy is
    written, and the disk check stops asking for its 4 bytes per weight."""
    from lora_export import reference
    from lora_export.checkpoint import parameter_count
    from lora_export.exportdir import export_bytes, export_disk_note
    from lora_export.targets import load_target

    target = load_target("ort-cpu-int4")
    params = parameter_count(tiny_base, unpack_4bit=True)
    whole, note = export_bytes(tiny_base, target), export_disk_note(tiny_base)
    monkeypatch.setattr(reference, "LAYERWISE_ABOVE", 0)
    assert abs(whole - export_bytes(tiny_base, target) - 4 * params) <= 1
    assert "as-trained" in note and "as-trained" not in export_disk_note(tiny_base)
