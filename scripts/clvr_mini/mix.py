"""Write one clvr-mini training mix: the records of several dataset folders, as one JSONL in the first.

Image paths (targets and references; prior-only records have none) are rewritten relative to the first folder; a folder named twice is included twice (weighting).

  python scripts/clvr_mini/mix.py clvr_mini_work data_huge data_huge data_big_focus data_big_t2i
  # -> clvr_mini_work/data_huge/mix.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def write_mix(work: Path, into: str, parts: list[str]) -> Path:
    out = []
    for d in parts:
        pre = "" if d == into else f"../{d}/"
        for line in (work / d / "data.jsonl").read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                if "target" in rec:  # prior-only records ({"prompt", "prior_only": true}) have no images
                    rec = {**rec, "target": pre + rec["target"], "references": [pre + r for r in rec.get("references", [])]}
                out.append(json.dumps(rec))
    path = work / into / "mix.jsonl"
    path.write_text("\n".join(out) + "\n")
    return path


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit("usage: mix.py WORK_DIR INTO [PART ...]  (INTO is also the first part unless PARTs are given)")
    work, into, *parts = sys.argv[1:]
    print(write_mix(Path(work), into, parts or [into]))
