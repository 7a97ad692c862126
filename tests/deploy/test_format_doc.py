"""FORMAT.md is the contract: its tables must say what the code writes. Each check reads the doc's
table and compares it with the code's own definition (layout's Parquet schemas, the keys of the
manifest `_write_manifest` builds, the built-in presets, SCHEMA_VERSION)."""
from __future__ import annotations

import ast
import re

import pyarrow as pa

from deepvis.storage import layout
from tests.conftest import ROOT

DOC = (ROOT / "FORMAT.md").read_text()
ARROW_NAMES = {"float": "float32", "double": "float64"}   # pyarrow's str() of a type -> the doc's word


def section(title: str) -> str:
    m = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ |\Z)", DOC, re.M | re.S)
    assert m, f"FORMAT.md has no section {title!r}"
    return m.group(1)


def table(title: str) -> list[list[str]]:
    """The rows (cells stripped) of the first Markdown table in a section, header and rule dropped."""
    rows = [l for l in section(title).splitlines() if l.startswith("|")]
    return [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:]]


def columns(title: str) -> dict[str, str]:
    """column name -> type, from a `| names | types | meaning |` table ('y, x | int32' = both int32)."""
    out = {}
    for names, types, *_ in table(title):
        names = [n.strip("` ") for n in names.split(",")]
        types = [t.strip() for t in types.split(",")]
        for i, n in enumerate(names):
            out[n] = types[i] if len(types) == len(names) else types[0]
    return out


def arrow_type(t: pa.DataType) -> str:
    return ARROW_NAMES.get(str(t), str(t))


def test_topk_columns_and_types():
    doc = columns("index/topk.parquet")
    code = {f.name: arrow_type(f.type) for f in layout.TOPK_SCHEMA}
    assert doc == code


def test_units_columns_and_types():
    doc = columns("index/units.parquet")
    schema = layout.units_table([], ["P"]).schema
    code = {re.sub(r"_P$", "_<preset>", f.name): arrow_type(f.type) for f in schema}
    assert doc == code


def manifest_keys_in_code() -> set[str]:
    """The top-level keys of the dict `_write_manifest` (cluster/build.py) writes."""
    tree = ast.parse((ROOT / "cluster" / "build.py").read_text())
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_write_manifest")
    d = next(n.value for n in ast.walk(fn) if isinstance(n, ast.Assign) and isinstance(n.value, ast.Dict))
    return {k.value for k in d.keys}


def test_manifest_keys():
    doc = {row[0].strip("`") for row in table("manifest.json")}
    assert doc == manifest_keys_in_code()


def test_schema_version_stated():
    assert f"(now {layout.SCHEMA_VERSION})" in section("schema_version and compatibility")
    assert "upgrade deepvis" in section("schema_version and compatibility")


def test_paper_presets_table():
    from deepvis.tasks.optimize import PRESETS
    rows = {r[0]: r[1:] for r in table("Regularized optimization (Yosinski et al. 2015)")}
    assert set(rows) == set(PRESETS)
    for name, p in PRESETS.items():
        decay, bw, be, npct, cpct, steps, lr = rows[name]
        assert (float(decay), float(bw), int(be), float(npct), float(cpct), int(steps)) == \
            (p.decay, p.blur_width, p.blur_every, p.norm_pct, p.contrib_pct, p.steps), name
        policy, value = re.match(r"(progress|constant)\D*?([\d.e]+)", lr).groups()
        assert (policy, float(value)) == (p.lr_policy, p.lr), name
