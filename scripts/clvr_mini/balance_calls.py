"""One balanced calls file for clvr-mini-vlm's SFT: as many unmet verdicts as satisfied ones.

`clvr synth --record-calls` on ShapeWorld records far more passing canvases than failing ones (about 1 verify
call in 4 is unmet, 1 check in 7 not executed), and a student trained on that mix learns to call every first
canvas "satisfied" (h18 stage B: `satisfied` precision 0.77, the loop no better than single step). This reads
every ``calls-*.jsonl`` under the given folders, drops exact duplicates (the synth judge asks the same call
twice for a prompt's first canvas), keeps every unmet verdict, every not-executed check and every correction,
samples satisfied verdicts and executed checks down to the ratios asked, repeats corrections ``--correct-repeat``
times, keeps at most ``--plans`` plan calls, and writes ``OUT/calls-balanced.jsonl`` with absolute image paths
(so `clvr train sft-vlm --data OUT` reads it in place) and ``OUT/balance.json`` with the counts.

Usage: python scripts/clvr_mini/balance_calls.py OUT SRC [SRC ...] [--satisfied-per-unmet 1.0]
       [--executed-per-missed 2.0] [--correct-repeat 2] [--plans 4000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

from clvr_agent.tools.conversation import ControllerCall


def read_calls(sources: list[Path]) -> list[ControllerCall]:
    """Every recorded call under ``sources`` with absolute image paths, exact duplicates once."""
    seen, out = set(), []
    for src in sources:
        files = sorted(src.rglob("calls-*.jsonl")) if src.is_dir() else []
        if not files:
            raise SystemExit(f"error: {src} holds no calls-*.jsonl (run `clvr synth --record-calls` into it)")
        for f in files:
            for line in f.read_text().splitlines():
                if not line.strip():
                    continue
                call = ControllerCall.model_validate_json(line).resolved(f.parent.resolve())
                key = call.model_dump_json(exclude={"meta"})
                if key not in seen:
                    seen.add(key)
                    out.append(call)
    return out


def write_calls(out: Path, name: str, calls: list[ControllerCall], report: dict, args) -> None:
    """``out/calls-<name>.jsonl`` (written beside, then moved in) and ``out/<report file>`` with the parsed args."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"calls-{name}.jsonl.tmp"
    tmp.write_text("".join(c.model_dump_json() + "\n" for c in calls))
    tmp.replace(out / f"calls-{name}.jsonl")
    report["args"] = {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v)
                      for k, v in vars(args).items()}
    (out / REPORTS[name]).write_text(json.dumps(report, indent=2) + "\n")


REPORTS = {"balanced": "balance.json", "swapped": "swap.json", "drill": "drill.json"}


def outcome(call: ControllerCall) -> str:
    """``task`` plus the verdict it teaches: verify:met / verify:unmet, check:done / check:missed."""
    reply = json.loads(call.reply)
    if call.task == "verify":
        return "verify:met" if reply["satisfied"] else "verify:unmet"
    if call.task == "check":
        return "check:done" if reply["executed"] else "check:missed"
    return call.task


def balance(calls: list[ControllerCall], *, satisfied_per_unmet: float, executed_per_missed: float,
            correct_repeat: int, plans: int, rng: random.Random) -> list[ControllerCall]:
    groups: dict[str, list[ControllerCall]] = {}
    for c in calls:
        groups.setdefault(outcome(c), []).append(c)

    def take(name: str, n: int) -> list[ControllerCall]:
        pool = groups.get(name, [])
        return rng.sample(pool, min(n, len(pool)))

    out = groups.get("verify:unmet", []) + groups.get("check:missed", [])
    out += take("verify:met", round(satisfied_per_unmet * len(groups.get("verify:unmet", []))))
    out += take("check:done", round(executed_per_missed * len(groups.get("check:missed", []))))
    out += groups.get("correct", []) * correct_repeat
    out += take("plan", plans)
    rng.shuffle(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("sources", type=Path, nargs="+")
    p.add_argument("--satisfied-per-unmet", type=float, default=1.0)
    p.add_argument("--executed-per-missed", type=float, default=2.0)
    p.add_argument("--correct-repeat", type=int, default=2)
    p.add_argument("--plans", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.satisfied_per_unmet <= 0 or a.executed_per_missed <= 0 or a.correct_repeat < 1 or a.plans < 0:
        raise SystemExit("error: ratios must be > 0, --correct-repeat >= 1 and --plans >= 0")
    calls = read_calls(a.sources)
    kept = balance(calls, satisfied_per_unmet=a.satisfied_per_unmet, executed_per_missed=a.executed_per_missed,
                   correct_repeat=a.correct_repeat, plans=a.plans, rng=random.Random(a.seed))
    report = {"read": dict(Counter(outcome(c) for c in calls)), "written": dict(Counter(outcome(c) for c in kept))}
    write_calls(a.out, "balanced", kept, report, a)
    print(json.dumps({"read": report["read"], "written": report["written"]}))


if __name__ == "__main__":
    main()
