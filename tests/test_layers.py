"""The layering of DESIGN.md holds, and no two modules of fastsae import each other, however indirectly.

Each layer imports only from the layers above it in DESIGN.md's table (or its own). Every import counts:
at module level, inside functions (lazy), under `if TYPE_CHECKING:`. The one exception is the package face:
a module-level `__getattr__` in an `__init__.py` may import a name from further down, lazily, so that
`fastsae.splice` works without `import fastsae` loading the model layer.
"""

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastsae"
KERNELS = ROOT / "kernels"  # installed as fastsae.kernels (fastsae/_kernel_package.py)

# DESIGN.md's layer table, top to bottom: (layer, dotted module names it holds; a name covers its submodules).
LAYERS = (
    ("kernels", ("fastsae.kernels",)),
    ("ops", ("fastsae.ops",)),
    # sae, config, latents, io, losses, interop, ensemble, toy: "fastsae.*" is the package face and every
    # module at the package root (the small private ones included), less those placed in a layer below
    ("modules", ("fastsae.*",)),
    ("model", ("fastsae.model",)),
    ("training", ("fastsae.train",)),
    ("harvesting", ("fastsae.harvest",)),
    ("evaluation", ("fastsae.evaluation",)),
    ("analysis", ("fastsae.analysis",)),
    ("pipeline", ("fastsae.pipeline", "fastsae.demo")),
    ("interfaces", ("fastsae.cli", "fastsae.__main__", "fastsae.commands", "bench", "examples")),
)
LAYER_NAMES = [name for name, _ in LAYERS]


def covers(name: str, module: str) -> bool:
    """a.b covers a.b and a.b.*; a.* covers a and its direct submodules only."""
    if name.endswith(".*"):
        base = name[:-2]
        return module == base or (module.startswith(base + ".") and module.count(".") == base.count(".") + 1)
    return module == name or module.startswith(name + ".")


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name (the longest name in LAYERS that covers it); None for anything
    outside fastsae, bench and examples."""
    matches = [(len(name), layer) for layer, names in LAYERS for name in names if covers(name, module)]
    return max(matches)[1] if matches else None


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module, or the package whose name it takes
    line: int
    package_face: bool  # inside a module-level __getattr__ of an __init__.py: the allowed lazy exception


def module_name(path: Path) -> str:
    """fastsae/train/trainer.py -> fastsae.train.trainer; kernels/adam.py -> fastsae.kernels.adam."""
    if path.is_relative_to(KERNELS):
        parts = ("fastsae", "kernels", *path.relative_to(KERNELS).with_suffix("").parts)
    else:
        parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files(*folders: Path) -> list[Path]:
    return sorted(p for folder in folders for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


MODULES = {module_name(p): p for p in source_files(PACKAGE, KERNELS)}


def resolve(base: str, name: str) -> str:
    """`from base import name`: the submodule base.name when there is one, else base."""
    return f"{base}.{name}" if f"{base}.{name}" in MODULES else base


def imports_of(path: Path, source: str | None = None, text: str | None = None) -> list[Import]:
    """Every import in a file, resolved to absolute dotted names (relative imports included)."""
    source = source or module_name(path)
    tree = ast.parse(text if text is not None else path.read_text())
    package = source if path.name == "__init__.py" else source.rpartition(".")[0]
    face = set()
    if path.name == "__init__.py":
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
                face.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            targets = [resolve(base, alias.name) for alias in node.names]
        else:
            continue
        found.extend(Import(source, t, node.lineno, id(node) in face) for t in targets)
    return found


def layer_violations(path: Path, text: str | None = None) -> list[str]:
    """The imports of a file (text: its source, when not the file's own) that reach a layer below its own."""
    bad = []
    for imp in imports_of(path, text=text):
        here, there = layer_of(imp.source), layer_of(imp.target)
        if there is not None and not imp.package_face and LAYER_NAMES.index(there) > LAYER_NAMES.index(here):
            bad.append(f"{path.relative_to(ROOT)}:{imp.line} ({here}) imports {imp.target} ({there}), a layer below")
    return bad


def files_of(layer: str) -> list[Path]:
    files = [p for p in source_files(PACKAGE, KERNELS) if layer_of(module_name(p)) == layer]
    if layer == "interfaces":
        files += source_files(ROOT / "bench", ROOT / "examples")
    return files


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def import_graph(extra: dict[str, str] | None = None) -> dict[str, set[str]]:
    """module -> the fastsae modules it imports, lazily or not; extra: {module: source text} overriding files."""
    graph = {}
    for name, path in MODULES.items():
        text = (extra or {}).get(name)
        graph[name] = {imp.target for imp in imports_of(path, name, text)
                       if imp.target in MODULES and imp.target != name}
    return graph


# ---- the tests ---------------------------------------------------------------------------------------


def test_every_file_of_the_package_has_a_layer():
    assert [m for m in MODULES if layer_of(m) is None] == []


@pytest.mark.parametrize("layer", LAYER_NAMES)
def test_a_layer_imports_only_from_the_layers_above_it(layer):
    files = files_of(layer)
    assert files, f"no file maps to layer {layer}"
    assert [bad for path in files for bad in layer_violations(path)] == []


@pytest.mark.parametrize("source,violating", [
    ("fastsae/sae.py", "from .train import Trainer"),
    ("fastsae/train/trainer.py", "def f():\n    from ..evaluation import evaluate\n"),
    ("fastsae/ops/__init__.py", "from fastsae.model import splice"),
    ("fastsae/__init__.py", "from .harvest import harvest"),
])
def test_the_layer_check_catches_a_violation(source, violating):
    """A downward import, lazy or not, is found (only a package __getattr__ is let through)."""
    path = ROOT / source
    assert layer_violations(path, path.read_text() + "\n" + violating)


def test_the_package_face_may_import_from_further_down_only_lazily():
    path = PACKAGE / "__init__.py"
    lazy = "def __getattr__(name):\n    from .evaluation import evaluate\n    return evaluate\n"
    assert all(i.package_face for i in imports_of(path, text=lazy) if i.target.startswith("fastsae.evaluation"))
    eager = "from .evaluation import evaluate\n"
    assert not any(i.package_face for i in imports_of(path, text=eager))


def test_only_the_ops_layer_reaches_the_kernels():
    for path in source_files(PACKAGE):
        if layer_of(module_name(path)) not in ("ops", "kernels"):
            assert not [i for i in imports_of(path) if layer_of(i.target) == "kernels"], path


def test_no_import_cycle_between_modules():
    assert import_cycles(import_graph()) == []


def test_the_cycle_check_catches_a_lazy_cycle():
    """fastsae.losses importing fastsae.sae inside a function closes a circle (sae imports losses)."""
    text = MODULES["fastsae.losses"].read_text() + "\n\ndef _f():\n    from .sae import SAE\n    return SAE\n"
    cycles = import_cycles(import_graph({"fastsae.losses": text}))
    assert any({"fastsae.losses", "fastsae.sae"} <= set(c) for c in cycles)


def test_import_fastsae_loads_neither_evaluation_nor_harvesting():
    code = ("import fastsae, fastsae.train, sys; "
            "assert not any(m.startswith(('fastsae.evaluation', 'fastsae.harvest')) for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
