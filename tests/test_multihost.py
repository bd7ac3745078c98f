"""Beyond one machine: two hosts made with network namespaces run one group of 2 + 2 gloo ranks
through torchrun's rendezvous, and it samples what one process samples. This test runs the
commands of docs/architecture.md's "More than one host" section.

Needs root and `ip netns` (iproute2); skipped otherwise. The hosts talk over a veth pair with
their own addresses, inside namespaces this test makes and deletes."""

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import rel_error
from group_helpers import processes_matching

ROOT = Path(__file__).resolve().parents[1]
HOSTS = {"a": ("usp-host-a", "usp-veth-a", "10.231.77.1"), "b": ("usp-host-b", "usp-veth-b", "10.231.77.2")}


def sh(*cmd, check=True):
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=30)


def netns_available() -> bool:
    if os.geteuid() != 0 or not shutil.which("ip"):
        return False
    name = f"usp-probe-{os.getpid()}"
    ok = sh("ip", "netns", "add", name, check=False).returncode == 0
    sh("ip", "netns", "del", name, check=False)
    return ok


pytestmark = pytest.mark.skipif(not netns_available(), reason="needs root and ip netns")


@pytest.fixture
def two_hosts():
    for ns, _, _ in HOSTS.values():
        sh("ip", "netns", "del", ns, check=False)
    try:
        (a, va, ip_a), (b, vb, ip_b) = HOSTS["a"], HOSTS["b"]
        sh("ip", "netns", "add", a)
        sh("ip", "netns", "add", b)
        sh("ip", "link", "add", va, "netns", a, "type", "veth", "peer", "name", vb, "netns", b)
        for ns, dev, ip in HOSTS.values():
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield HOSTS
    finally:
        for ns, _, _ in HOSTS.values():
            sh("ip", "netns", "del", ns, check=False)


def generate_args(tiny_models, *extra):
    return [sys.executable, "-m", "usp_video.distributed.cli", "generate", "--dit", tiny_models["dit"],
            "--text-encoder", tiny_models["text_encoder"], "--prompt", "a fox in the snow", "--width", "80",
            "--height", "48", "--frames", "9", "--steps", "4", "--seed", "3", *extra]


@pytest.mark.timeout(300)
def test_two_hosts_2_plus_2_ranks_match_one_process(two_hosts, tiny_models, tmp_path):
    secret = uuid.uuid4().hex + uuid.uuid4().hex
    procs = []
    try:
        for node_rank, key in enumerate(("a", "b")):
            ns, dev, _ = two_hosts[key]
            env = dict(os.environ, USP_VIDEO_SECRET=secret, GLOO_SOCKET_IFNAME=dev, OMP_NUM_THREADS="1")
            cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                   "--nproc-per-node=2", f"--node-rank={node_rank}", "--rdzv-backend=static",
                   f"--master-addr={two_hosts['a'][2]}", "--master-port=29511", "--max-restarts=0",
                   str(ROOT / "distributed" / "worker_entry.py"), f"--run-dir={tmp_path / key}", "--device=cpu",
                   "--ulysses=2", "--ring=2"]
            log = open(tmp_path / f"host-{key}.log", "wb")
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        port_file = tmp_path / "a" / "control.port"
        deadline = time.monotonic() + 120
        while not port_file.exists():
            assert all(p.poll() is None for p in procs), (tmp_path / "host-a.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the two-host group did not start"
            time.sleep(0.2)
        # the client runs on host A, beside rank 0, and attaches to the group
        result = subprocess.run(["ip", "netns", "exec", two_hosts["a"][0], *generate_args(
            tiny_models, "--attach", str(tmp_path / "a"), "--ranks", "4", "--save-latent", str(tmp_path / "4.st"))],
            env=dict(os.environ, USP_VIDEO_SECRET=secret), capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stderr + (tmp_path / "host-a.log").read_text()[-2000:]
        assert "ulysses=2 x ring=2" in result.stdout
        for p in procs:  # the attached client's close() shut the group down on both hosts
            p.wait(timeout=60)
            assert p.returncode == 0
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
        for pid in processes_matching(str(tmp_path)):
            os.kill(pid, 9)
    one = subprocess.run(generate_args(tiny_models, "--ranks", "1", "--save-latent", str(tmp_path / "1.st")),
                         capture_output=True, text=True, timeout=180)
    assert one.returncode == 0, one.stderr
    err = rel_error(load_file(str(tmp_path / "4.st"))["latent_tensor"], load_file(str(tmp_path / "1.st"))["latent_tensor"])
    assert err <= 1e-5
