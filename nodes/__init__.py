"""ComfyUI nodes (classic V1 API): thin adapters over distributed.api.

Every module here that defines NODES ({type name: (class, display name)}) contributes its nodes, so a
model family adds its nodes with one file (e.g. wan22_nodes.py) and nothing else changes."""

import importlib
import pkgutil

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    for _name, (_cls, _display) in getattr(importlib.import_module(f".{_module}", __name__), "NODES", {}).items():
        if _name in NODE_CLASS_MAPPINGS:
            raise RuntimeError(f"two node files define the ComfyUI node {_name!r}")
        NODE_CLASS_MAPPINGS[_name] = _cls
        NODE_DISPLAY_NAME_MAPPINGS[_name] = _display
