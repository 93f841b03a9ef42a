"""Shared fixtures: tiny real-class models built offline from configs, seeded, once per session.

Tests must not mutate these shared objects (processors, dtype, device); build a private copy with
``clvr_agent.tools.tiny`` when a test needs to change one.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the test suite may reach the model hub
# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine they lose 3x to contention.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_klein():
    """A step-distilled tiny Flux2KleinPipeline (4 steps, no CFG)."""
    from clvr_agent.tools.tiny import build_tiny_flux2_klein

    return build_tiny_flux2_klein(distilled=True, seed=0)


@pytest.fixture(scope="session")
def tiny_klein_base():
    """A base (non-distilled) tiny Flux2KleinPipeline: CFG, two transformer passes per step."""
    from clvr_agent.tools.tiny import build_tiny_flux2_klein

    return build_tiny_flux2_klein(distilled=False, seed=0)


@pytest.fixture(scope="session")
def tiny_klein_dir(tiny_klein, tmp_path_factory):
    """``tiny_klein`` saved as a diffusers folder (safetensors), as a user would pass with --model."""
    path = tmp_path_factory.mktemp("tiny-klein")
    tiny_klein.save_pretrained(path)
    return path


@pytest.fixture
def one_torch_thread():
    """Tiny models are overhead-bound; one intra-op thread is faster and steadier on a shared CPU."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
