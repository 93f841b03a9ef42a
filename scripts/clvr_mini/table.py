"""Print the clvr-mini results table (markdown) from ``<eval dir>/<row>/row.json`` files.

  python scripts/clvr_mini/table.py clvr_mini_work/eval random-init base distill
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    root, rows = Path(sys.argv[1]), sys.argv[2:]
    print("| row | steps × CFG (NFE/generate) | single-object colour+shape | single-step overall (strict) | loop overall (strict) "
          "| loop − single | mean iterations | wall time per loop |")
    print("|---|---|---|---|---|---|---|---|")
    for name in rows:
        r = json.loads((root / name / "row.json").read_text())
        cfg = f"CFG {r['guidance']:g}" if r["cfg"] else "no CFG"
        s, lp = r.get("single", {}), r.get("loop", {})
        fmt = lambda m: f"{m['overall']:.2f} ({m['strict_overall']:.2f})" if m else "–"  # noqa: E731
        cs = f"{r['colour_shape']['colour_shape']:.2f}" if "colour_shape" in r else "–"
        gain = f"{lp['overall'] - s['overall']:+.2f}" if s and lp else "–"
        print(f"| {name} | {r['steps']} × {cfg} ({r['nfe']}) | {cs} | {fmt(s)} | {fmt(lp)} | {gain} | "
              f"{lp.get('mean_iterations', float('nan')):.2f} | {lp.get('seconds_per_prompt', float('nan')):.1f} s |")
    for name in rows:
        r = json.loads((root / name / "row.json").read_text())
        tags = sorted(set(r.get("single", {}).get("per_tag", {})) | set(r.get("loop", {}).get("per_tag", {})))
        per = "; ".join(f"{t} {r['single']['per_tag'].get(t, 0):.2f}→{r['loop']['per_tag'].get(t, 0):.2f}" for t in tags
                        if "single" in r and "loop" in r)
        print(f"\n{name} per tag (single→loop, n={r['n']}): {per}")
        if "probe" in r:
            p = r["probe"]
            print(f"{name} probe, pass by tier {p['tiers']}: single {[round(x, 2) for x in p['single']['pass_by_tier']]}, "
                  f"loop {[round(x, 2) for x in p['loop']['pass_by_tier']]} (AUC {p['single']['auc']:.1f} vs {p['loop']['auc']:.1f})")


if __name__ == "__main__":
    main()
