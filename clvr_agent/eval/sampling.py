"""The one sampler family every eval draws with: a prompt and a seed in, a :class:`Sample` out.

``single_step(executor)`` is one executor call on the prompt alone; ``loop(runnable)`` is the CLVR
graph (a :class:`~clvr_agent.app.api.ClvrRunnable`, or anything with its ``invoke``). Seeds come from
:func:`prompt_seed`, so prompt ``i`` (sample ``j``) gets the same seed whatever the shard or order.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

from PIL import Image

from clvr_agent.seeds import derive_seed, step_seed
from clvr_agent.types import ExecutorRequest


class Sample(NamedTuple):
    image: Optional[Image.Image]  # None when the loop ended without a canvas (status failed)
    iterations: int
    status: str


Sampler = Callable[[str, int], Sample]


def prompt_seed(seed: int, index: int, sample: int = 0) -> int:
    """The seed of sample ``sample`` of prompt ``index`` under the run's ``seed``."""
    return derive_seed(seed, index, sample)


def single_step(executor, **request_options) -> Sampler:
    """One executor call per sample: the prompt alone, no references (``steps``, ``height``, … optional),
    drawn with the loop's first-step seed, so single step and loop are paired on their first canvas."""
    options = {k: v for k, v in request_options.items() if v is not None}

    def sample(prompt: str, seed: int) -> Sample:
        request = ExecutorRequest(mode="generate", instruction=prompt, accumulated_prompt=prompt, seed=step_seed(seed, 0),
                                  **options)
        return Sample(executor.generate(request, []).image, 1, "single")

    return sample


def loop(runnable) -> Sampler:
    """The CLVR loop per sample; a run that ends without a final image gives ``image=None``."""

    def sample(prompt: str, seed: int) -> Sample:
        out = runnable.invoke({"prompt": prompt, "seed": seed})
        image = None
        if out.get("final_image"):
            with Image.open(out["final_image"]) as im:
                image = im.convert("RGB")
        return Sample(image, int(out.get("iterations") or 0), str(out.get("status")))

    return sample
