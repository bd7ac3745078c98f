"""The control channel's wire format and handshake. No pickle anywhere.

A frame is
    b"USPV" | header length (u32, big endian) | payload length (u64) | header | payload
where the header is a UTF-8 JSON object with a string "type", and the payload is empty or a
safetensors blob holding the frame's tensors. Lengths are checked against limits before
anything is allocated or parsed. A frame read from a socket is a Frame (header bytes, payload
bytes): the worker broadcasts those two parts to the other ranks as they are, and each rank
parses them once (Frame.decode).

The client (client.py) and rank 0 (control_server.py) speak it; requests.py says what a
request's header and tensors hold.

Handshake: the listener (rank 0) sends a 32-byte random nonce; the connecting client answers
HMAC-SHA256(secret, nonce). A wrong answer closes the connection before any frame is read.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import struct
from typing import NamedTuple

import torch

MAGIC = b"USPV"
_PREFIX = struct.Struct(">4sIQ")
MAX_HEADER_BYTES = 1 << 20
MAX_PAYLOAD_BYTES = 32 << 30
# The tensors a request frame of each type may carry, checked from its header before its payload is read;
# requests of other types (load, encode, cancel, shutdown) carry none. A sample carries a latent and its
# conditionings, a decode a latent: 4 GiB holds a float32 1080p x 257-frame latent (135 MB) many times over,
# with batches and long conditionings. An encode_video carries float32 frames: 16 GiB holds 257 frames at
# 1920x1088 (6.4 GB) twice over. Replies (rank 0 -> the client) keep MAX_PAYLOAD_BYTES: decoded video.
REQUEST_PAYLOAD_LIMITS = {"sample": 4 << 30, "decode": 4 << 30, "encode_video": 16 << 30}
NONCE_BYTES = 32


class ProtocolError(RuntimeError):
    """A malformed, oversized or unauthenticated frame; the connection should be dropped."""


class ConnectionClosed(ProtocolError):
    """The peer closed the connection."""


class Frame(NamedTuple):
    """One frame's two variable parts, as read from a socket or made by make_frame (the prefix holds
    nothing else but their lengths). Kept apart so that the payload, which can be gigabytes, is never
    copied into or sliced out of a whole frame on the way."""

    head: bytes  # the UTF-8 JSON header
    payload: bytes  # a safetensors blob, or b"" for no tensors

    def decode(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """The header and tensors; a ProtocolError when either part is malformed."""
        return parse_header(self.head), parse_payload(self.payload)

    def prefix(self) -> bytes:
        return _PREFIX.pack(MAGIC, len(self.head), len(self.payload))

    def to_bytes(self) -> bytes:
        return self.prefix() + self.head + self.payload


def make_frame(header: dict, tensors: dict[str, torch.Tensor] | None = None) -> Frame:
    from safetensors.torch import save

    if not isinstance(header.get("type"), str):
        raise ValueError("a frame header needs a string 'type'")
    payload = save(_unshared(tensors)) if tensors else b""
    return Frame(json.dumps(header, separators=(",", ":")).encode(), payload)


def encode_frame(header: dict, tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    """The whole frame as one bytes object (tests and fuzzers build frames byte by byte from it)."""
    return make_frame(header, tensors).to_bytes()


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, none sharing memory with another: safetensors refuses shared tensors,
    and the same CONDITIONING wired to both sampler inputs is one tensor under two names."""
    out, seen = {}, set()
    for name, value in tensors.items():
        value = value.detach().contiguous().cpu()
        if value.numel() and value.untyped_storage().data_ptr() in seen:
            value = value.clone()
        if value.numel():
            seen.add(value.untyped_storage().data_ptr())
        out[name] = value
    return out


def decode_frame(data: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    """Parse one whole frame given as bytes (a frame read from a socket is a Frame: Frame.decode)."""
    if len(data) < _PREFIX.size:
        raise ProtocolError(f"frame of {len(data)} bytes is shorter than its {_PREFIX.size}-byte prefix")
    head_len, payload_len = check_prefix(data[: _PREFIX.size])
    if len(data) != _PREFIX.size + head_len + payload_len:
        raise ProtocolError("frame length does not match its prefix")
    return Frame(data[_PREFIX.size: _PREFIX.size + head_len], data[_PREFIX.size + head_len:]).decode()


def check_prefix(prefix: bytes) -> tuple[int, int]:
    magic, head_len, payload_len = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise ProtocolError("bad magic: not a usp-video frame")
    if not 2 <= head_len <= MAX_HEADER_BYTES:
        raise ProtocolError(f"header length {head_len} outside 2..{MAX_HEADER_BYTES}")
    if payload_len > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"payload length {payload_len} over the {MAX_PAYLOAD_BYTES}-byte limit")
    return head_len, payload_len


def parse_header(head: bytes) -> dict:
    try:
        header = json.loads(head.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"header is not UTF-8 JSON: {exc}") from None
    except RecursionError:  # e.g. 100,000 nested brackets
        raise ProtocolError("header JSON is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ProtocolError(f"header JSON has a value Python refuses: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise ProtocolError("header must be a JSON object with a string 'type'")
    return header


def parse_payload(payload: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    if not payload:
        return {}
    try:
        return load(payload)
    except Exception as exc:  # safetensors raises several types for a bad blob
        raise ProtocolError(f"payload is not a valid safetensors blob: {exc}") from None


_CHUNK = 1 << 20  # bytes read at a time: memory grows with what has arrived, not with what a prefix claims


def _recv_chunks(sock: socket.socket, n: int) -> list[bytes]:
    """n bytes from sock, as the chunks they arrived in: memory grows as the bytes arrive (a 16-byte
    prefix that claims 512 MiB and sends nothing more costs nothing)."""
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, _CHUNK))
        if not chunk:
            raise ConnectionClosed("connection closed by peer")
        chunks.append(chunk)
        got += len(chunk)
    return chunks


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = _recv_chunks(sock, n)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def read_frame(sock: socket.socket, rest_timeout: float | None = None,
               payload_limits: dict[str, int] | None = None) -> Frame:
    """Read one whole frame, checking the prefix before reading the header, and with payload_limits
    ({frame type: bytes}, REQUEST_PAYLOAD_LIMITS for requests; other types: none) the header before reading
    the payload (a frame refused so is left unread: the caller drops the connection). A header that is
    malformed is left for Frame.decode to name, when the frame has no payload. With rest_timeout (a caller
    that knows bytes are waiting), every read has a deadline: each part of the frame, its prefix included,
    must arrive within rest_timeout seconds (a truncated frame is an error, not a hang). The payload's
    chunks are joined once, at the end, into the bytes that safetensors parses."""
    sock.settimeout(rest_timeout)
    try:
        try:
            prefix = _recv_exact(sock, _PREFIX.size)
        except socket.timeout:
            raise ProtocolError(f"truncated frame: its {_PREFIX.size}-byte prefix did not arrive within "
                                f"{rest_timeout} s") from None
        head_len, payload_len = check_prefix(prefix)
        try:
            head = _recv_exact(sock, head_len)
            if payload_limits is not None and payload_len:
                _check_payload_limit(head, payload_len, payload_limits)
            return Frame(head, _recv_exact(sock, payload_len) if payload_len else b"")
        except socket.timeout:
            raise ProtocolError(f"truncated frame: the rest of a {head_len + payload_len}-byte frame did not "
                                f"arrive within {rest_timeout} s") from None
    finally:
        sock.settimeout(None)


def _check_payload_limit(head: bytes, payload_len: int, payload_limits: dict[str, int]) -> None:
    try:
        kind = parse_header(head)["type"]
    except ProtocolError:  # a bad header with tensors: its payload is not read
        kind = "malformed"
    limit = payload_limits.get(kind, 0)
    if payload_len > limit:
        allowed = f"at most {limit} bytes of tensors" if limit else "no tensors"
        raise ProtocolError(f"a {kind!r} request carries {allowed}, but its frame declares {payload_len} bytes")


def recv_frame(sock: socket.socket) -> tuple[dict, dict[str, torch.Tensor]]:
    return read_frame(sock).decode()


def send_frame(sock: socket.socket, header: dict, tensors: dict[str, torch.Tensor] | None = None) -> None:
    send(sock, make_frame(header, tensors))


def send(sock: socket.socket, frame: Frame) -> None:
    """Send a frame without joining its payload to the rest (a copy of up to gigabytes)."""
    if len(frame.payload) < _CHUNK:
        sock.sendall(frame.to_bytes())
    else:
        sock.sendall(frame.prefix() + frame.head)
        sock.sendall(frame.payload)


def new_secret() -> str:
    return os.urandom(32).hex()


ANSWER_BYTES = 32  # an HMAC-SHA256 of the nonce


def challenge(sock: socket.socket, secret: str, timeout: float = 5.0) -> bool:
    """Listener side, blocking: True when the peer proves it knows the secret. (Rank 0 runs the same
    check without blocking its loop: control_server.ControlServer.accept_one / answer_pending.)"""
    nonce = os.urandom(NONCE_BYTES)
    sock.settimeout(timeout)
    try:
        sock.sendall(nonce)
        answer = _recv_exact(sock, ANSWER_BYTES)
    except (OSError, ConnectionClosed):
        return False
    finally:
        sock.settimeout(None)
    return answer_is_right(secret, nonce, answer)


def answer_is_right(secret: str, nonce: bytes, answer: bytes) -> bool:
    expected = hmac.new(bytes.fromhex(secret), nonce, hashlib.sha256).digest()
    return hmac.compare_digest(answer, expected)


def answer_challenge(sock: socket.socket, secret: str, timeout: float = 10.0) -> None:
    """Client side of the handshake."""
    sock.settimeout(timeout)
    try:
        nonce = _recv_exact(sock, NONCE_BYTES)
        sock.sendall(hmac.new(bytes.fromhex(secret), nonce, hashlib.sha256).digest())
    finally:
        sock.settimeout(None)
