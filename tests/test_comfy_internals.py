"""The ComfyUI internals the pack uses (nodes/comfy_internals.py): every one still exists in the ComfyUI that
runs the tests (a failure names the symbol), and nodes/ imports no ComfyUI module the list does not name."""

import ast
import os
from pathlib import Path

import pytest

from usp_video.nodes import comfy_internals

NODES = Path(comfy_internals.__file__).parent
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
# every top-level module of a ComfyUI checkout that a pack could import
COMFY_MODULES = ("comfy", "comfy_api", "comfy_execution", "comfy_extras", "folder_paths", "server", "execution",
                 "nodes", "latent_preview", "node_helpers", "app", "utils", "protocol", "comfy_config")


def _imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.smoke
def test_nodes_import_only_listed_comfyui_modules():
    unlisted = {f"{path.name}: {module}" for path in NODES.glob("*.py") for module in _imported_modules(path)
                if module in COMFY_MODULES and module not in comfy_internals.MODULES}
    assert unlisted == set(), "import of a ComfyUI module not listed in nodes/comfy_internals.py"


def _top_level_names(source: Path) -> set[str]:
    """The names a module defines at its top level (classes, functions, assignments, imports)."""
    names = set()
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


@pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set: no ComfyUI to check against")
def test_every_listed_internal_exists_in_comfyui():
    """Read from the checkout's sources, not imported (server and model_management need a started ComfyUI)."""
    root = Path(COMFYUI_DIR)
    gone = []
    for module, attribute, *_ in comfy_internals.INTERNALS:
        base = root.joinpath(*module.split("."))
        source = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if attribute == "__path__":
            found = base.is_dir()
        else:
            found = source.is_file() and attribute.split(".")[0] in _top_level_names(source)
        if not found:
            gone.append(f"{module}.{attribute}")
    assert gone == [], f"ComfyUI internals the pack uses are gone from {root}: {', '.join(gone)}"
