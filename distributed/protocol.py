"""The control channel's wire format and handshake. No pickle anywhere.

A frame is
    b"USPV" | header length (u32, big endian) | payload length (u64) | header | payload
where the header is a UTF-8 JSON object with a string "type", and the payload is empty or a
safetensors blob holding the frame's tensors. Lengths are checked against limits before
anything is allocated or parsed.

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

import torch

MAGIC = b"USPV"
_PREFIX = struct.Struct(">4sIQ")
MAX_HEADER_BYTES = 1 << 20
MAX_PAYLOAD_BYTES = 32 << 30
NONCE_BYTES = 32


class ProtocolError(RuntimeError):
    """A malformed, oversized or unauthenticated frame; the connection should be dropped."""


class ConnectionClosed(ProtocolError):
    """The peer closed the connection."""


def encode_frame(header: dict, tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    from safetensors.torch import save

    if not isinstance(header.get("type"), str):
        raise ValueError("a frame header needs a string 'type'")
    payload = save(_unshared(tensors)) if tensors else b""
    head = json.dumps(header, separators=(",", ":")).encode()
    return _PREFIX.pack(MAGIC, len(head), len(payload)) + head + payload


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
    """Parse one whole frame (as received and broadcast to the ranks)."""
    if len(data) < _PREFIX.size:
        raise ProtocolError(f"frame of {len(data)} bytes is shorter than its {_PREFIX.size}-byte prefix")
    head_len, payload_len = check_prefix(data[: _PREFIX.size])
    if len(data) != _PREFIX.size + head_len + payload_len:
        raise ProtocolError("frame length does not match its prefix")
    head = data[_PREFIX.size: _PREFIX.size + head_len]
    return parse_header(head), parse_payload(data[_PREFIX.size + head_len:])


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


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    """n bytes from sock. The buffer grows as the bytes arrive (a 16-byte prefix that claims 512 MiB and
    sends nothing more costs nothing), then the chunks are joined once."""
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, _CHUNK))
        if not chunk:
            raise ConnectionClosed("connection closed by peer")
        chunks.append(chunk)
        got += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def recv_frame_bytes(sock: socket.socket, rest_timeout: float | None = None) -> bytes:
    """Read one whole frame, checking the prefix before reading the rest. With rest_timeout (a caller
    that knows bytes are waiting), every read has a deadline: each part of the frame, its prefix
    included, must arrive within rest_timeout seconds (a truncated frame is an error, not a hang)."""
    sock.settimeout(rest_timeout)
    try:
        try:
            prefix = _recv_exact(sock, _PREFIX.size)
        except socket.timeout:
            raise ProtocolError(f"truncated frame: its {_PREFIX.size}-byte prefix did not arrive within "
                                f"{rest_timeout} s") from None
        head_len, payload_len = check_prefix(prefix)
        try:
            return prefix + _recv_exact(sock, head_len + payload_len)
        except socket.timeout:
            raise ProtocolError(f"truncated frame: the rest of a {head_len + payload_len}-byte frame did not "
                                f"arrive within {rest_timeout} s") from None
    finally:
        sock.settimeout(None)


def recv_frame(sock: socket.socket) -> tuple[dict, dict[str, torch.Tensor]]:
    return decode_frame(recv_frame_bytes(sock))


def send_frame(sock: socket.socket, header: dict, tensors: dict[str, torch.Tensor] | None = None) -> None:
    sock.sendall(encode_frame(header, tensors))


def new_secret() -> str:
    return os.urandom(32).hex()


ANSWER_BYTES = 32  # an HMAC-SHA256 of the nonce


def challenge(sock: socket.socket, secret: str, timeout: float = 5.0) -> bool:
    """Listener side, blocking: True when the peer proves it knows the secret. (Rank 0 runs the same
    check without blocking its loop: worker.Worker.accept_one / answer_pending.)"""
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
