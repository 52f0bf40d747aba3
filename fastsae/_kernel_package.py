"""Where `fastsae.kernels` comes from.

The Triton kernels sit in the repo's top-level `kernels/` folder, one file per kernel family, and a wheel
installs them as `fastsae.kernels` (pyproject's package-dir). The folder has no `__init__.py` on purpose:
Hugging Face's `kernels` package owns the top-level name `kernels`, and `transformers` imports it whenever it
loads a model. A regular package of ours would shadow it for every process started from the repo root
(`python -m pytest`, `python -m fastsae`), where the root is first on sys.path; a namespace folder loses to
any installed package of that name (tests/test_import_names.py checks every top-level name).

A namespace folder mapped to a subpackage is something setuptools' editable finder cannot resolve, so in a
source checkout (editable or not) this module makes `fastsae.kernels` a package whose path is that folder.
An installed wheel has `fastsae/kernels/` beside this file, and nothing is done.
"""

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def register() -> None:
    """Make `fastsae.kernels` importable from the top-level `kernels/` folder of a source checkout."""
    if "fastsae.kernels" in sys.modules or (_HERE / "kernels").is_dir():
        return
    source = _HERE.parent / "kernels"
    if not source.is_dir():
        return
    spec = importlib.machinery.ModuleSpec("fastsae.kernels", None, is_package=True)
    spec.submodule_search_locations = [str(source)]
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastsae.kernels"] = module
    sys.modules["fastsae"].kernels = module  # what the import system does for a submodule it loads itself


register()
