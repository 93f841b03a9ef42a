"""The loop's edit requests reproduced outside the graph (edit data, edit-success eval) match the graph's."""

from __future__ import annotations

from clvr_agent.app.api import create_clvr
from clvr_agent.seeds import step_seed
from clvr_agent.tools.shapeworld.controller import ShapeWorldController
from clvr_agent.tools.shapeworld.executor import ShapeWorldExecutor
from clvr_agent.tools.shapeworld.language import geneval_lines
from clvr_agent.tools.shapeworld.world import WorldConfig
from clvr_agent.training.loop_edits import first_edit


def test_first_edit_is_the_request_the_graph_makes(tmp_path):
    """Same executor, seed and controller: the graph's first edit step asks exactly what first_edit builds."""
    executor = ShapeWorldExecutor(WorldConfig(eps_per_constraint=0.2))
    compared = 0
    for i, line in enumerate(geneval_lines(24, seed=5)):
        seed = 1000 + i
        asked = first_edit(line["prompt"], seed, lambda r: executor.generate(r, []).image, ShapeWorldController())
        out = create_clvr(executor, controller=ShapeWorldController(), artifact_dir=str(tmp_path / str(i)),
                          max_iterations=4, passive_retries=0).invoke({"prompt": line["prompt"], "seed": seed})
        steps = out["trajectory"]["steps"]
        first = next((k for k, s in enumerate(steps) if s["request"]["mode"] == "edit"), None)
        if asked is None:  # no edit asked, or after a draw the graph kept although it drew nothing
            assert first is None or any(not s["passive"]["executed"] for s in steps[:first])
            continue
        graph = steps[first]["request"]
        assert asked.request.mode == "edit" and asked.request.instruction == graph["instruction"]
        assert asked.request.accumulated_prompt == graph["accumulated_prompt"]
        assert asked.request.seed == graph["seed"] == step_seed(seed, len(asked.steps))
        assert [r.path for r in asked.request.references] == [f"canvas-{s.index}.png" for s in asked.steps][-3:]
        assert len(graph["references"]) == len(asked.references()) and asked.references()[-1] is asked.canvases[-1]
        compared += 1
    assert compared >= 5
