"""The rank loop of the sidecar group: every rank runs Worker.serve until the group shuts down.

worker_entry.py starts it on each rank (under torch.distributed.run, see launcher.py). Rank 0 also
holds the ControlServer (control_server.py), the socket to the ComfyUI process: it reads one request
at a time and parses it; the Worker broadcasts the request's raw parts to every rank over a gloo
control group, the other ranks parse them, all ranks run it, and rank 0 replies. While sampling,
rank 0 sends a "started" frame once the models are loaded and a progress frame per step, and looks
for a cancel frame before every DiT block and after every step; the stop decision is broadcast on
the control group (one int: 0.12 ms measured between 2 gloo ranks on a loaded 2-core machine, against
the tens to hundreds of milliseconds of a real model's block) so that every rank stops before the same block, or after the
same step, and no collective of the model is left half-entered on some ranks. Only rank 0 reads the
socket; a flag the other ranks polled without a collective would not tell them where to stop (they can
be a block apart, or a whole pass with cfg-parallel halves), and stopping at different blocks would
leave NCCL's collectives unmatched. A block that itself outlasts the client's grace time is ended by
the client tearing the group down (client.py).

Failure policy:
  - ValueError (bad input, wrong checkpoint) raised on any rank is a request error: the ranks
    agree on it, rank 0 replies with the message, and the group stays up with its models.
  - Anything else (a crash, a collective timeout) is fatal: the rank writes rank<N>.error.json
    into the run directory and exits (worker_entry.py); torchrun then stops every rank and the
    client reports the earliest error, naming its rank (postmortem.py).
"""

from __future__ import annotations

import ctypes
import json
import os
import time
import warnings
from typing import Callable

import torch
import torch.distributed as dist

from . import protocol
from .control_server import ControlServer
from .engine import Engine, SamplingInterrupted
from .requests import REQUESTS, DecodeRequest, EncodeRequest, EncodeVideoRequest, LoadRequest, SampleRequest
from .validation import check_latent

Reply = tuple[dict, dict | None]  # rank 0's reply to a request: (header, tensors)


class Worker:
    """One rank's request loop. `server` is rank 0's ControlServer, None on the other ranks."""

    def __init__(self, engine: Engine, control_group, server: ControlServer | None, allow_faults: bool):
        self.engine, self.control_group, self.server = engine, control_group, server
        self.rank, self.world_size = engine.rank, engine.world_size
        self.allow_faults = allow_faults
        # the requests a rank runs, by type; "ping" and "cancel" carry no request (see dispatch)
        self.handlers: dict[type, Callable[..., Reply | None]] = {
            LoadRequest: self.load, EncodeRequest: self.encode, DecodeRequest: self.decode,
            EncodeVideoRequest: self.encode_video, SampleRequest: self.sample}

    # -- talking to the client (through rank 0's server) -------------------------------------

    def reply(self, header: dict, tensors: dict | None = None) -> None:
        if self.server is not None:
            self.server.reply(header, tensors)

    def cancel_requested(self) -> bool:
        """Rank 0, between blocks and steps: has a cancel frame arrived?"""
        return self.server is not None and self.server.cancel_requested()

    def next_request(self) -> tuple[dict, dict]:
        """The next request on every rank: rank 0 reads and parses it, then broadcasts its raw parts,
        which the other ranks parse."""
        if self.server is not None:
            frame, header, tensors = self.server.next_valid_request()
            self.broadcast_frame(frame)
            return header, tensors
        return self.broadcast_frame(None).decode()

    # -- collectives on the control group ----------------------------------------------------

    def broadcast_bytes(self, data: bytes | None, src: int = 0) -> bytes:
        """data from rank src on every rank. The sender's bytes are broadcast in place and come back
        as they are; a receiver copies its buffer into bytes once (what safetensors parses)."""
        if self.world_size == 1:
            return data
        size = torch.tensor([len(data) if self.rank == src else 0], dtype=torch.int64)
        dist.broadcast(size, src, group=self.control_group)
        if not int(size):
            return b""
        if self.rank == src:
            with warnings.catch_warnings():  # a read-only buffer: gloo only reads the sender's tensor
                warnings.simplefilter("ignore", UserWarning)
                buf = torch.frombuffer(data, dtype=torch.uint8)
        else:
            buf = torch.empty(int(size), dtype=torch.uint8)
        dist.broadcast(buf, src, group=self.control_group)
        return data if self.rank == src else bytes(buf.numpy())

    def broadcast_frame(self, frame: protocol.Frame | None) -> protocol.Frame:
        """Rank 0's frame on every rank, its header and payload sent apart (never joined: a copy)."""
        if self.world_size == 1:
            return frame
        head = self.broadcast_bytes(frame.head if frame is not None else None)
        return protocol.Frame(head, self.broadcast_bytes(frame.payload if frame is not None else None))

    def agree(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        t = torch.tensor([int(flag)])
        dist.broadcast(t, 0, group=self.control_group)
        return bool(t)

    def first_error(self, error: dict | None) -> dict | None:
        """Every rank learns the lowest-ranked request error, if any rank had one."""
        if self.world_size == 1:
            return error
        flags = torch.zeros(self.world_size, dtype=torch.int64)
        flags[self.rank] = int(error is not None)
        dist.all_reduce(flags, group=self.control_group)
        if not flags.any():
            return None
        src = int(flags.nonzero()[0])
        data = json.dumps(error).encode() if self.rank == src else None
        return json.loads(self.broadcast_bytes(data, src))

    # -- the loop ----------------------------------------------------------------------------

    def serve(self) -> None:
        while True:
            header, tensors = self.next_request()
            if header["type"] == "shutdown":
                self.reply({"type": "ok"})
                return
            if header["type"] == "heartbeat":
                continue
            answer, error = None, None
            try:
                answer = self.dispatch(header, tensors)
            except ValueError as exc:
                error = {"type": "error", "error_type": type(exc).__name__, "message": str(exc), "rank": self.rank}
            # the reply goes out only once every rank is known to have succeeded
            error = self.first_error(error)
            if error is not None:
                self.reply(error)
            elif answer is not None:
                self.reply(*answer)
            del answer, tensors
            release_freed_memory()

    def dispatch(self, header: dict, tensors: dict) -> Reply | None:
        """Run one request on this rank; returns rank 0's reply (header, tensors), if any."""
        kind = header["type"]
        fault = header.get("fault") if self.allow_faults else None
        if isinstance(fault, dict) and fault.get("kind") == "value_error" and fault.get("rank") == self.rank:
            raise ValueError(f"injected request error on rank {self.rank}")
        if kind == "ping":
            return self.ping()
        if kind == "cancel":
            return None  # a cancel that arrived after its request had finished
        if kind not in REQUESTS:
            raise ValueError(f"unknown request type {kind!r}")
        request = REQUESTS[kind].from_frame(header, tensors)
        return self.handlers[type(request)](request)

    # -- the requests ------------------------------------------------------------------------

    def ping(self) -> Reply:
        engine = self.engine
        return {"type": "ok", "world_size": self.world_size, "load_counts": dict(engine.load_counts),
                "device": str(engine.device), "dtype": str(engine.dtype).removeprefix("torch.")}, None

    def load(self, request: LoadRequest) -> Reply:
        return {"type": "ok", **self.engine.dit_info(request.paths, request.family, request.keep)}, None

    def encode(self, request: EncodeRequest) -> Reply | None:
        if not self.engine.encode_on_all_ranks(request) and self.rank != 0:
            return None
        cond = self.engine.encode(request)
        return ({"type": "ok"}, cond) if self.rank == 0 else None

    def decode(self, request: DecodeRequest) -> Reply | None:
        check_latent(request.latent, "latent")
        if self.rank != 0 and not self.engine.vae_split:
            return None
        # with vae_split every rank decodes a part
        frames = self.engine.decode(request.path, request.latent, self.progress_reporter())
        return ({"type": "ok"}, {"frames": frames}) if self.rank == 0 else None

    def encode_video(self, request: EncodeVideoRequest) -> Reply | None:
        if self.rank != 0 and not self.engine.vae_split:
            return None
        # with vae_split every rank encodes some rows (the engine checks the frames on every rank)
        latent = self.engine.encode_video(request.path, request.frames, self.progress_reporter())
        return ({"type": "ok"}, {"latent": latent}) if self.rank == 0 else None

    def progress_reporter(self) -> Callable[[int, int], None]:
        """A VAE call's progress callback: a progress frame to the client (rank 0 only)."""
        started = time.monotonic()

        def on_progress(done: int, total: int) -> None:
            self.reply({"type": "progress", "step": done, "total": total, "elapsed": time.monotonic() - started})

        return on_progress

    def sample(self, request: SampleRequest) -> tuple[dict, dict | None]:
        fault = request.fault if self.allow_faults else None
        start = time.monotonic()  # reset when the first step begins: loading is not step time
        began = start

        def on_start() -> None:
            nonlocal start
            start = time.monotonic()
            self.reply({"type": "started"})  # the models are loaded: the first step runs

        def on_step(i: int, total: int, denoised: torch.Tensor, skipped: int | None) -> bool:
            if fault and fault.get("rank") == self.rank and fault.get("step") == i:
                inject(fault["kind"])
            if self.rank == 0:
                # a preview needs only the first frame of the first video: [1, C, 1, h, w]
                tensors = {"x0": denoised[:1, :, :1]} if request.preview else None
                progress = {"type": "progress", "step": i + 1, "total": total, "elapsed": time.monotonic() - start}
                if skipped is not None:
                    progress["skipped"] = skipped
                self.reply(progress, tensors)
            return self.agree(self.rank == 0 and self.cancel_requested())

        def on_block() -> bool:
            return self.agree(self.rank == 0 and self.cancel_requested())

        try:
            result = self.engine.sample(request, on_step, on_start, on_block)
        except SamplingInterrupted as stop:
            return {"type": "interrupted", "step": stop.step + 1, "mid_step": stop.mid_step}, None
        reply = {"type": "ok", "seconds": time.monotonic() - began, "sampling_seconds": time.monotonic() - start,
                 "ulysses": result.sp.ulysses_degree, "ring": result.sp.ring_degree,
                 "cfg_parallel": result.sp.cfg_degree}
        if result.step_cache is not None:
            reply["cache"] = result.step_cache.report()
        if result.lora_warnings:
            reply["warnings"] = result.lora_warnings
        reply["load_counts"] = result.load_counts  # how often each kind of file was read: "dit", "lora"
        return reply, {"latent": result.latent}


def release_freed_memory() -> None:
    """Give memory freed by the last request back to the system before the group goes idle.

    Without this a long-lived rank keeps the high-water mark of every request: glibc's malloc
    holds freed heap pages (its mmap threshold grows after large frees), and CUDA's caching
    allocator holds freed blocks that ComfyUI's own models may need between prompts."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


_LIBC = _load_glibc()


def inject(kind: str) -> None:
    """Test-only faults, honoured only when the group was started with faults allowed."""
    if kind == "raise":
        raise RuntimeError("injected fault")
    if kind == "exit":
        os._exit(3)
    if kind == "hang":
        while True:
            time.sleep(1)
