"""The part of ComfyUI's V3 node API (comfy_api.latest: io, ComfyExtension) that the pack's nodes use, for running
them where ComfyUI is absent: the CLI's workers import the pack, and tests and tools call the nodes directly.

It has the same names and calling conventions as ComfyUI 0.3.64's io (a node class's define_schema() and
execute(**inputs) -> NodeOutput; hidden inputs on `cls.hidden` of a class clone made by PREPARE_CLASS_CLONE),
and nothing more: no validation beyond what the nodes rely on, no page, no cache. Inside ComfyUI the real module
is used (nodes/v3.py); the tests that start the real ComfyUI check that every schema builds there too."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from types import SimpleNamespace
from typing import Any


class Input:
    """One input of a node: its id and options (widget settings, tooltip, optional)."""

    io_type = "*"

    def __init__(self, id: str, display_name: str | None = None, optional: bool = False, tooltip: str | None = None,
                 **options: Any):
        self.id, self.display_name, self.optional, self.tooltip = id, display_name, optional, tooltip
        self.default = None
        for name, value in options.items():  # default, min, max, options (a combo's), multiline... as attributes
            setattr(self, name, value)


class Output:
    io_type = "*"

    def __init__(self, id: str | None = None, display_name: str | None = None, tooltip: str | None = None,
                 is_output_list: bool = False):
        self.id, self.display_name, self.tooltip, self.is_output_list = id, display_name, tooltip, is_output_list


def _comfy_type(io_type: str, widget: bool = False) -> type:
    """A type with nested Input and Output classes bound to io_type, as ComfyUI's @comfytype makes them."""
    input_class = type("Input", (Input,), {"io_type": io_type, "widget": widget})
    output_class = type("Output", (Output,), {"io_type": io_type})
    return type(io_type, (), {"io_type": io_type, "Input": input_class, "Output": output_class})


class _MultiTypeInput(Input):
    def __init__(self, id: str, types: list, **kwargs: Any):
        super().__init__(id, **kwargs)
        self.io_type = ",".join(t.io_type for t in types)


class _Io(SimpleNamespace):
    """The `io` namespace: the types, Schema, Hidden, NodeOutput and ComfyNode."""


class Hidden(str, Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"
    dynprompt = "DYNPROMPT"


@dataclass
class Schema:
    node_id: str
    display_name: str | None = None
    category: str = "sd"
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    hidden: list = field(default_factory=list)
    description: str = ""
    is_input_list: bool = False
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    is_api_node: bool = False
    not_idempotent: bool = False
    enable_expand: bool = False


class NodeOutput:
    def __init__(self, *args: Any, ui: Any = None, expand: Any = None, block_execution: str | None = None):
        self.args, self.ui, self.expand, self.block_execution = args, ui, expand, block_execution

    @property
    def result(self):
        return self.args if self.args else None

    def __getitem__(self, index: int) -> Any:
        return self.args[index]


class _HiddenHolder(SimpleNamespace):
    def __getattr__(self, name: str) -> None:  # an input not asked for is None, as in ComfyUI
        return None


class ComfyNode:
    """A V3 node: define_schema() and execute(**inputs) classmethods."""

    hidden = _HiddenHolder()

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs: Any) -> NodeOutput:
        raise NotImplementedError

    @classmethod
    def GET_SCHEMA(cls) -> Schema:
        schema = cls.define_schema()
        ids = [i.id for i in schema.inputs] + [o.id for o in schema.outputs if o.id is not None]
        if len(set(ids)) != len(ids):  # as ComfyUI's Schema.validate
            raise ValueError(f"{schema.node_id}: ids must be unique between inputs and outputs: {ids}")
        return schema

    @classmethod
    def PREPARE_CLASS_CLONE(cls, hidden_inputs: dict) -> type:
        """A subclass whose `hidden` holds these hidden inputs ({"UNIQUE_ID": ..., "PROMPT": ...})."""
        values = {member.name: hidden_inputs.get(member.value) for member in Hidden}
        return type(cls.__name__, (cls,), {"hidden": _HiddenHolder(**values)})

    @classmethod
    def EXECUTE_NORMALIZED(cls, **kwargs: Any) -> NodeOutput:
        out = cls.execute(**kwargs)
        return out if isinstance(out, NodeOutput) else NodeOutput(*(out or ()))


class ComfyExtension:
    async def on_load(self) -> None:
        return None

    async def get_node_list(self) -> list[type[ComfyNode]]:
        raise NotImplementedError


io = _Io(
    Input=Input, Output=Output, Schema=Schema, Hidden=Hidden, NodeOutput=NodeOutput, ComfyNode=ComfyNode,
    Custom=_comfy_type, MultiType=SimpleNamespace(Input=_MultiTypeInput),
    Int=_comfy_type("INT", widget=True), Float=_comfy_type("FLOAT", widget=True),
    String=_comfy_type("STRING", widget=True), Boolean=_comfy_type("BOOLEAN", widget=True),
    Combo=_comfy_type("COMBO", widget=True), Latent=_comfy_type("LATENT"), Conditioning=_comfy_type("CONDITIONING"),
    Image=_comfy_type("IMAGE"), Mask=_comfy_type("MASK"), Model=_comfy_type("MODEL"),
    ClipVisionOutput=_comfy_type("CLIP_VISION_OUTPUT"),
    AnyType=_comfy_type("*"),
)
