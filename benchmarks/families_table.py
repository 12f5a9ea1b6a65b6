"""README's model-family table, from the figures tests/test_families.py writes.

    LORA_EXPORT_FAMILY_RESULTS=families.jsonl OMP_NUM_THREADS=1 python -m pytest tests/test_families.py -m "slow or not slow" -n 2
    python benchmarks/families_table.py families.jsonl > benchmarks/results/families.md

One row per family of tests/families.py: the architecture, the public checkpoint its config values come from, the
quirks, and per backend the measured max relative logit difference (prompt pass + 15 cached decode steps, padded
batch of 2, against PEFT's forward) and whether the 32-token greedy continuations were identical; "refused" where
lora-export refuses the family on that backend (families.KNOWN_WRONG), "-" where the backend does not take it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.families import FAMILIES  # noqa: E402

BACKENDS = ("genai-builder", "torch-dynamo")


def table(results: list[dict]) -> str:
    got = {(r["family"], r["backend"]): r for r in results}
    lines = ["| family | architecture | config values from | quirks | genai-builder | torch-dynamo |",
             "|---|---|---|---|---|---|"]
    for f in FAMILIES:
        cells = []
        for b in BACKENDS:
            r = got.get((f.name, b))
            if r is not None:
                cells.append(f"{r['max_rel_diff']:.1e}, greedy {'identical' if r['greedy_identical'] else 'DIFFERS'}")
            elif b in f.refused:
                cells.append("refused (still wrong: tested)")
            elif b in f.backends:
                cells.append("NOT MEASURED")
            else:
                cells.append("-")
        lines.append(f"| {f.name} | {f.arch} | {f.source} | {f.quirks} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    rows = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines() if line.strip()]
    sys.stdout.write(table(rows))
