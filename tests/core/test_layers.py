"""The package's layering, shown by its folders (README, Layout): a module imports only from its
own folder or the folders of lower layers; the four stages never import each other; core/ and
inference/ never import torch (so `pip install '.[serve]'` runs without it). Read from the
source with ``ast``, so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import toolkit

PACKAGE = Path(toolkit.__file__).parent
# folder -> layer; the stages (train, export, check, serve) share the top layer below the CLI
LAYERS = {"core": 1, "inference": 2, "models": 3, "data": 4, "train": 5, "export": 5, "check": 5, "serve": 5, "cli": 6}
STAGE_LAYER = 5
TORCH_FREE = {"core", "inference"}
SAME_FOLDER = {"__main__": "cli"}
# the one torch import below models/: environment reports torch's version and GPU when torch is
# installed and already the caller's (never on the serving path, which has no torch installed)
# and ExecuTorch's runner: its Python runtime takes torch tensors (loaded only for .pte artifacts, offered only
# where executorch and torch are installed)
TORCH_ALLOWED = {"core/environment.py", "inference/executorch_runner.py"}


def _folder_of(path: Path) -> str:
    """The folder (role) a file belongs to: toolkit/train/loop.py -> train, toolkit/cli.py -> cli."""
    rel = path.relative_to(PACKAGE)
    name = rel.parts[0] if len(rel.parts) > 1 else rel.stem
    return SAME_FOLDER.get(name, name)


def _imports(path: Path) -> tuple[set[str], bool]:
    """The toolkit folders a file imports, anywhere in it, and whether it imports torch."""
    found, torch = set(), False
    for node in ast.walk(ast.parse(path.read_text())):
        modules = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module]
            if node.module == "toolkit":  # from toolkit import __version__
                modules = [f"toolkit.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        for module in modules:
            parts = module.split(".")
            if parts[0] == "toolkit" and len(parts) > 1 and parts[1] != "__version__":
                found.add(SAME_FOLDER.get(parts[1], parts[1]))
            torch = torch or parts[0] in ("torch", "torchvision")
    return found, torch


def _sources() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py"]


def test_every_module_is_in_a_role_folder():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__", "cli"))
    assert not loose, f"modules outside a role folder: {loose}"
    assert {_folder_of(p) for p in _sources()} <= set(LAYERS)


def test_folders_import_only_their_own_or_lower_layers_and_stages_never_each_other():
    crossings, torch_users = [], []
    for path in _sources():
        here = _folder_of(path)
        imported, uses_torch = _imports(path)
        for folder in imported - {here}:
            layer = LAYERS.get(folder)
            assert layer is not None, f"{path} imports toolkit.{folder}, which is no role folder"
            if layer > LAYERS[here] or (layer == STAGE_LAYER and LAYERS[here] == STAGE_LAYER):
                crossings.append(f"{path.relative_to(PACKAGE.parent)} ({here}) imports {folder}")
        rel = path.relative_to(PACKAGE).as_posix()
        if here in TORCH_FREE and rel not in TORCH_ALLOWED and (uses_torch or imported - TORCH_FREE):
            torch_users.append(rel)
    assert not crossings, crossings
    assert not torch_users, f"torch-free folders importing torch or a torch folder: {torch_users}"


def test_the_checker_sees_a_crossing_and_torch(tmp_path):
    """The checks above can fail: a lazy import of one stage by another, and a lazy torch import, are found."""
    stage = tmp_path / "stage.py"
    stage.write_text("def f():\n    from toolkit.train.run import train\n    from toolkit.check import verify\n    import torch.nn\n")
    assert _imports(stage) == ({"train", "check"}, True)
