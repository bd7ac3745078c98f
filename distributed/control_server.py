"""Rank 0's end of the control channel: the one socket the ComfyUI process (client.py) talks to.

Only rank 0 has a ControlServer; the rank loop (worker.py) hands it the replies and gets the
requests from it, and broadcasts what it got to the other ranks. The server listens on loopback,
writes its port into the run directory (control.port, where the client looks), authenticates each
connection with the group's secret (protocol.py's handshake, read without blocking so that a silent
connection holds up nothing), and, while no request comes, makes a heartbeat frame every
heartbeat_s so that the idle ranks never sit in a collective past its timeout. When the client has
gone, or none has (re)connected for reconnect_s, it makes a shutdown frame: the group stops itself.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import time
from pathlib import Path

from . import protocol

SECRET_ENV = "USP_VIDEO_SECRET"
HANDSHAKE_S = 5.0  # a connection must answer the challenge within this, or it is closed

HEARTBEAT = protocol.make_frame({"type": "heartbeat"})
SHUTDOWN = protocol.make_frame({"type": "shutdown"})


class ControlServer:
    """Rank 0's listener, client connection and pending handshakes. Not thread-safe: the rank loop
    calls it between collectives."""

    def __init__(self, run_dir: Path, secret: str, heartbeat_s: float, reconnect_s: float = 120.0,
                 frame_timeout: float = 30.0):
        self.run_dir, self.secret = run_dir, secret
        self.heartbeat_s, self.reconnect_s, self.frame_timeout = heartbeat_s, reconnect_s, frame_timeout
        self.disconnected_at = time.monotonic()
        self.conn: socket.socket | None = None
        self.listener: socket.socket | None = None
        self.client_gone = False
        # connections still answering the challenge: socket -> (nonce, deadline, answer so far)
        self.handshakes: dict[socket.socket, tuple[bytes, float, bytes]] = {}

    def listen(self) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        port_file = self.run_dir / "control.port"
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(str(self.listener.getsockname()[1]))
        tmp.replace(port_file)

    # -- authentication ----------------------------------------------------------------------

    def accept_one(self) -> None:
        """Take a pending connection and send it the challenge. Its answer is read by the loop as it
        arrives (answer_pending), so a connection that never answers cannot hold up requests or
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
        """Read what a connection has sent of its answer. One that proves it knows the group's secret
        becomes the client connection (replacing a previous one: the client reconnected); a wrong
        answer, or a closed connection, is closed before anything else it sent is read."""
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
        if data and protocol.answer_is_right(self.secret, nonce, answer + data):
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

    # -- requests and replies ----------------------------------------------------------------

    def next_request(self) -> protocol.Frame:
        """The next frame from the client. While there is none, a heartbeat frame every heartbeat_s;
        a shutdown frame once the client has gone, or when no client has (re)connected for
        reconnect_s. A frame with a bad prefix or a truncated one is answered with an error and the
        connection is dropped; the client may reconnect."""
        beat_at = time.monotonic() + self.heartbeat_s
        while True:
            self.close_late_handshakes()
            now = time.monotonic()
            if now >= beat_at:
                if self.conn is None and now - self.disconnected_at > self.reconnect_s:
                    return SHUTDOWN
                return HEARTBEAT
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
                return protocol.read_frame(self.conn, self.frame_timeout, protocol.REQUEST_PAYLOAD_LIMITS)
            except (protocol.ConnectionClosed, ConnectionError):
                self.client_gone = True
                return SHUTDOWN
            except (protocol.ProtocolError, OSError) as exc:
                self.reply_error(exc)
                self.conn.close()
                self.conn, self.disconnected_at = None, time.monotonic()

    def next_valid_request(self) -> tuple[protocol.Frame, dict, dict]:
        """The next frame that parses, with its header and tensors (parsed here, once); a malformed
        one is answered here and never reaches the other ranks."""
        while True:
            frame = self.next_request()
            try:
                header, tensors = frame.decode()
                return frame, header, tensors
            except protocol.ProtocolError as exc:
                self.reply_error(exc)

    def reply_error(self, exc: protocol.ProtocolError | OSError) -> None:
        self.reply({"type": "error", "error_type": "ProtocolError", "message": str(exc), "rank": 0})

    def reply(self, header: dict, tensors: dict | None = None) -> None:
        if self.client_gone or self.conn is None:
            return
        try:
            protocol.send_frame(self.conn, header, tensors)
        except OSError:
            self.client_gone = True

    def cancel_requested(self) -> bool:
        """Between blocks and steps: has a cancel frame arrived? (A select with no wait: cheap enough per block.)"""
        cancel = False
        while not self.client_gone and self.conn is not None and select.select([self.conn], [], [], 0)[0]:
            try:  # bytes are waiting: the whole frame must follow within frame_timeout
                header, _ = protocol.read_frame(self.conn, self.frame_timeout,
                                                protocol.REQUEST_PAYLOAD_LIMITS).decode()
            except (protocol.ProtocolError, protocol.ConnectionClosed, OSError):
                self.client_gone = True
                return True
            if header.get("type") != "cancel":
                print(f"usp-video rank 0: ignored a {header.get('type')!r} frame that arrived while sampling",
                      file=sys.stderr, flush=True)
            cancel = cancel or header.get("type") == "cancel"
        return cancel or self.client_gone
