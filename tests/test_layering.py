"""The folder tree is the architecture: each layer of ``recsys_embed`` imports only the layers below it.

Layers, bottom up (README's architecture section):

0. the shared top-level modules: ``errors``, ``io``, ``config``, ``types``, ``progress``, ``store``, ``faults``
1. ``data`` (log -> ``Interactions``)
2. ``evaluation`` (``Embeddings`` + targets -> numbers; the ranking kernel ``topk``)
3. ``tracking`` (the MLflow edge, reports, plots)
4. ``models`` (``Interactions`` -> ``Embeddings``, the search)
5. ``serving`` (what users consume)
6. ``pipeline`` (the stages)
7. the entry points: ``cli``, ``bench``

Every import counts, also those inside functions (lazy imports are how upward dependencies usually hide). The
library never imports Prefect, and only the command line (``cli``, which starts the flows) imports ``flows``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

LAYERS: dict[str, int] = {
    **dict.fromkeys(("errors", "io", "config", "types", "progress", "store", "faults"), 0),
    "data": 1,
    "evaluation": 2,
    "tracking": 3,
    "models": 4,
    "serving": 5,
    "pipeline": 6,
    "cli": 7,
    "bench": 7,
}
PACKAGE = REPO / "recsys_embed"


def layer_of(module: str) -> str:
    """``recsys_embed.models.two_tower.train`` -> ``models``; ``recsys_embed.config`` -> ``config``."""
    parts = module.split(".")
    if parts[0] != "recsys_embed" or len(parts) < 2:
        raise ValueError(f"not a recsys_embed submodule: {module}")
    return parts[1]


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """(line, module) of every import in ``source`` (``from recsys_embed import x`` counts as
    ``recsys_embed.x``; relative imports are resolved against ``module``)."""
    out: list[tuple[int, str]] = []
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base == "recsys_embed":
                out += [(node.lineno, f"recsys_embed.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, base))
    return out


def violations(source: str, module: str) -> list[str]:
    """What in ``source`` (the code of ``module``) breaks the layering, one line each."""
    own = layer_of(module)
    found: list[str] = []
    for line, target in imported_modules(source, module):
        top = target.split(".")[0]
        if top == "prefect" or (top == "flows" and own != "cli"):
            found.append(f"{module}:{line} imports {target}: the library never imports Prefect or flows/ "
                         "(only cli starts flows)")  # fmt: skip
        if top != "recsys_embed" or target == "recsys_embed":
            continue
        other = layer_of(target)
        if other not in LAYERS:
            found.append(f"{module}:{line} imports {target}, which is in no layer: add it to LAYERS and the README")
        elif LAYERS[other] > LAYERS[own]:
            found.append(
                f"{module}:{line} imports {target}: {own} (layer {LAYERS[own]}) may not import {other} "
                f"(layer {LAYERS[other]})"
            )
    return found


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name != "recsys_embed":
            out.append((name, path))
    return out


def test_every_module_is_in_a_layer() -> None:
    unplaced = sorted({layer_of(name) for name, _ in _modules()} - set(LAYERS))
    assert not unplaced, f"modules outside every layer: {unplaced}; place them in LAYERS (and README's tree)"


def test_each_layer_imports_only_layers_below_it() -> None:
    found = [v for name, path in _modules() for v in violations(path.read_text(), name)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    ("module", "source", "culprit"),
    [
        ("recsys_embed.data.split", "from recsys_embed.models import ease\n", "data (layer 1) may not import models"),
        ("recsys_embed.models.ease", "def f():\n    from recsys_embed.pipeline import stages\n",
         "may not import pipeline"),
        ("recsys_embed.evaluation.topk", "import recsys_embed.serving.export\n", "may not import serving"),
        ("recsys_embed.models.two_tower.train", "from ...pipeline import stages\n", "may not import pipeline"),
        ("recsys_embed.serving.export", "from prefect import task\n", "never imports Prefect"),
        ("recsys_embed.config", "from recsys_embed import data\n", "config (layer 0) may not import data"),
        ("recsys_embed.pipeline.stages", "from flows import api\n", "only cli starts flows"),
        ("recsys_embed.cli", "import prefect\n", "never imports Prefect"),
    ],
)
def test_an_upward_import_is_caught(module: str, source: str, culprit: str) -> None:
    found = violations(source, module)
    assert len(found) == 1 and culprit in found[0], found


def test_downward_and_sideways_imports_pass() -> None:
    src = "from recsys_embed.data import split\nfrom recsys_embed.models.mf import train_als\nimport numpy\n"
    assert violations(src, "recsys_embed.models.tuning") == []
    assert violations("from . import ease\n", "recsys_embed.models.factory") == []
