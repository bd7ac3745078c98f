"""Malformed control-channel frames, made reproducibly from a seed, by kind."""

import json
import random
import struct

import torch

from usp_video.distributed import protocol

PREFIX = struct.Struct(">4sIQ")
# kinds that keep the stream in step (rank 0 answers and keeps the connection) ...
IN_STEP = ("bad_json", "not_object", "no_type", "bad_payload", "unknown_type", "bad_fields", "bad_tensors")
# ... and kinds after which rank 0 drops the connection (the client reconnects)
DROPPING = ("bad_magic", "huge_header", "huge_payload", "tensors_for_a_type_without")


def frame(kind: str, rng: random.Random, dit: str = "/nonexistent.safetensors") -> bytes:
    """A malformed frame of that kind; dit: a real DiT file, so that some requests get as far as the
    checks of their inputs against the model's header."""
    if kind == "bad_magic":
        return bytes(rng.getrandbits(8) for _ in range(4)).replace(b"U", b"X") + PREFIX.pack(b"USPV", 2, 0)[4:] + b"{}"
    if kind == "huge_header":
        return PREFIX.pack(b"USPV", protocol.MAX_HEADER_BYTES + rng.randrange(1, 1 << 30), 0)
    if kind == "huge_payload":
        return PREFIX.pack(b"USPV", 2, protocol.MAX_PAYLOAD_BYTES + rng.randrange(1, 1 << 40))
    if kind == "tensors_for_a_type_without":  # a request type that carries no tensors, declaring some
        head = json.dumps({"type": rng.choice(["load_dit", "encode", "ping", "cancel"])}).encode()
        return PREFIX.pack(b"USPV", len(head), rng.randrange(1, 1 << 20)) + head
    if kind == "bad_json":
        head = bytes(rng.getrandbits(8) for _ in range(rng.randrange(2, 40)))
        head = head.replace(b"{", b"(")  # never valid JSON
        return PREFIX.pack(b"USPV", len(head), 0) + head
    if kind == "not_object":
        head = json.dumps(rng.choice([[1, 2], "text", 3, None, [{"type": "ping"}]])).encode().ljust(2)
        return PREFIX.pack(b"USPV", len(head), 0) + head
    if kind == "no_type":
        head = json.dumps({"typ": "ping", "n": rng.random()}).encode()
        return PREFIX.pack(b"USPV", len(head), 0) + head
    if kind == "bad_payload":
        head = b'{"type":"sample"}'
        payload = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 64)))
        return PREFIX.pack(b"USPV", len(head), len(payload)) + head + payload
    if kind == "unknown_type":
        return protocol.encode_frame({"type": "x" + str(rng.randrange(1 << 30))})
    if kind == "bad_fields":
        header = rng.choice([
            {"type": "load_dit"}, {"type": "load_dit", "paths": 5}, {"type": "load_dit", "paths": [5, None]},
            {"type": "load_dit", "paths": []}, {"type": "load_dit", "paths": ["/definitely/not/here.safetensors"]},
            {"type": "load_dit", "paths": ["x" * 5000]}, {"type": "encode", "family": "wan2.1"},
            {"type": "encode", "family": "nope", "files": {}, "prompt": "a"},
            {"type": "encode", "family": "wan2.1", "files": {"text_encoder": 3}, "prompt": "a"},
            {"type": "encode", "family": "wan2.1", "files": [], "prompt": "a"},
            {"type": "encode", "family": "hunyuan-video", "files": {"llama": "/x"}, "prompt": "a"},
            {"type": "encode", "family": "wan2.1", "files": {"text_encoder": "/x"}, "prompt": ["a"]}, {"type": "sample"},
            {"type": "sample", "experts": ["/nonexistent"], "seed": "x", "steps": 1, "cfg": 1, "shift": 1,
             "sampler": "euler"},
            {"type": "sample", "experts": "notalist", "seed": 1, "steps": 1, "cfg": 1, "shift": 1, "sampler": "euler"},
            {"type": "sample", "experts": ["/a", "/b"], "boundaries": ["x"], "seed": 1, "steps": 1, "cfg": [1, "y"],
             "shift": 1, "sampler": "euler"},
            {"type": "sample", "experts": ["/a"], "boundaries": [2.0, 0.5], "seed": 1, "steps": 1, "cfg": 1,
             "shift": 1, "sampler": "euler", "options": {"guidance": "z", "other": 1}},
            {"type": "sample", "experts": ["/a"], "seed": 1, "steps": 1, "cfg": 1, "shift": 1, "sampler": "euler",
             "options": []},
            {"type": "decode", "path": "/x"}, {"type": "decode", "path": 7}])
        return protocol.encode_frame(header)
    if kind == "bad_tensors":
        shape = rng.choice([(1, 16, 2, 2), (1, 4, 2, 2, 2), (2,), (1, 16, 2, 3, 3)])
        dtype = rng.choice([torch.float32, torch.int64, torch.uint8, torch.float16])
        latent = torch.zeros(shape, dtype=dtype)
        cond = rng.choice([torch.zeros(1, 4, 32), torch.zeros(4, 32), torch.zeros(1, 4, 32, dtype=torch.int32)])
        header = {"type": "sample", "experts": [rng.choice(["/nonexistent.safetensors", dit])], "seed": rng.randrange(10),
                  "steps": 1, "cfg": 1.0, "shift": 1.0, "sampler": "euler"}
        names = rng.choice([("positive.tokens",), ("positive.tokens", "positive.pooled"), ("positive.odd",),
                            ("positive.tokens", "negative.tokens", "negative.extra"), ("positive",)])
        extra = rng.choice([torch.zeros(()), torch.zeros(1, 16), torch.full((1, 3), float("nan"))])
        tensors = {"latent": latent, **{name: cond if name.endswith("tokens") else extra for name in names}}
        return protocol.encode_frame(header, tensors)
    raise ValueError(kind)


def truncated(rng: random.Random) -> bytes:
    """A frame whose prefix promises more bytes than follow."""
    whole = protocol.encode_frame({"type": "ping", "pad": "x" * rng.randrange(10, 100)})
    return whole[: rng.randrange(PREFIX.size + 1, len(whole))]
