"""Malformed control-channel frames, made reproducibly from a seed, by kind."""

import json
import random
import struct

import torch

from usp_video.distributed import protocol

PREFIX = struct.Struct(">4sIQ")
# kinds that keep the stream in step (rank 0 answers and keeps the connection) ...
IN_STEP = ("bad_json", "not_object", "no_type", "bad_payload", "deep_nesting", "huge_number", "lying_safetensors",
           "unknown_type", "bad_fields", "bad_tensors", "nonfinite")
PARSER_REFUSES = IN_STEP[:7]  # the kinds the frame parser itself refuses; the rest parse, and the ranks refuse them
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
    if kind == "deep_nesting":  # json.loads would raise RecursionError
        depth = rng.randrange(2000, 200_000)
        head = b'{"type":"ping","x":' + b"[" * depth + b"]" * depth + b"}"
        return PREFIX.pack(b"USPV", len(head), 0) + head
    if kind == "huge_number":  # an integer Python refuses to parse (over 4300 digits)
        head = b'{"type":"sample","seed":' + b"9" * rng.randrange(5000, 50_000) + b"}"
        return PREFIX.pack(b"USPV", len(head), 0) + head
    if kind == "lying_safetensors":  # a safetensors blob whose header contradicts its data
        blob = protocol.encode_frame({"type": "sample"}, {"latent": torch.zeros(1, 16, 2, 2, 2)})
        payload = blob[PREFIX.size + len(b'{"type":"sample"}'):]
        length = int.from_bytes(payload[:8], "little")
        meta = json.loads(payload[8:8 + length])
        lie = rng.choice(["shape", "offsets", "dtype"])
        if lie == "shape":
            meta["latent"]["shape"] = [1, 16, 2, 2, rng.randrange(3, 1 << 20)]
        elif lie == "offsets":
            meta["latent"]["data_offsets"] = [0, rng.randrange(1 << 20, 1 << 40)]
        else:
            meta["latent"]["dtype"] = rng.choice(["F64", "Q4", "pickle", ""])
        new = json.dumps(meta).encode()
        payload = len(new).to_bytes(8, "little") + new + payload[8 + length:]
        head = b'{"type":"sample"}'
        return PREFIX.pack(b"USPV", len(head), len(payload)) + head + payload
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
        names = rng.choice([("positive.tokens",), ("positive.tokens", "positive.pooled_output"), ("positive.odd",),
                            ("positive.tokens", "negative.tokens", "negative.extra"), ("positive",)])
        extra = rng.choice([torch.zeros(()), torch.zeros(1, 16), torch.full((1, 3), float("nan"))])
        tensors = {"latent": latent, **{name: cond if name.endswith("tokens") else extra for name in names}}
        return protocol.encode_frame(header, tensors)
    if kind == "nonfinite":  # a well-formed sample whose latent or conditioning holds inf / nan
        bad = rng.choice([float("inf"), float("-inf"), float("nan")])
        latent, cond = torch.zeros(1, 16, 2, 2, 2), torch.zeros(1, 4, 32)
        (latent if rng.random() < 0.5 else cond).view(-1)[rng.randrange(8)] = bad
        header = {"type": "sample", "experts": [dit], "seed": 1, "steps": 1, "cfg": 1.0, "shift": 1.0,
                  "sampler": "euler"}
        return protocol.encode_frame(header, {"latent": latent, "positive.tokens": cond})
    raise ValueError(kind)


def truncated(rng: random.Random) -> bytes:
    """A frame whose prefix promises more bytes than follow."""
    whole = protocol.encode_frame({"type": "ping", "pad": "x" * rng.randrange(10, 100)})
    return whole[: rng.randrange(PREFIX.size + 1, len(whole))]
