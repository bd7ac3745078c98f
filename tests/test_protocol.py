"""The control channel: frames, limits, the handshake; no pickle."""

import json
import socket
import struct
import threading

import pytest
import torch

from usp_video.distributed import protocol


def test_frame_round_trip():
    tensors = {"latent": torch.randn(1, 16, 3, 4, 4), "ids": torch.arange(5)}
    header, out = protocol.decode_frame(protocol.encode_frame({"type": "sample", "seed": 3}, tensors))
    assert header == {"type": "sample", "seed": 3}
    for k, v in tensors.items():
        assert torch.equal(out[k], v)


@pytest.mark.parametrize("frame,message", [
    (b"XXXX" + struct.pack(">IQ", 10, 0) + b"{}" * 5, "bad magic"),
    (b"USPV" + struct.pack(">IQ", 1 << 30, 0), "header length"),
    (b"USPV" + struct.pack(">IQ", 10, 1 << 62), "payload length"),
    (b"USPV" + struct.pack(">IQ", 4, 0) + b"\xff\xfe{}", "not UTF-8 JSON"),
    (b"USPV" + struct.pack(">IQ", 2, 0) + b"[]", "JSON object"),
    (b"USPV" + struct.pack(">IQ", 13, 4) + b'{"type":"x"} ' + b"abcd", "safetensors"),
    (b"USPV" + struct.pack(">IQ", 12, 0) + b'{"type":"x"}' + b"extra", "does not match"),
    (b"USP", "shorter"),
    (b"USPV" + struct.pack(">IQ", 100_000, 0) + b"[" * 100_000, "nested too deeply"),
    (b"USPV" + struct.pack(">IQ", 5011, 0) + b'{"type": 1' + b"0" * 5000 + b"}", "value Python refuses"),
])
def test_malformed_frames_are_rejected(frame, message):
    with pytest.raises(protocol.ProtocolError, match=message):
        protocol.decode_frame(frame)


class _Exploit:
    """Unpickling this writes a file: what a pickle-reading protocol would let a frame do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickled_payload_or_header_is_never_unpickled(tmp_path, monkeypatch):
    """Frames whose payload (or header) is a pickle, a torch.save file or a safetensors blob followed by a
    pickle: each is refused or read as plain data; nothing is unpickled (pickle and torch.load are
    booby-trapped while the frames are decoded, and the exploit's marker file must not appear)."""
    import io
    import pickle

    marker = tmp_path / "pwned"
    blob = pickle.dumps(_Exploit(marker))
    saved = io.BytesIO()
    torch.save({"x": torch.ones(2)}, saved)
    good = protocol.encode_frame({"type": "sample"}, {"x": torch.ones(2)})

    def trap(*args, **kwargs):
        raise AssertionError("the protocol unpickled something")

    monkeypatch.setattr(pickle, "loads", trap)
    monkeypatch.setattr(pickle, "load", trap)
    monkeypatch.setattr(pickle, "Unpickler", trap)
    monkeypatch.setattr(torch, "load", trap)
    head = b'{"type":"sample"}'
    frames = [b"USPV" + struct.pack(">IQ", len(head), len(payload)) + head + payload
              for payload in (blob, saved.getvalue(), good[struct.calcsize(">4sIQ") + len(head):] + blob)]
    frames.append(b"USPV" + struct.pack(">IQ", len(blob), 0) + blob)  # a pickle as the header
    for frame in frames:
        try:
            header, tensors = protocol.decode_frame(frame)
        except protocol.ProtocolError:
            continue
        assert header == {"type": "sample"} and all(isinstance(t, torch.Tensor) for t in tensors.values())
    assert not marker.exists()


def handshake(secret_server, secret_client):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    result = {}

    def serve():
        conn, _ = server.accept()
        result["ok"] = protocol.challenge(conn, secret_server)
        conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    client = socket.create_connection(server.getsockname())
    protocol.answer_challenge(client, secret_client)
    thread.join(10)
    client.close()
    server.close()
    return result["ok"]


def test_handshake_accepts_the_secret_and_rejects_others():
    secret = protocol.new_secret()
    assert handshake(secret, secret)
    assert not handshake(secret, protocol.new_secret())


def test_one_tensor_under_two_names_travels():
    """The same CONDITIONING wired to the positive and the negative input is one tensor twice."""
    cond = torch.randn(1, 4, 8)
    header, tensors = protocol.decode_frame(protocol.encode_frame({"type": "x"}, {"a": cond, "b": cond, "c": cond[0]}))
    assert torch.equal(tensors["a"], cond) and torch.equal(tensors["b"], cond) and torch.equal(tensors["c"], cond[0])


def test_a_prefix_claiming_a_huge_frame_costs_only_what_arrives():
    """A 16-byte prefix that claims 512 MiB, 10 bytes, then nothing: rank 0 must not reserve the 512 MiB."""
    import socket
    import tracemalloc

    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"USPV" + struct.pack(">IQ", 10, 512 << 20) + b'{"type":"x"')
        theirs.shutdown(socket.SHUT_WR)
        tracemalloc.start()
        try:
            with pytest.raises(protocol.ConnectionClosed):
                protocol.read_frame(ours, rest_timeout=2.0)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 16 << 20, f"peak {peak / 2**20:.0f} MiB while receiving 26 bytes"


def test_every_read_of_a_frame_has_a_deadline():
    """Half a prefix, then silence: the reader gives up after rest_timeout instead of waiting forever."""
    import socket
    import threading

    ours, theirs = socket.socketpair()
    outcome = []

    def read():
        try:
            protocol.read_frame(ours, rest_timeout=0.5)
        except protocol.ProtocolError as exc:
            outcome.append(str(exc))

    with ours, theirs:
        theirs.sendall(b"USPV" + struct.pack(">I", 10))  # 8 of the prefix's 16 bytes
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(5)
        assert not reader.is_alive(), "the read of a truncated prefix never returned"
    assert outcome and "prefix did not arrive within 0.5 s" in outcome[0]


@pytest.mark.parametrize("kind, payload, message", [
    ("load", 1024, r"a 'load' request carries no tensors, but its frame declares 1024 bytes"),
    ("cancel", 1, r"a 'cancel' request carries no tensors"),
    ("sample", (4 << 30) + 1, r"a 'sample' request carries at most 4294967296 bytes of tensors"),
])
def test_a_request_payload_over_its_types_limit_is_refused_before_it_is_read(kind, payload, message):
    """Only the prefix and the header are sent: the refusal must come from the header, at once, not from
    a read of the payload (which would wait for bytes that never come)."""
    a, b = socket.socketpair()
    try:
        head = json.dumps({"type": kind}).encode()
        a.sendall(b"USPV" + struct.pack(">IQ", len(head), payload) + head)
        with pytest.raises(protocol.ProtocolError, match=message):
            protocol.read_frame(b, 5.0, protocol.REQUEST_PAYLOAD_LIMITS)
    finally:
        a.close()
        b.close()


def test_a_request_within_its_limit_is_read_whole():
    a, b = socket.socketpair()
    try:
        frame = protocol.encode_frame({"type": "sample"}, {"latent": torch.ones(2, 3)})
        a.sendall(frame)
        assert protocol.read_frame(b, 5.0, protocol.REQUEST_PAYLOAD_LIMITS).to_bytes() == frame
        a.sendall(protocol.encode_frame({"type": "load"}))
        header, tensors = protocol.read_frame(b, 5.0, protocol.REQUEST_PAYLOAD_LIMITS).decode()
        assert header == {"type": "load"} and tensors == {}
    finally:
        a.close()
        b.close()


def test_a_sample_request_round_trips_and_its_header_keeps_its_wire_order():
    """The wire form is generated from the dataclass fields; the header's keys (and so its bytes) stay as
    they were when to_frame was written out by hand."""
    from usp_video.distributed.requests import SampleRequest

    request = SampleRequest(experts=["/a", "/b"], boundaries=[0.9], positive={"tokens": torch.randn(1, 4, 8)},
                            negative=torch.randn(1, 4, 8), latent=torch.randn(1, 16, 2, 4, 4), seed=3, steps=4,
                            cfg=[5.0, 4.0], shift=8.0, loras=[[["/l.safetensors", 0.5]], []],
                            noise_mask=torch.ones(1, 1, 2, 4, 4), fault={"kind": "raise"})
    header, tensors = protocol.decode_frame(protocol.encode_frame(*request.to_frame()))
    assert list(header) == ["type", "experts", "boundaries", "seed", "steps", "cfg", "shift", "sampler", "denoise",
                            "options", "preview", "family", "keep", "start_step", "end_step", "add_noise",
                            "leftover_noise", "cache", "loras", "max_step_s", "fault"]
    assert sorted(tensors) == ["latent", "negative.tokens", "noise_mask", "positive.tokens"]
    back = SampleRequest.from_frame(header, tensors)
    assert_same_request(back, request)  # every field, so that a field the wire drops cannot pass
    plain = SampleRequest(experts=["/a"], positive=torch.zeros(1), negative=None, latent=torch.zeros(1), seed=1,
                          steps=1, cfg=1.0, shift=1.0)
    assert "fault" not in plain.to_frame()[0] and sorted(plain.to_frame()[1]) == ["latent", "positive.tokens"]
    assert_same_request(SampleRequest.from_frame(*protocol.decode_frame(protocol.encode_frame(*plain.to_frame()))),
                        plain)


def assert_same_request(back, request) -> None:
    """Every dataclass field of two requests equal: tensors exactly, conditionings key by key, the rest by ==."""
    import dataclasses

    def same(a, b) -> bool:
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        return a == b

    for field in dataclasses.fields(request):
        assert same(getattr(back, field.name), getattr(request, field.name)), field.name


@pytest.mark.parametrize("header, tensors, message", [
    ({"type": "sample"}, {}, "request tensor 'positive.tokens' is missing"),
    ({"type": "sample", "experts": ["/a"], "seed": "1"}, {"positive.tokens": torch.zeros(1), "latent": torch.zeros(1)},
     "request field 'seed' must be int, got str"),
    ({"type": "sample", "experts": ["/a"], "seed": 1, "steps": True},
     {"positive.tokens": torch.zeros(1), "latent": torch.zeros(1)},
     "request field 'steps' must be int, got bool"),
    ({"type": "sample", "experts": ["/a"], "seed": 1, "steps": 1, "cfg": 1, "shift": 1},
     {"positive.tokens": torch.zeros(1), "latent": torch.zeros(1)},
     "request field 'sampler' must be str, got NoneType"),
    ({"type": "load_dit", "paths": []}, {}, "request field 'paths' must list at least one DiT file"),
    ({"type": "load_dit", "paths": ["/a"], "family": 3}, {}, "request field 'family' must be str or NoneType, got int"),
    ({"type": "encode", "family": "f", "files": {"t": 3}}, {}, "request field 'files' must map text-encoder inputs"),
    ({"type": "decode", "path": "/v"}, {}, "request tensor 'latent' is missing"),
])
def test_a_request_field_of_the_wrong_kind_is_named(header, tensors, message):
    from usp_video.distributed.requests import REQUESTS

    with pytest.raises(ValueError, match=message):
        REQUESTS[header["type"]].from_frame(header, tensors)
