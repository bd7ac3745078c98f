"""ComfyUI nodes on the V3 schema: thin adapters over distributed.api.

Every module here that defines NODES (a list of io.ComfyNode classes) contributes them; ComfyUI gets them from
`comfy_entrypoint` (the package's __init__.py hands it on). NODE_CLASSES ({node id: class}) is the same set by id,
for tools and tests."""

from __future__ import annotations

import importlib
import pkgutil

from .v3 import ComfyExtension

NODE_LIST = []
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    NODE_LIST += getattr(importlib.import_module(f".{_module}", __name__), "NODES", [])

NODE_CLASSES = {}
for _cls in NODE_LIST:
    _id = _cls.GET_SCHEMA().node_id
    if _id in NODE_CLASSES:
        raise RuntimeError(f"two node files define the ComfyUI node {_id!r}")
    NODE_CLASSES[_id] = _cls


class UspVideoExtension(ComfyExtension):
    async def get_node_list(self) -> list:
        return list(NODE_LIST)


async def comfy_entrypoint() -> UspVideoExtension:
    from ..distributed.registry import stop_groups_on_sigterm

    stop_groups_on_sigterm()  # a `kill` of ComfyUI stops the groups and removes their run folders too
    return UspVideoExtension()
