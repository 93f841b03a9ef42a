"""One self-contained HTML page per run: prompt, plan, every step in order, and the stop reason.

Images are linked by paths relative to the page, so the run folder can be moved or zipped whole.
While a run is ``running`` the page reloads itself, so a browser left open on it follows a long run;
it is replaced atomically, so that browser never reads half a page.
"""

from __future__ import annotations

import html
import os
import secrets
from pathlib import Path

from clvr_agent.types import ImageRef, Step, Trajectory

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa;max-width:1100px}
h1{font-size:20px;margin:0 0 4px} .prompt{font-size:17px;margin:0 0 12px}
.badge{display:inline-block;padding:2px 8px;border-radius:10px;color:#fff;font-weight:600}
.satisfied{background:#2a7} .budget_exhausted,.no_progress{background:#c80} .failed{background:#c33}
.running{background:#888}
.step{background:#fff;border:1px solid #ddd;border-radius:8px;padding:12px;margin:12px 0;display:flex;gap:16px}
.step.rejected{opacity:.6;border-style:dashed} .canvas img{width:256px;height:auto;border:1px solid #ccc}
.refs img{width:64px;height:auto;margin-right:4px;border:1px solid #ccc;vertical-align:top}
.meta{flex:1} .ok{color:#2a7} .bad{color:#c33} code{background:#eee;padding:1px 4px;border-radius:3px}
table{border-collapse:collapse} td{padding:1px 8px 1px 0;vertical-align:top}
.final img{width:384px;border:2px solid #2a7}
"""


def _img(ref: ImageRef | None, base: Path, cls: str = "") -> str:
    if ref is None:
        return "<em>no canvas</em>"
    # a run folder's refs are already relative to the folder the page lives in
    rel = os.path.relpath(ref.path, base) if os.path.isabs(ref.path) else ref.path
    return f'<img class="{cls}" src="{html.escape(rel)}" alt="{ref.sha256[:12]}" title="{ref.sha256[:12]}">'


def _mark(ok: bool | None) -> str:
    if ok is None:
        return "–"
    return '<span class="ok">✔</span>' if ok else '<span class="bad">✘</span>'


def _step(step: Step, base: Path) -> str:
    req = step.request
    refs = "".join(_img(r, base) for r in req.references) or "<em>none</em>"
    rows = [
        ("mode", f"<code>{req.mode}</code> · seed {req.seed}"),
        ("instruction", html.escape(step.instruction)),
        ("references", f'<span class="refs">{refs}</span>'),
        ("passive", f"{_mark(step.passive.executed if step.passive else None)} "
                    f"{html.escape(step.passive.detail) if step.passive else ''}"),
    ]
    if step.verdict:
        items = "".join(
            f"<div>{_mark(c.satisfied)} <code>{html.escape(c.id)}</code> {html.escape(c.detail)}</div>"
            for c in step.verdict.constraints
        )
        rows.append(("active", f"{_mark(step.verdict.satisfied)} score {step.verdict.score:.2f} "
                               f"{html.escape(step.verdict.summary)}{items}"))
    if step.reasoning:
        rows.append(("reasoning", html.escape(step.reasoning)))
    timing = ", ".join(f"{k} {v:.3f}s" for k, v in step.timings.items())
    rows.append(("cost", f"NFE {step.nfe}" + (f" · {timing}" if timing else "")))
    if step.error:
        rows.append(("error", f'<span class="bad">{html.escape(step.error)}</span>'))
    body = "".join(f"<tr><td><b>{k}</b></td><td>{v}</td></tr>" for k, v in rows)
    cls = "step" + ("" if step.accepted else " rejected")
    title = f"Step {step.index} · iteration {step.iteration}" + (f" · retry {step.attempt}" if step.attempt else "")
    if not step.accepted:
        title += " · discarded"
    return (f'<div class="{cls}"><div class="canvas">{_img(step.canvas, base)}</div>'
            f'<div class="meta"><h3>{title}</h3><table>{body}</table></div></div>')


REFRESH_SECONDS = 2  # how often a running run's page reloads itself


def trace_html(trajectory: Trajectory, base: Path, *, refresh_s: int = REFRESH_SECONDS) -> str:
    """The page as a string; image links are relative to ``base``. A running run's page carries a
    meta refresh, a finished one none."""
    t = trajectory
    plan = ""
    if t.plan:
        items = "".join(f"<li><code>{html.escape(c.id)}</code> {html.escape(c.text)} "
                        f"<small>({c.kind})</small></li>" for c in t.plan.constraints)
        note = " <em>(fallback: the controller could not plan)</em>" if t.plan.fallback else ""
        plan = f"<h2>Plan{note}</h2><ol>{items}</ol><p>First instruction: {html.escape(t.plan.first_instruction)}</p>"
    total_nfe = sum(s.nfe for s in t.steps)
    final = f'<div class="final"><h2>Final image</h2>{_img(t.final_canvas, base)}</div>' if t.final_canvas else ""
    running = t.status == "running"
    refresh = f'<meta http-equiv="refresh" content="{refresh_s}">' if running else ""
    live = f' <small class="live">(running: this page reloads every {refresh_s} s)</small>' if running else ""
    return f"""<!doctype html><html><head><meta charset="utf-8">{refresh}<title>CLVR trace</title>
<style>{_CSS}</style></head><body>
<h1>CLVR trace <span class="badge {t.status}">{t.status}</span>{live}</h1>
<p class="prompt">“{html.escape(t.prompt)}”</p>
<p>backend <code>{html.escape(t.backend)}</code> · controller <code>{html.escape(t.controller)}</code> ·
seed {t.seed} · {t.iterations} iteration(s) · {len(t.steps)} executor call(s) · NFE {total_nfe}</p>
<p><b>Stop reason:</b> {html.escape(t.stop_reason)}</p>
{plan}{final}<h2>Steps</h2>{''.join(_step(s, base) for s in t.steps)}
</body></html>"""


def write_trace(trajectory: Trajectory, out_path: str | os.PathLike, *, refresh_s: int = REFRESH_SECONDS) -> Path:
    """Write the trace page to ``out_path`` atomically (a temp file in the same folder, then
    ``os.replace``), so a browser reloading it mid-run never reads a partial page."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    page = trace_html(trajectory, out.parent.resolve(), refresh_s=refresh_s)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:  # "x": a fresh file with the umask's permissions
            f.write(page)
        if trajectory.status != "running":
            _later_second_than(out, tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _later_second_than(old: Path, new: Path) -> None:
    """Give ``new`` an mtime in a later whole second than ``old``'s.

    A web server answers a reload's ``If-Modified-Since`` from the file's mtime at one-second resolution
    (``Last-Modified``; e.g. ``python -m http.server``). When the finished page replaced the last running page
    within the same second, the browser was told "304 Not Modified", kept the running page and reloaded it
    forever. Only the finished page is moved (at most a second ahead): running pages are followed by newer ones.
    """
    try:
        before = int(old.stat().st_mtime)
    except FileNotFoundError:
        return
    now = new.stat().st_mtime
    if int(now) <= before:
        os.utime(new, (now, before + 1))


render_trace = write_trace  # the 0.1 name, kept for callers


def summary_text(trajectory: Trajectory) -> str:
    """A few lines for the terminal: status, iterations and each step's instruction and score."""
    t = trajectory
    lines = [f"{t.status}: {t.stop_reason} ({t.iterations} iterations, {len(t.steps)} executor calls)",
             f"prompt: {t.prompt}"]
    for s in t.steps:
        score = f"{s.verdict.score:.2f}" if s.verdict else "  – "
        flag = "" if s.accepted else " [discarded]"
        lines.append(f"  step {s.index} it{s.iteration} {s.request.mode:8s} score {score} nfe {s.nfe}: "
                     f"{s.instruction[:80]}{flag}")
    if t.final_canvas:
        lines.append(f"final: {t.final_canvas.path}")
    return "\n".join(lines)
