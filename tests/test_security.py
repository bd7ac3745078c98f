"""The control channel lets no one in and survives malformed frames."""

import os
import random
import socket
import time

import pytest

from hardening import HARDENING
from fuzz_frames import DROPPING, IN_STEP, PARSER_REFUSES, frame, truncated
from usp_video.distributed import protocol
from usp_video.distributed.config import GroupConfig
from usp_video.distributed.registry import free_group, get_group

FUZZ_FRAMES = int(os.environ.get("USP_VIDEO_FUZZ_FRAMES", "10000"))


def test_parser_rejects_every_malformed_frame():
    import torch

    rng = random.Random(0)
    kinds = PARSER_REFUSES + DROPPING
    valid = protocol.encode_frame({"type": "ping"}, {"t": torch.arange(6.0)})
    for i in range(FUZZ_FRAMES):
        if i % 3 == 0:
            data = valid[: rng.randrange(0, len(valid))]  # truncated
        else:
            data = frame(kinds[i % len(kinds)], rng)
        with pytest.raises(protocol.ProtocolError):
            protocol.decode_frame(data)
    survived = 0
    for _ in range(1000):  # bit flips: rejected, or still a well-formed frame; never another error
        flipped = bytearray(valid)
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        try:
            header, _ = protocol.decode_frame(bytes(flipped))
        except protocol.ProtocolError:
            continue
        assert isinstance(header["type"], str)
        survived += 1
    HARDENING["frames fuzzed"] += FUZZ_FRAMES + 1000
    print(f"parser: {FUZZ_FRAMES} malformed frames rejected, 1000 bit flips ({survived} still well-formed), "
          "0 crashes")


@pytest.fixture
def group(monkeypatch):
    monkeypatch.setenv("USP_VIDEO_FRAME_TIMEOUT", "0.3")
    g = get_group(GroupConfig(ranks=2))
    yield g
    free_group()


def listening_ports(pids) -> list[tuple[str, int]]:
    """(address, port) of the TCP sockets these processes listen on, from /proc/net/tcp*."""
    inodes = set()
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table, family in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 6)):
        for line in open(table).read().splitlines()[1:]:
            parts = line.split()
            local, state, inode = parts[1], parts[3], parts[9]
            if state == "0A" and inode in inodes:  # LISTEN
                address, port = local.split(":")
                found.append((address, int(port, 16)))
    return found


def test_everything_listens_on_loopback_only(group):
    from group_helpers import group_processes

    pids = [group.proc.pid, *group_processes(group).values()]
    ports = listening_ports(pids)
    assert ports, "found no listening sockets"
    loopback = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1
    assert all(address in loopback for address, _ in ports), ports


def test_a_connection_without_the_secret_is_refused(group):
    for attempt in (b"", b"x" * 32, protocol.encode_frame({"type": "shutdown"})):
        sock = socket.create_connection(("127.0.0.1", group.port))
        sock.settimeout(10)
        nonce = sock.recv(32)
        assert len(nonce) == 32
        if attempt:
            sock.sendall(attempt[:32].ljust(32, b"\0"))
        else:
            time.sleep(0.1)
            sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b"", "the listener kept an unauthenticated connection open"
        sock.close()
    reply, _ = group.request({"type": "ping"})
    assert reply["type"] == "ok"


def test_connections_that_never_answer_do_not_hold_up_the_group(group):
    """Rank 0 reads challenge answers as they arrive: silent connections delay neither requests nor the
    heartbeats (a 5 s block used to stall the loop, and with a short timeout the group died); each is
    closed at its deadline."""
    from usp_video.distributed.control_server import HANDSHAKE_S

    silent = [socket.create_connection(("127.0.0.1", group.port)) for _ in range(3)]
    half = socket.create_connection(("127.0.0.1", group.port))
    try:
        for sock in silent + [half]:
            sock.settimeout(HANDSHAKE_S + 5)
            assert len(sock.recv(32)) == 32  # the challenge is sent at once
        half.sendall(b"x" * 10)  # part of an answer, then nothing
        for _ in range(3):
            started = time.monotonic()
            reply, _ = group.request({"type": "ping"})
            assert reply["type"] == "ok"
            assert time.monotonic() - started < 2.0, "a request waited for a connection's handshake"
        for sock in silent + [half]:  # closed by rank 0 at the deadline
            assert sock.recv(1) == b""
    finally:
        for sock in silent + [half]:
            sock.close()
    reply, _ = group.request({"type": "ping"})
    assert reply["type"] == "ok"


def test_live_rank_0_rejects_malformed_frames_and_keeps_working(group, tiny_models):
    rng = random.Random(1)
    pid = group.proc.pid
    rejected = dropped = 0
    for i in range(FUZZ_FRAMES):
        if i % 500 == 499:
            data, kind = truncated(rng), "truncated"
        elif i % 50 == 49:
            kind = DROPPING[(i // 50) % len(DROPPING)]
            data = frame(kind, rng)
        else:
            kind = IN_STEP[i % len(IN_STEP)]
            data = frame(kind, rng, tiny_models["dit"])
        group.sock.sendall(data)
        reply, _ = protocol.recv_frame(group.sock)
        assert reply["type"] == "error", (kind, reply)
        rejected += 1
        if kind in DROPPING or kind == "truncated":
            try:  # rank 0 dropped the out-of-step stream (a reset if it left bytes unread)
                assert group.sock.recv(1) == b""
            except ConnectionResetError:
                pass
            group.reconnect()
            dropped += 1
    HARDENING["frames fuzzed"] += FUZZ_FRAMES
    assert group.proc.poll() is None and group.proc.pid == pid
    reply, _ = group.request({"type": "ping"})
    assert reply["type"] == "ok" and reply["world_size"] == 2
    print(f"live rank 0: {FUZZ_FRAMES} frames fuzzed, {rejected} rejected, {dropped} connections dropped, 0 crashes")
