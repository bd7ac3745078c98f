"""ComfyUI's V3 node schema (comfy_api.latest's `io`, as ComfyUI's own nodes use it) for every node of the pack.

Inside ComfyUI the real `io` is used. Outside it (the CLI's workers, tests and tools import the pack too) the
nodes run on standin.py, a small copy of the same API's shape, so that their code is the same everywhere.

Fields that newer ComfyUI releases added to io.Schema and io.Input (search_aliases, advanced...) are set
through `schema()` and `advanced()`, only where the running ComfyUI has them: ComfyUI 0.3.64's Schema raises on
a field it does not know."""

from __future__ import annotations

import dataclasses
import inspect

try:  # inside ComfyUI
    from comfy_api.latest import ComfyExtension, io
    IS_STANDIN = False
except ImportError:  # outside ComfyUI
    from .standin import ComfyExtension, io
    IS_STANDIN = True

__all__ = ["ComfyExtension", "io", "schema", "advanced", "HIDDEN_ALL", "CATEGORY"]

CATEGORY = "USP video"

# The hidden inputs a node that reads the graph (a native MODEL's chain) asks for.
HIDDEN_ALL = [io.Hidden.unique_id, io.Hidden.prompt, io.Hidden.dynprompt]

_SCHEMA_FIELDS = {f.name for f in dataclasses.fields(io.Schema)}


def schema(**fields) -> "io.Schema":
    """io.Schema(**fields), less the fields this ComfyUI's Schema does not have (newer releases' additions,
    such as search_aliases): those are extras, never needed for a node to work."""
    input_ids = {inp.id for inp in fields.get("inputs") or []}
    for output in fields.get("outputs") or []:
        if output.id is not None and output.display_name is None:  # 0.3.64 shows an output without one by its type
            output.display_name = output.id
        if output.id in input_ids:  # V3 ids are unique across inputs and outputs: USP LoRA's model output keeps
            output.id = None        # its name on the page (display_name) and gets ComfyUI's own id
    return io.Schema(**{name: value for name, value in fields.items() if name in _SCHEMA_FIELDS})


def _takes(input_class, parameter: str) -> bool:
    try:
        return parameter in inspect.signature(input_class.__init__).parameters
    except (TypeError, ValueError):
        return False


def advanced(input_class, *args, **kwargs):
    """input_class(*args, **kwargs) marked advanced (newer frontends fold such inputs away) where this ComfyUI's
    inputs take the flag; the same input without it elsewhere."""
    if _takes(input_class, "advanced"):
        kwargs["advanced"] = True
    return input_class(*args, **kwargs)
