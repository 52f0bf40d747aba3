"""No name that Python can import from the repo root shadows an installed distribution's module.

`python -m pytest` and `python -m fastsae` put the repo root first on sys.path, so a top-level folder with an
`__init__.py`, or a top-level `.py` file, wins over anything installed under the same name. That is how our
old `kernels/__init__.py` hid Hugging Face's `kernels` from transformers. Folders without `__init__.py` are
namespace portions, which lose to any installed regular package of the same name; they are checked by
importing the name from the repo root in a fresh process.
"""

import importlib.machinery
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = {"fastsae"}


def root_names() -> dict[str, str]:
    """Every name `import NAME` could find in the repo root: 'package', 'module' or 'namespace'."""
    found = {}
    for entry in sorted(ROOT.iterdir()):
        if entry.is_dir() and entry.name.isidentifier():
            found[entry.name] = "package" if (entry / "__init__.py").is_file() else "namespace"
        elif entry.is_file() and entry.suffix in importlib.machinery.all_suffixes():
            name = entry.name.split(".")[0]
            if name.isidentifier():
                found[name] = "module"
    return found


def test_no_root_package_or_module_shares_a_name_with_an_installed_distribution():
    installed = importlib.metadata.packages_distributions()
    clashes = {name: installed[name] for name, kind in root_names().items()
               if kind != "namespace" and name not in OURS and name in installed}
    assert not clashes, f"repo-root names that shadow installed distributions: {clashes}"


def test_root_namespace_folders_lose_to_installed_packages():
    installed = importlib.metadata.packages_distributions()
    names = [n for n, kind in root_names().items() if kind == "namespace" and n in installed]
    code = ("import importlib.util, json, sys\n"
            "print(json.dumps({n: list(importlib.util.find_spec(n).submodule_search_locations or [])"
            " + [importlib.util.find_spec(n).origin or ''] for n in sys.argv[1:]}))")
    out = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True, check=True)
    for name, places in json.loads(out.stdout).items():
        ours = [p for p in places  # an environment inside the checkout (.venv, .venv-latest) is not the repo's
                if p and Path(p).resolve().is_relative_to(ROOT) and "site-packages" not in Path(p).parts]
        assert not ours, f"`import {name}` from the repo root finds {ours}, not {installed[name]}"


def test_the_scan_sees_what_python_imports():
    """The scan is not vacuous: it lists the repo's own top-level importables, by kind."""
    names = root_names()
    assert names["fastsae"] == "package" and names["bench"] == "package" and "tests" in names
    assert "kernels" in names
