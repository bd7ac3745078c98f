"""A request's wire form, generated from its dataclass fields: requests.py declares, this module carries.

A request (requests.py) is a keyword-only dataclass whose `type` field names it on the wire. Every
other field says where it travels by how it is declared:

    seed: int                            a header field: JSON, checked against its annotation
    sampler: str = header(required=True) a header field with options (see `header`)
    latent: torch.Tensor = tensor()      a named tensor of the payload, sent as float32
    positive: Cond = cond()              a conditioning, its tensors sent as "positive.tokens", ...

WireRequest.to_frame writes the header in field order, after "type"; from_frame checks each field
and raises a ValueError naming it: a field of the wrong type ("request field 'seed' must be int, got
str"), a missing tensor ("request tensor 'latent' is missing"). A field with a default may be left out
of a frame. The annotation gives the JSON types a header field accepts: float takes int too, X | None
takes null, list[...] and dict[...] take any list and object (their items are the request's checks).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Callable, Union

import torch

Cond = dict[str, torch.Tensor]

_HEADER, _TENSOR, _COND = "header", "tensor", "cond"


def header(*, default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING,
           required: bool = False, encode: Callable[[Any], Any] | None = None,
           check: Callable[[Any], None] | None = None, checked: bool = True) -> Any:
    """A header field with options: required (a frame must carry it, although the dataclass has a
    default), encode (the value's JSON form, instead of a shallow copy), check (more checks of a wire
    value once its type is right; raises ValueError), checked=False (taken as it comes, left out of
    the header when None: the test-only fault field)."""
    meta = {"wire": _HEADER, "required": required, "encode": encode, "check": check, "checked": checked}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def tensor(*, optional: bool = False) -> Any:
    """A named tensor of the payload (float32 on the wire); an optional one defaults to None."""
    return dataclasses.field(default=None if optional else dataclasses.MISSING, metadata={"wire": _TENSOR})


def cond(*, optional: bool = False) -> Any:
    """A conditioning: a dict of tensors, sent under "<field>.<key>"; an optional one defaults to None."""
    return dataclasses.field(default=None if optional else dataclasses.MISSING, metadata={"wire": _COND})


def cond_tensors(prefix: str, cond: Cond | None) -> dict[str, torch.Tensor]:
    """{"tokens": t, "pooled_output": p} -> {"positive.tokens": t, "positive.pooled_output": p} (float32)."""
    return {} if cond is None else {f"{prefix}.{k}": v.float() for k, v in cond.items()}


def cond_from(prefix: str, tensors: dict) -> Cond | None:
    cond = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    return cond or None


class WireRequest:
    """The to_frame / from_frame of a request dataclass (a base of every request in requests.py)."""

    type: str

    def to_frame(self) -> tuple[dict, dict]:
        """(header, tensors) for protocol.send_frame."""
        head, tensors = {"type": self.type}, {}
        for f, kind in _wire_fields(type(self)):
            value = getattr(self, f.name)
            if kind == _COND:
                tensors.update(cond_tensors(f.name, value))
            elif kind == _TENSOR:
                if value is not None:
                    tensors[f.name] = value.float()
            elif f.metadata.get("checked", True) or value is not None:
                head[f.name] = (f.metadata.get("encode") or _copy)(value)
        return head, tensors

    @classmethod
    def from_frame(cls, header: dict, tensors: dict) -> "WireRequest":
        """The request a frame carries; a ValueError naming the first field that is wrong, in field order."""
        values = {}
        for f, kind in _wire_fields(cls):
            if kind == _COND:
                values[f.name] = _cond_field(f, tensors)
            elif kind == _TENSOR:
                values[f.name] = _tensor(tensors, f.name) if _required(f) else tensors.get(f.name)
            else:
                values[f.name] = _header_field(cls, f, header)
        return cls(**values)


def _wire_fields(cls: type) -> list[tuple[dataclasses.Field, str]]:
    return [(f, f.metadata.get("wire", _HEADER)) for f in dataclasses.fields(cls) if f.init]


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else dict(value) if isinstance(value, dict) else value


def _cond_field(f: dataclasses.Field, tensors: dict) -> Cond | None:
    value = cond_from(f.name, tensors)
    if value is None and _required(f):
        raise ValueError(f"request tensor '{f.name}.tokens' is missing")
    return value


def _tensor(tensors: dict, name: str) -> torch.Tensor:
    value = tensors.get(name)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"request tensor {name!r} is missing")
    return value


def _header_field(cls: type, f: dataclasses.Field, header: dict) -> Any:
    if not f.metadata.get("checked", True):
        return header.get(f.name)
    if f.name not in header and not _required(f) and not f.metadata.get("required"):
        return f.default_factory() if f.default is dataclasses.MISSING else f.default
    value = _checked(header, f.name, _json_kinds(_type_hints(cls)[f.name]))
    if f.metadata.get("check"):
        f.metadata["check"](value)
    return value


def _checked(header: dict, name: str, kinds: tuple[type, ...]) -> Any:
    """A field of a request header, of one of these types, or a ValueError naming it."""
    value = header.get(name)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ValueError(f"request field {name!r} must be {names}, got {type(value).__name__}")
    return value


def _json_kinds(annotation: Any) -> tuple[type, ...]:
    """The Python types of the JSON values a field of this annotation accepts."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return sum((_json_kinds(a) for a in typing.get_args(annotation)), ())
    if annotation is float:
        return (int, float)
    return (typing.get_origin(annotation) or annotation,)
