"""The rank loop of the sidecar group, started by torch.distributed.run (see client.py).

Rank 0 listens on loopback for the ComfyUI process (authenticated, see protocol.py), reads one
request at a time and broadcasts it to every rank over a gloo control group; all ranks run it;
rank 0 replies. While sampling, rank 0 sends a progress frame per step and looks for a cancel
frame; the stop decision is broadcast so that every rank stops after the same step.

Failure policy:
  - ValueError (bad input, wrong checkpoint) raised on any rank is a request error: the ranks
    agree on it, rank 0 replies with the message, and the group stays up with its models.
  - Anything else (a crash, a collective timeout) is fatal: the rank writes rank<N>.error.json
    into the run directory and exits; torchrun then stops every rank and the client reports
    the earliest error, naming its rank.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import select
import signal
import socket
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from . import protocol
from .config import GroupConfig
from .engine import Engine, SamplingInterrupted
from .parallel.teardown import exit_rank
from .requests import REQUESTS, DecodeRequest, EncodeRequest, EncodeVideoRequest, LoadRequest, SampleRequest
from .validation import check_latent

SECRET_ENV = "USP_VIDEO_SECRET"
HANDSHAKE_S = 5.0  # a connection must answer the challenge within this, or it is closed


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this rank when its parent (torchrun's agent) dies."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


class Worker:
    def __init__(self, engine: Engine, control_group, run_dir: Path, allow_faults: bool, heartbeat_s: float,
                 reconnect_s: float = 120.0, frame_timeout: float = 30.0):
        self.engine, self.control_group, self.run_dir = engine, control_group, run_dir
        self.heartbeat_s, self.reconnect_s, self.frame_timeout = heartbeat_s, reconnect_s, frame_timeout
        self.disconnected_at = time.monotonic()
        self.rank, self.world_size = engine.rank, engine.world_size
        self.allow_faults = allow_faults
        self.conn: socket.socket | None = None
        self.listener: socket.socket | None = None
        self.client_gone = False
        # connections still answering the challenge: socket -> (nonce, deadline, answer so far)
        self.handshakes: dict[socket.socket, tuple[bytes, float, bytes]] = {}

    # -- control channel (rank 0) ------------------------------------------------------------

    def listen(self) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        port_file = self.run_dir / "control.port"
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(str(self.listener.getsockname()[1]))
        tmp.replace(port_file)

    def accept_one(self) -> None:
        """Rank 0: take a pending connection and send it the challenge. Its answer is read by the loop as
        it arrives (answer_pending), so a connection that never answers cannot hold up requests or
        heartbeats; it is closed at its deadline (HANDSHAKE_S)."""
        conn, _ = self.listener.accept()
        nonce = os.urandom(protocol.NONCE_BYTES)
        try:
            conn.setblocking(False)
            conn.send(nonce)  # 32 bytes into an empty socket buffer: sent at once
        except OSError:
            conn.close()
            return
        self.handshakes[conn] = (nonce, time.monotonic() + HANDSHAKE_S, b"")

    def answer_pending(self, conn: socket.socket) -> None:
        """Rank 0: read what a connection has sent of its answer. One that proves it knows the group's
        secret becomes the client connection (replacing a previous one: the client reconnected); a
        wrong answer, or a closed connection, is closed before anything else it sent is read."""
        nonce, deadline, answer = self.handshakes[conn]
        try:
            data = conn.recv(protocol.ANSWER_BYTES - len(answer))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data and len(answer + data) < protocol.ANSWER_BYTES:
            self.handshakes[conn] = (nonce, deadline, answer + data)
            return
        del self.handshakes[conn]
        if data and protocol.answer_is_right(os.environ[SECRET_ENV], nonce, answer + data):
            conn.setblocking(True)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.conn is not None:
                self.conn.close()
            self.conn, self.client_gone = conn, False
        else:
            conn.close()

    def close_late_handshakes(self) -> None:
        now = time.monotonic()
        for conn in [c for c, (_, deadline, _) in self.handshakes.items() if deadline <= now]:
            del self.handshakes[conn]
            conn.close()

    def next_request(self) -> bytes:
        """Rank 0: the next frame from the client. While there is none, a heartbeat frame every
        heartbeat_s (so that idle ranks never sit in a collective past its timeout); a shutdown
        frame once the client has gone, or when no client has (re)connected for reconnect_s.
        A frame with a bad prefix or a truncated one is answered with an error and the
        connection is dropped; the client may reconnect."""
        beat_at = time.monotonic() + self.heartbeat_s
        while True:
            self.close_late_handshakes()
            now = time.monotonic()
            if now >= beat_at:
                if self.conn is None and now - self.disconnected_at > self.reconnect_s:
                    return protocol.encode_frame({"type": "shutdown"})
                return protocol.encode_frame({"type": "heartbeat"})
            wake = min([beat_at] + [deadline for _, deadline, _ in self.handshakes.values()])
            watched = [self.listener, *self.handshakes] + ([self.conn] if self.conn is not None else [])
            ready = select.select(watched, [], [], max(wake - now, 0.0))[0]
            if self.listener in ready:
                self.accept_one()
            client = self.conn
            for conn in [c for c in ready if c in self.handshakes]:
                self.answer_pending(conn)
            # a connection that has just answered becomes the client: its request is read on the next round
            if self.conn is None or self.conn is not client or self.conn not in ready:
                continue
            try:
                return protocol.recv_frame_bytes(self.conn, self.frame_timeout, protocol.REQUEST_PAYLOAD_LIMITS)
            except (protocol.ConnectionClosed, ConnectionError):
                self.client_gone = True
                return protocol.encode_frame({"type": "shutdown"})
            except (protocol.ProtocolError, OSError) as exc:
                self.reply({"type": "error", "error_type": "ProtocolError", "message": str(exc), "rank": 0})
                self.conn.close()
                self.conn, self.disconnected_at = None, time.monotonic()

    def reply(self, header: dict, tensors: dict | None = None) -> None:
        if self.rank != 0 or self.client_gone or self.conn is None:
            return
        try:
            protocol.send_frame(self.conn, header, tensors)
        except OSError:
            self.client_gone = True

    def cancel_requested(self) -> bool:
        """Rank 0, between steps: has a cancel frame arrived?"""
        cancel = False
        while not self.client_gone and self.conn is not None and select.select([self.conn], [], [], 0)[0]:
            try:  # bytes are waiting: the whole frame must follow within frame_timeout
                header, _ = protocol.decode_frame(protocol.recv_frame_bytes(self.conn, self.frame_timeout,
                                                                            protocol.REQUEST_PAYLOAD_LIMITS))
            except (protocol.ProtocolError, protocol.ConnectionClosed, OSError):
                self.client_gone = True
                return True
            if header.get("type") != "cancel":
                print(f"usp-video rank 0: ignored a {header.get('type')!r} frame that arrived while sampling",
                      file=sys.stderr, flush=True)
            cancel = cancel or header.get("type") == "cancel"
        return cancel or self.client_gone

    # -- collectives on the control group ----------------------------------------------------

    def broadcast_bytes(self, data: bytes | None, src: int = 0) -> bytes:
        if self.world_size == 1:
            return data
        size = torch.tensor([len(data) if self.rank == src else 0], dtype=torch.int64)
        dist.broadcast(size, src, group=self.control_group)
        buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.rank == src
               else torch.empty(int(size), dtype=torch.uint8))
        dist.broadcast(buf, src, group=self.control_group)
        return buf.numpy().tobytes()

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

    def next_valid_request(self) -> bytes:
        """Rank 0: the next frame that parses; a malformed one is answered here and never
        reaches the other ranks."""
        while True:
            frame = self.next_request()
            try:
                protocol.decode_frame(frame)
                return frame
            except protocol.ProtocolError as exc:
                self.reply({"type": "error", "error_type": "ProtocolError", "message": str(exc), "rank": 0})

    def serve(self) -> None:
        if self.rank == 0:
            self.listen()
        while True:
            frame = self.broadcast_bytes(self.next_valid_request() if self.rank == 0 else None)
            header, tensors = protocol.decode_frame(frame)
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

    def dispatch(self, header: dict, tensors: dict) -> tuple[dict, dict | None] | None:
        """Run one request on this rank; returns rank 0's reply (header, tensors), if any."""
        kind, engine = header["type"], self.engine
        fault = header.get("fault") if self.allow_faults else None
        if isinstance(fault, dict) and fault.get("kind") == "value_error" and fault.get("rank") == self.rank:
            raise ValueError(f"injected request error on rank {self.rank}")
        if kind == "ping":
            return {"type": "ok", "world_size": self.world_size, "load_counts": dict(engine.load_counts),
                    "device": str(engine.device), "dtype": str(engine.dtype).removeprefix("torch.")}, None
        if kind == "cancel":
            return None  # a cancel that arrived after its request had finished
        if kind not in REQUESTS:
            raise ValueError(f"unknown request type {kind!r}")
        request = REQUESTS[kind].from_frame(header, tensors)
        if isinstance(request, LoadRequest):
            return {"type": "ok", **engine.dit_info(request.paths, request.family)}, None
        if isinstance(request, EncodeRequest):
            if not engine.encode_on_all_ranks(request) and self.rank != 0:
                return None
            cond = engine.encode(request)
            return ({"type": "ok"}, cond) if self.rank == 0 else None
        if isinstance(request, DecodeRequest):
            check_latent(request.latent, "latent")
            if self.rank != 0 and not engine.vae_split:
                return None
            started = time.monotonic()

            def on_progress(done: int, total: int) -> None:  # rank 0 only
                self.reply({"type": "progress", "step": done, "total": total, "elapsed": time.monotonic() - started})

            # with vae_split every rank decodes a part
            frames = engine.decode(request.path, request.latent, on_progress)
            return ({"type": "ok"}, {"frames": frames}) if self.rank == 0 else None
        if isinstance(request, EncodeVideoRequest):
            if self.rank != 0 and not engine.vae_split:
                return None
            started = time.monotonic()

            def on_encoded(done: int, total: int) -> None:  # rank 0 only
                self.reply({"type": "progress", "step": done, "total": total, "elapsed": time.monotonic() - started})

            # with vae_split every rank encodes some rows (the engine checks the frames on every rank)
            latent = engine.encode_video(request.path, request.frames, on_encoded)
            return ({"type": "ok"}, {"latent": latent}) if self.rank == 0 else None
        return self.sample(request)

    def sample(self, request: SampleRequest) -> tuple[dict, dict | None]:
        fault = request.fault if self.allow_faults else None
        start = time.monotonic()  # reset when the first step begins: loading is not step time
        began = start

        def on_start() -> None:
            nonlocal start
            start = time.monotonic()

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

        try:
            result = self.engine.sample(request, on_step, on_start)
        except SamplingInterrupted as stop:
            return {"type": "interrupted", "step": stop.step + 1}, None
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


def write_error(run_dir: Path, rank: int, exc: BaseException) -> None:
    report = {"rank": rank, "time": time.time(), "error_type": type(exc).__name__, "message": str(exc),
              "traceback": traceback.format_exc()}
    path = run_dir / f"rank{rank}.error.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report))
    tmp.replace(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The rank's command line: the run directory and the group's config, as JSON (what the launcher
    passes) or as flags (a hand-started multi-host command); `group_config` makes the same GroupConfig
    of either."""
    parser = argparse.ArgumentParser(description="usp-video rank (started by torch.distributed.run)")
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--config-json", help="the whole GroupConfig as JSON (instead of the flags below)")
    GroupConfig.add_arguments(parser)
    return parser.parse_args(argv)


def group_config(args: argparse.Namespace, world_size: int) -> GroupConfig:
    if args.config_json:
        config = GroupConfig.from_json(args.config_json)
        if config.ranks != world_size:
            raise ValueError(f"the group config is for {config.ranks} ranks, but torchrun started {world_size}")
        return config
    return GroupConfig.from_args(args, ranks=world_size)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _die_with_parent()
    args.run_dir.mkdir(parents=True, exist_ok=True)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    (args.run_dir / f"rank{rank}.pid").write_text(str(os.getpid()))  # torchrun gives ranks their own sessions
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    try:
        config = group_config(args, world_size)  # a bad config is reported like any rank failure
        if config.threads_per_rank:
            torch.set_num_threads(config.threads_per_rank)
        if rank == 0 and not os.environ.get(SECRET_ENV):
            raise ValueError(f"{SECRET_ENV} is not set: rank 0 needs the group's secret to authenticate its client")
        if config.device == "cuda":
            torch.cuda.set_device(local_rank)
        backend = "nccl" if config.device == "cuda" else "gloo"
        timeout = timedelta(seconds=config.timeout)
        if os.environ.get("USP_VIDEO_STORE"):  # single host: a file store, nothing listens on the network
            store = dist.FileStore(os.environ["USP_VIDEO_STORE"], world_size)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        else:  # torchrun's own rendezvous (several hosts)
            dist.init_process_group(backend, timeout=timeout)
        # Requests, stop flags and errors travel on a CPU group, whatever the compute backend.
        control_group = dist.new_group(backend="gloo", timeout=timeout)
        engine = Engine(config, rank=rank, local_rank=local_rank)
        worker = Worker(engine, control_group, args.run_dir, os.environ.get("USP_VIDEO_ALLOW_FAULTS") == "1",
                        heartbeat_s=min(30.0, config.timeout / 4),
                        frame_timeout=float(os.environ.get("USP_VIDEO_FRAME_TIMEOUT", "30")))
        worker.serve()
    except BaseException as exc:
        write_error(args.run_dir, rank, exc)
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # do not wait on collectives that will never finish
    exit_rank(0)  # not a normal interpreter exit: see parallel/teardown.py


if __name__ == "__main__":
    main()
