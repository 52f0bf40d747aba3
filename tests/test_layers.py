"""The layering of DESIGN.md holds: each layer imports only from the layers below it."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fastsae"


def _imports(folder: Path) -> dict[str, list[str]]:
    """Every module a file under folder imports, resolved to an absolute dotted name."""
    found = {}
    for path in folder.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = list(parts[:len(parts) - node.level]) if node.level else []
                names.append(".".join([*base, *([node.module] if node.module else [])]))
            elif isinstance(node, ast.Import):
                names.extend(alias.name for alias in node.names)
        found[str(path.relative_to(PACKAGE.parent))] = names
    return found


@pytest.mark.parametrize("folder,forbidden", [
    ("train", ("fastsae.harvest", "fastsae.evaluation", "fastsae.kernels", "fastsae.pipeline")),
    ("model", ("fastsae.train", "fastsae.harvest", "fastsae.evaluation", "fastsae.pipeline")),
    ("harvest", ("fastsae.train", "fastsae.evaluation", "fastsae.pipeline")),
    ("evaluation", ("fastsae.train", "fastsae.pipeline")),
])
def test_a_layer_imports_nothing_above_it(folder, forbidden):
    for file, names in _imports(PACKAGE / folder).items():
        bad = [n for n in names if n.startswith(forbidden)]
        assert not bad, f"{file} imports {bad}"


def test_only_the_ops_layer_reaches_the_kernels():
    for file, names in _imports(PACKAGE).items():
        if not file.startswith("fastsae/ops/"):
            assert not [n for n in names if n.startswith("fastsae.kernels")], file


def test_import_fastsae_loads_neither_evaluation_nor_harvesting():
    code = ("import fastsae, fastsae.train, sys; "
            "assert not any(m.startswith(('fastsae.evaluation', 'fastsae.harvest')) for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
