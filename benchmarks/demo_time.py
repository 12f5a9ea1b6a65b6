"""Time `lora-export demo` end to end, as a newcomer runs it, and keep its numbers.

    python benchmarks/demo_time.py            # writes benchmarks/results/demo.json and demo.md

Records the wall time (the goal: under 3 minutes on 2 CPU cores), the largest resident set of any process
it ran, the machine it ran on, the demo's own summary table (accuracy, parity, latency ratios), and what the
terminal showed (`demo-terminal.txt`; the goal: one screen, at most 40 lines).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from machine import cpu_model  # beside this script

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "lora_export.cli", "demo"], cwd=tmp, capture_output=True,
                              text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall = time.perf_counter() - start
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        if proc.returncode not in (0, 1):
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        out = Path(tmp) / "lora-export-demo-1"
        summary = json.loads((out / "summary.json").read_text())
        table = (out / "summary.md").read_text()
        log_lines = len((out / "demo.log").read_text().splitlines())
    terminal = (proc.stderr + proc.stdout).replace(tmp, "/tmp/DEMO")  # stage lines (stderr), then the result
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version()},
        "wall_s": round(wall, 1), "goal_s": 180, "met": wall <= 180,
        "peak_rss_mb": round(peak_mb), "demo_exit_code": proc.returncode, "summary": summary,
        "terminal_lines": len(terminal.splitlines()), "terminal_goal_lines": 40, "log_lines": log_lines,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "demo-terminal.txt").write_text(terminal)
    (RESULTS / "demo.md").write_text(
        f"`lora-export demo` on {result['machine']['cpus']} x {result['machine']['cpu']}, {result['date']}: "
        f"{result['wall_s']} s wall (goal 180 s), peak RSS {result['peak_rss_mb']} MB, exit {proc.returncode}; the "
        f"terminal showed {result['terminal_lines']} lines (goal 40), demo.log kept {log_lines}.\n\n"
        + table)
    print((RESULTS / "demo.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
