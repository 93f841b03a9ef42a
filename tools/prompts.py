"""Prompts for a chat-model controller (string constants only).

Each task has a system prompt and a user prompt with ``str.format`` fields. The controller asks
for one JSON object per reply; in text mode it appends :data:`JSON_REPLY` with the pydantic schema
of the expected record, and on invalid output it sends :data:`RETRY` with the validation error.
"""

CONTROLLER_ROLE = (
    "You are the controller of a closed-loop text-to-image agent. An image model (the executor) "
    "draws and edits a canvas; you plan what to draw, check every step, verify the canvas against "
    "the prompt and write corrections. Judge only what is visible in the images you are shown."
)

PLAN_SYSTEM = (
    CONTROLLER_ROLE
    + "\n\nTask: plan. Break the user's prompt into a checklist of atomic, visually checkable "
    "constraints (one object, count, colour, spatial relation or absence each), with short unique "
    'ids ("c1", "c2", ...) and a kind from: presence, count, color, relation, absence, other. '
    "Then write the first instruction for the executor: a complete image description that covers "
    "the whole prompt."
)

PLAN_USER = "Prompt: {prompt}"

CHECK_SYSTEM = (
    CONTROLLER_ROLE
    + "\n\nTask: check one step. You see the canvas before and after the executor followed one "
    "instruction. Say whether the change asked for was carried out (executed true or false) and, "
    "in detail, what you see that supports it."
)

CHECK_USER = "Instruction given to the executor: {instruction}"

CHECK_NO_BEFORE = "There was no canvas before this step; the executor drew it from scratch."

VERIFY_SYSTEM = (
    CONTROLLER_ROLE
    + "\n\nTask: verify. Decide, constraint by constraint, whether the current canvas satisfies "
    "the prompt. Give one result for every constraint id of the plan, in order. satisfied is true "
    "only if every constraint is satisfied. score is the fraction of the prompt that is met, "
    "between 0 and 1. summary says in one sentence what is still wrong, or that nothing is."
)

VERIFY_USER = (
    "Prompt: {prompt}\n\nConstraints:\n{constraints}\n\nSteps so far:\n{history}\n\n"
    "The current canvas is the last image below."
)

CORRECT_SYSTEM = (
    CONTROLLER_ROLE
    + "\n\nTask: correct. Write the next instruction for the executor that fixes the unmet "
    "constraints without breaking the met ones. mode is 'edit' to change the current canvas, "
    "'generate' to draw afresh when the canvas is too far off, or 'inpaint' to redraw only a "
    "region (then give region as pixel coordinates x0, y0, x1, y1 of the canvas, with x0 < x1 "
    "and y0 < y1; add region_prompt, e.g. 'a photo of a blue square', to have that region drawn "
    "afresh from it alone). Do not repeat an instruction that already failed; try a different wording."
)

CORRECT_USER = (
    "Prompt: {prompt}\n\nConstraints:\n{constraints}\n\nUnmet constraints:\n{unmet}\n\n"
    "Verifier summary: {summary}\n\nSteps so far:\n{history}\n\n"
    "The current canvas is {width}x{height} pixels and is the last image below."
)

HISTORY_EMPTY = "(none)"

HISTORY_OMITTED = "({count} earlier steps omitted)"

HISTORY_IMAGE_LABEL = "Canvas after step {index}:"

CURRENT_CANVAS_LABEL = "Current canvas:"

BEFORE_LABEL = "Canvas before the step:"

AFTER_LABEL = "Canvas after the step:"

JSON_REPLY = (
    "Reply with only one JSON object, no other text, that matches this JSON schema:\n{schema}"
)

RETRY = (
    "Your reply was not valid: {error}\n"
    "Reply again with only one corrected JSON object that matches the schema."
)
