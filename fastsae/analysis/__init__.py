"""Analysis: what researchers do with a trained dictionary, a subpackage per task: ``features`` (read them),
``interventions`` (edit them inside the model), ``compare`` (two dictionaries, or two sites across an MLP) and
``autointerp`` (explain and score them with a language model). Nothing below this layer imports it.

Each subpackage's front (the few names a researcher uses, and the ``run_<verb>`` its command calls) is imported
from the subpackage, e.g. ``from fastsae.analysis.features import run_features``; a front name is imported when
first used (`lazy_front`), so importing a subpackage, or one module of it, costs only that module.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_front(package: str, front: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The module `__getattr__` and `__dir__` (PEP 562) of a subpackage whose front names are imported when
    first used: front maps each name to the module of the package that defines it."""

    def __getattr__(name: str) -> object:
        if name not in front:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{front[name]}"), name)
        setattr(sys.modules[package], name, value)  # found once; later uses skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *front})

    return __getattr__, __dir__
