"""Edit success: does the executor carry out the whole-canvas edits the loop really asks it for?

For held-out ShapeWorld prompts (``clvr eval shapeworld``'s prompts and seeds for the same ``seed``), the executor draws the first canvas as
the loop does, the ShapeWorld controller verifies it and corrects it — after at most the one redraw it
asks for on a mostly-wrong canvas — until it asks for an edit (:func:`~clvr_agent.training.loop_edits.first_edit`).
The executor then runs the request the graph builds for that edit (accumulated prompt, the canvases so
far as references, the step's seed), and the controller's passive check — what the loop itself uses to
accept or re-draw a step — judges the result. A prompt whose canvas is right asks for no edit and is
skipped; prompts are drawn until ``n`` edits were asked.

Reported: the share of edits whose every op took effect (``overall``), each op kind's share (every op
of an instruction judged alone by the same check), and how many edited canvases then satisfy the prompt.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from clvr_agent.eval.sampling import prompt_seed
from clvr_agent.state import ClvrContext
from clvr_agent.tools.shapeworld.controller import ShapeWorldController
from clvr_agent.tools.shapeworld.language import geneval_lines, parse_instruction
from clvr_agent.training.loop_edits import first_edit

OPS = ("add", "remove", "recolor", "move")
PROMPTS_PER_EDIT = 20  # give up after n × this many prompts (an executor whose every draw is right)


def eval_edits(executor, n: int = 120, seed: int = 100, out_dir: str | Path = "eval-edits", *,
               context: Optional[ClvrContext] = None, label: str = "", progress: bool = True,
               save_images: bool = True) -> dict:
    """Edit success of ``executor`` on ``n`` edits the loop asks for → results.jsonl, summary.json, table.md."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if save_images:
        (out / "images").mkdir(exist_ok=True)
    controller = ShapeWorldController()
    rows: list[dict] = []
    tried = 0
    t0 = time.perf_counter()
    bar = tqdm(total=n, desc="eval edits", disable=not progress, leave=False)
    for i, line in enumerate(geneval_lines(n * PROMPTS_PER_EDIT, seed)):  # prompt i is `clvr eval shapeworld`'s
        if len(rows) == n:
            break
        tried += 1
        s = prompt_seed(seed, i)
        asked = first_edit(line["prompt"], s, lambda r: executor.generate(r, []).image, controller, context)
        if asked is None:
            continue
        refs = asked.references()
        after = executor.generate(asked.request, refs).image
        instruction = asked.correction.instruction
        check = controller.check_step(instruction, refs[-1], after)
        ops = parse_instruction(instruction)
        op_ok = [controller.check_step(op.text(), refs[-1], after).executed for op in ops]
        verdict = controller.verify(line["prompt"], controller.plan(line["prompt"]), after, asked.steps)
        row = {"index": i, "tag": line["tag"], "prompt": line["prompt"], "seed": s, "instruction": instruction,
               "ops": [op.kind for op in ops], "op_executed": op_ok, "executed": check.executed,
               "detail": check.detail, "references": len(refs), "redraws": len(asked.steps) - 1,
               "satisfied_after": verdict.satisfied}
        if save_images:
            refs[-1].save(out / "images" / f"{i:05d}_before.png")
            after.save(out / "images" / f"{i:05d}_after.png")
        rows.append(row)
        bar.update(1)
    bar.close()
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = summarize_edits(rows)
    summary.update(n_asked=n, seed=seed, label=label, prompts_tried=tried,
                   seconds=round(time.perf_counter() - t0, 1))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "table.md").write_text(edit_table(summary))
    return summary


def summarize_edits(rows: list[dict]) -> dict:
    """``overall`` (every op of the instruction took effect), ``by_op`` (each op alone), ``satisfied_after``."""
    def rate(xs: list[bool]) -> Optional[float]:
        return sum(xs) / len(xs) if xs else None

    by_op = {}
    for kind in OPS:
        oks = [ok for r in rows for k, ok in zip(r["ops"], r["op_executed"]) if k == kind]
        by_op[kind] = {"n": len(oks), "success": rate(oks)}
    return {"n": len(rows), "overall": rate([r["executed"] for r in rows]), "by_op": by_op,
            "single_op": {"n": sum(len(r["ops"]) == 1 for r in rows),
                          "success": rate([r["executed"] for r in rows if len(r["ops"]) == 1])},
            "satisfied_after": rate([r["satisfied_after"] for r in rows])}


def edit_table(summary: dict) -> str:
    """The summary as a Markdown table (one row per op kind, then single-op instructions and all)."""
    def cell(d: dict) -> str:
        return "—" if d["success"] is None else f"{d['success']:.2f}"

    lines = [f"Edit success{' — ' + summary['label'] if summary.get('label') else ''} "
             f"(seed {summary['seed']}, {summary['prompts_tried']} prompts tried)", "",
             "| edits | n | passive check passed |", "|---|---|---|"]
    lines += [f"| {kind} (each op alone) | {d['n']} | {cell(d)} |" for kind, d in summary["by_op"].items()]
    lines.append(f"| single-op instructions | {summary['single_op']['n']} | {cell(summary['single_op'])} |")
    overall = "—" if summary["overall"] is None else f"{summary['overall']:.2f}"
    lines.append(f"| **all instructions** (every op) | {summary['n']} | **{overall}** |")
    after = "—" if summary["satisfied_after"] is None else f"{summary['satisfied_after']:.2f}"
    lines += ["", f"Edited canvases that satisfy their prompt: {after}.", ""]
    return "\n".join(lines)
