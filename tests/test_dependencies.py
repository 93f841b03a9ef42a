"""The dependency range in pyproject.toml holds what the code imports: every diffusers/transformers name
imported anywhere in the package resolves, and the pins exclude the releases that lack them."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = ("clvr_agent", "graphs", "tools", "training", "scripts")


def _models_requirements() -> dict[str, Requirement]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        tomllib = pytest.importorskip("tomli")
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["models"]
    return {(r := Requirement(line)).name: r for line in extra}


def _imported_names(library: str) -> set[tuple[str, str]]:
    """(module, name) of every ``from <library>… import name`` and ``<library>.name`` in the sources."""
    names = set()
    for folder in PACKAGE_DIRS:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == library:
                    names.update((node.module, alias.name) for alias in node.names)
                elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == library:
                    names.add((library, node.attr))
    return names


def _string_class_names() -> set[str]:
    """Pipeline classes the klein executor looks up by name (``getattr(diffusers, class_name)``)."""
    from clvr_agent.tools import flux2_klein

    return set(flux2_klein._PIPELINE_CLASSES)


@pytest.mark.parametrize("library", ["diffusers", "transformers"])
def test_every_imported_class_exists_in_the_installed_release(library):
    names = _imported_names(library)
    if library == "diffusers":
        names |= {("diffusers", n) for n in _string_class_names()}
        assert ("diffusers", "Flux2KleinInpaintPipeline") in names and ("diffusers", "Flux2KleinKVPipeline") in names
    else:
        assert ("transformers", "Qwen3VLForConditionalGeneration") in names
    missing = [f"{m}.{n}" for m, n in sorted(names) if not hasattr(importlib.import_module(m), n)]
    assert not missing, f"{library} {importlib.metadata.version(library)} lacks {missing}"


def test_pins_exclude_releases_without_the_classes_and_dtype_handling():
    reqs = _models_requirements()
    diffusers, transformers = reqs["diffusers"].specifier, reqs["transformers"].specifier
    # 0.37 has no Flux2KleinInpaintPipeline / Flux2KleinKVPipeline; 0.38-0.39 ignore from_pretrained(dtype=).
    assert not any(diffusers.contains(v) for v in ("0.37.1", "0.38.0", "0.39.0"))
    assert diffusers.contains("0.40.0") and not diffusers.contains("0.43.0")  # an untested minor is excluded
    assert not transformers.contains("4.57.6") and not transformers.contains("5.25.0")
    for name, spec in (("diffusers", diffusers), ("transformers", transformers)):
        installed = importlib.metadata.version(name)
        assert spec.contains(installed), f"installed {name} {installed} is outside the pinned {spec}"
        assert re.fullmatch(r"<\d+\.\d+", str(next(s for s in spec if s.operator == "<")))


def test_pipeline_from_pretrained_honours_dtype(tiny_klein_dir):
    """What 0.40 added: ``dtype=`` reaches every component (0.38-0.39 silently loaded fp32)."""
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(str(tiny_klein_dir), dtype=torch.bfloat16, local_files_only=True)
    assert {pipe.transformer.dtype, pipe.text_encoder.dtype, pipe.vae.dtype} == {torch.bfloat16}
    assert Version(importlib.metadata.version("diffusers")) >= Version("0.40")
