"""semiseg is layered: a module imports only modules of a lower layer, at the top of the file, never inside a function.

Every `semiseg/**/*.py` is parsed (not imported) and each import of a semiseg module is checked against `LAYERS`.
"""
import ast
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1] / "semiseg"

# module -> layer; a module may import only modules of a strictly lower layer ("methods" covers semiseg.methods.*)
LAYERS = {
    "semiseg": 0, "semiseg._modidx": 0,
    "semiseg.core": 0,
    "semiseg.transforms": 1,
    "semiseg.data": 2,
    "semiseg.models": 3, "semiseg.losses": 3, "semiseg.metrics": 3,
    "semiseg.augment": 4, "semiseg.pseudo": 4,
    "semiseg.method": 5,
    "semiseg.config": 6,
    "semiseg.runs": 7,
    "semiseg.check": 8,
    "semiseg.methods": 9,
    "semiseg.train": 10,
    "semiseg.bench": 11, "semiseg.sweep": 11, "semiseg.pretrain": 11,
    "semiseg.papers": 12,
    "semiseg.figures": 13,
    "semiseg.report": 14, "semiseg.viewer": 14,
    "semiseg.demo": 15,
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def layer(mod: str) -> int:
    if mod.startswith("semiseg.methods"):
        return LAYERS["semiseg.methods"]
    if mod not in LAYERS:
        raise KeyError(f"{mod} has no layer: add it to LAYERS in tests/test_layers.py")
    return LAYERS[mod]


def imported_modules(node: ast.AST, importer: str, is_package: bool) -> list[str]:
    "The semiseg modules an import statement imports (relative imports resolved)."
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "semiseg"]
    if node.level:
        base = importer.split(".")[: len(importer.split(".")) - node.level + is_package]
        base = ".".join(base + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base.split(".")[0] != "semiseg":
        return []
    subs = [f"{base}.{a.name}" for a in node.names
            if (ROOT.parent / Path(*f"{base}.{a.name}".split("."))).with_suffix(".py").is_file()]
    return subs or [base]


def violations_in(tree: ast.AST, importer: str, is_package: bool = False) -> set:
    "(importer, imported, 'layer' | 'local') of every import in `tree` against the layers or inside a function."
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
             for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    found = set()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        for mod in imported_modules(node, importer, is_package):
            if id(node) in local:
                found.add((importer, mod, "local"))
            if mod != "semiseg" and layer(mod) >= layer(importer):
                found.add((importer, mod, "layer"))
    return found


def violations() -> set:
    "Every violation in semiseg/."
    return {v for path in sorted(ROOT.rglob("*.py"))
            for v in violations_in(ast.parse(path.read_text(), str(path)), module_name(path), path.name == "__init__.py")}


def test_every_module_has_a_layer():
    for path in ROOT.rglob("*.py"):
        layer(module_name(path))


def test_imports_follow_the_layers():
    "No module imports one of its own or a higher layer, and no function imports a semiseg module."
    found = sorted(violations())
    assert not found, "imports against the layers (importer, imported, kind):\n" + "\n".join(map(str, found))


@pytest.mark.parametrize("src, expected", [
    ("from semiseg.core import x", {("semiseg.fake", "semiseg.core", "layer")}),
    ("def f():\n    from semiseg.core import x", {("semiseg.fake", "semiseg.core", "local"),
                                                 ("semiseg.fake", "semiseg.core", "layer")}),
])
def test_the_checker_sees_imports(src, expected, monkeypatch):
    "The checker itself: a top-level and a function-local import (in a module of layer 0, so both break the layers)."
    monkeypatch.setitem(LAYERS, "semiseg.fake", 0)
    assert violations_in(ast.parse(src), "semiseg.fake") == expected
