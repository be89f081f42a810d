"""The package's layering (README, Layout): a module imports only from its own layer or the
layers below it, and no stage imports another stage. Read from the source with ``ast``, so a
lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import toolkit

PACKAGE = Path(toolkit.__file__).parent
LAYERS = {
    1: {"errors", "files", "datasets", "preprocess", "folder", "manifest", "parity", "environment", "onnx_io", "progress"},
    2: {"recipes", "models", "data", "fastdata", "engine", "checkpoint", "runtime", "catalog", "oip", "loop", "quantize", "qat", "model_card", "report"},
    3: {"train", "evaluate", "prune", "export", "verify", "bench", "predict", "serve"},
    4: {"cli", "__main__"},
}
LAYER_OF = {name: layer for layer, names in LAYERS.items() for name in names}
# demo/app.py (installed as toolkit.demo) is the serve stage's Gradio layout: part of that stage
SAME_STAGE = {"demo": "serve"}
DEMO = PACKAGE.parent / "demo" / "app.py"


def _module_of(path: Path) -> str:
    """The top-level module a file belongs to: toolkit/export/to_onnx.py -> export."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> set[str]:
    """The toolkit top-level modules a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] == "toolkit":
                if len(parts) > 1:
                    found.add(SAME_STAGE.get(parts[1], parts[1]))
                else:  # from toolkit import data as data_mod
                    found.update(alias.name for alias in node.names if alias.name in LAYER_OF)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "toolkit" and len(parts) > 1:
                    found.add(SAME_STAGE.get(parts[1], parts[1]))
    return found


def test_every_module_has_a_layer():
    modules = {_module_of(p) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE}
    assert modules <= set(LAYER_OF), f"modules without a layer: {sorted(modules - set(LAYER_OF))}"


def test_modules_import_only_their_layer_or_below_and_stages_never_each_other():
    crossings = []
    for path in [*PACKAGE.rglob("*.py"), DEMO]:
        if path.parent == PACKAGE and path.name == "__init__.py":
            continue
        here = "serve" if path == DEMO else _module_of(path)
        for imported in _imports(path) - {here, "__version__"}:
            layer = LAYER_OF.get(imported)
            assert layer is not None, f"{path.name} imports toolkit.{imported}, which has no layer"
            if layer > LAYER_OF[here] or (layer == 3 and LAYER_OF[here] == 3):
                crossings.append(f"{path.name} in {here} ({LAYER_OF[here]}) imports {imported} ({layer})")
    assert not crossings, crossings


def test_the_checker_sees_a_crossing(tmp_path):
    """The check above can fail: a lazy import of one stage by another is found."""
    stage = tmp_path / "stage.py"
    stage.write_text("def f():\n    from toolkit.train import train\n    from toolkit import verify\n")
    assert _imports(stage) == {"train", "verify"}
