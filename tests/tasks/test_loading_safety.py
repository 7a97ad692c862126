"""Keep (issue #17): loading never unpickles. Every torch.load in the project passes weights_only=True
and no np.load passes allow_pickle=True (NumPy's default is False), whoever adds the next call."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("cluster", "tasks", "storage", "atlas_viewer", "deepvis", "bench")


def _calls(name: str):
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                        and node.func.attr == "load" and isinstance(node.func.value, ast.Name) \
                        and node.func.value.id == name:
                    yield f.relative_to(ROOT), node


def _kw(node: ast.Call, key: str):
    return next((k.value for k in node.keywords if k.arg == key), None)


def test_torch_load_is_weights_only():
    calls = list(_calls("torch"))
    assert calls, "no torch.load found: the scan is broken"
    for f, node in calls:
        v = _kw(node, "weights_only")
        assert isinstance(v, ast.Constant) and v.value is True, f"{f}:{node.lineno} torch.load without weights_only=True"


def test_np_load_never_allows_pickle():
    calls = list(_calls("np"))
    assert calls, "no np.load found: the scan is broken"
    for f, node in calls:
        v = _kw(node, "allow_pickle")
        assert v is None or (isinstance(v, ast.Constant) and v.value is False), f"{f}:{node.lineno} allow_pickle"
