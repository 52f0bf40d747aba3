"""The op table in fastsae/ops/__init__.py's docstring cannot rot: every name and file it cites exists, each
variants function compiles its row's kernel, and every op the backends offer and every reference has a row."""

import importlib
import inspect
import re

import pytest

import fastsae.ops
from fastsae.kernels import _variants
from fastsae.ops import reference, torch_backend, triton_backend

from helpers import ROOT, TESTS

DASH = "—"
# The package a column's relative names live in (the tests column names files under tests/).
PACKAGES = {"kernel": "fastsae.kernels", "variants": "fastsae.kernels._variants", "autograd": "fastsae.ops",
            "torch path": "fastsae.ops", "code": "fastsae.ops", "float64 reference": "fastsae.ops"}


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _tables(doc: str) -> list[list[dict[str, str]]]:
    """Each markdown table in doc as its rows, {column header: cell}."""
    lines, tables, i = doc.splitlines(), [], 0
    while i < len(lines) - 1:
        if lines[i].startswith("|") and lines[i + 1].startswith("|-"):
            header, rows, i = _cells(lines[i]), [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(dict(zip(header, _cells(lines[i]), strict=True)))
                i += 1
            tables.append(rows)
        else:
            i += 1
    return tables


TABLES = _tables(fastsae.ops.__doc__)
NAMES = sorted({(column, name) for table in TABLES for row in table for column, cell in row.items()
                if column not in ("op", "sharded op") for name in cell.split(", ") if name != DASH})


def _resolve(column: str, name: str):
    if column == "variants":
        return getattr(_variants, name)
    module, attr = name.rsplit(".", 1)
    return getattr(importlib.import_module(f"{PACKAGES[column]}.{module}"), attr)


def _column(header: str) -> set[str]:
    return {row[header] for table in TABLES for row in table if header in row}


def test_the_docstring_holds_the_three_tables():
    assert len(TABLES) == 3 and all(TABLES)
    assert [row["op"] for row in TABLES[0]] == [row["op"] for row in TABLES[1]]  # the same ops, in one order


@pytest.mark.parametrize("column,name", NAMES, ids=[f"{c}:{n}" for c, n in NAMES])
def test_every_name_the_table_cites_exists(column, name):
    if column == "tests":
        assert len(list(TESTS.rglob(f"{name}.py"))) == 1, f"no single tests/**/{name}.py"
    else:
        assert column in PACKAGES, f"a column the test does not know: {column!r}"
        _resolve(column, name)  # raises if the module or the name is gone


def test_every_path_the_docstring_names_exists():
    paths = set(re.findall(r"\b(?:tests|kernels|fastsae)/[\w/]+\.py\b", fastsae.ops.__doc__))
    assert paths
    for path in paths:
        assert (ROOT / path).is_file(), path


@pytest.mark.parametrize("row", [r for r in TABLES[0] if r["variants"] != DASH], ids=lambda r: r["op"])
def test_the_variants_compile_the_kernel_of_their_row(row):
    module = f"fastsae.kernels.{row['kernel'].split('.')[0]}"
    assert module in {v.module for v in _resolve("variants", row["variants"])()}


def _functions(module) -> set[str]:
    return {n for n, f in vars(module).items()
            if inspect.isfunction(f) and f.__module__ == module.__name__ and not n.startswith("_")}


def test_every_backend_op_and_every_reference_has_a_row():
    contract = _functions(reference) & _functions(torch_backend) & _functions(triton_backend)
    assert contract == {"encode_topk", "encode_threshold", "encode_batchtopk", "encode_jumprelu", "decode", "adam_step",
                        "resample_rows"}
    assert contract <= {row["op"] for row in TABLES[0]}
    assert {f"reference.{n}" for n in _functions(reference)} <= _column("float64 reference")
