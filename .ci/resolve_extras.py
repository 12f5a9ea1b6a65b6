"""CI: every extra in pyproject.toml must resolve against the package registry, with README's torch pin.

`pip install --dry-run` resolves (reading metadata, installing nothing) in a scratch target, so a pin that no
release can meet (`onnxruntime-gpu>=1.32` when the newest was 1.31.1) fails CI instead of a user's install.
Each extra is resolved on its own, as README installs it; `cpu` and `gpu` must never be installed together.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH = "torch==2.13.0"  # README's pin


def main() -> int:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    failed = []
    for extra in extras:
        with tempfile.TemporaryDirectory(prefix="resolve-") as target:
            cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
                   "--target", target, TORCH, f"{ROOT}[{extra}]"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
        print(f"extra [{extra}]: {'resolves' if proc.returncode == 0 else 'DOES NOT RESOLVE'}")
        if proc.returncode != 0:
            failed.append(extra)
            print("\n".join(errors[-3:] or proc.stderr.splitlines()[-5:]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
