"""Run one function on N local gloo ranks: used by the parity tests and the benchmarks.

    results = run_ranks("tests/parity_targets.py:run_cases", 4, {"target": ..., "cases": [...]})

Each rank runs `func(rank, world_size, **kwargs)` in a fresh process with an initialised gloo
default group (rendezvous through a FileStore in a private temp dir, so no port can clash) and
may return a dict of tensors, which comes back per rank. Every rank is killed when one fails or
the timeout passes; the error names the rank and ends with its stderr.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from ..parallel.teardown import exit_rank


def _load_target(target: str):
    where, _, name = target.rpartition(":")
    if where.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(where).stem, where)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    return getattr(module, name)


def run_ranks(target: str, world_size: int, kwargs: dict | None = None, timeout: float = 300.0,
              threads_per_rank: int = 1) -> list[dict[str, torch.Tensor]]:
    """Run target on world_size gloo ranks and return each rank's tensors."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="usp-ranks-") as tmp:
        kwargs_file = Path(tmp, "kwargs.json")
        kwargs_file.write_text(json.dumps(kwargs or {}))
        env = dict(os.environ, OMP_NUM_THREADS=str(threads_per_rank), GLOO_SOCKET_IFNAME="lo")
        procs = []
        try:
            for rank in range(world_size):
                cmd = [sys.executable, "-m", "usp_video.distributed.testing.spawn", "--target", target,
                       "--rank", str(rank), "--world-size", str(world_size), "--dir", tmp]
                log = open(Path(tmp, f"rank{rank}.log"), "wb")
                procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
                log.close()
            deadline = time.monotonic() + timeout
            while True:
                codes = [p.poll() for p in procs]
                failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
                if failed:
                    # the first rank to fail is the cause; the others fail on the broken group
                    rank = failed[0]
                    raise RuntimeError(f"rank {rank} of {world_size} failed (exit {codes[rank]}):\n"
                                       + Path(tmp, f"rank{rank}.log").read_text(errors="replace")[-4000:])
                if all(c == 0 for c in codes):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{target} on {world_size} ranks did not finish in {timeout:.0f} s")
                time.sleep(0.05)
            return [load_file(str(Path(tmp, f"out{rank}.safetensors"))) for rank in range(world_size)]
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()


def _rank_main() -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--dir", required=True)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    store = dist.FileStore(str(Path(args.dir, "store")), args.world_size)
    dist.init_process_group("gloo", store=store, rank=args.rank, world_size=args.world_size)
    code = 1
    try:
        kwargs = json.loads(Path(args.dir, "kwargs.json").read_text())
        result = _load_target(args.target)(args.rank, args.world_size, **kwargs) or {}
        out = {k: v.detach().contiguous().cpu() for k, v in result.items()}
        save_file(out, str(Path(args.dir, f"out{args.rank}.safetensors")))
        dist.barrier(group=dist.group.WORLD)  # no rank closes its connections while a peer is still in a collective
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        exit_rank(code)  # not a normal interpreter exit: see parallel/teardown.py


if __name__ == "__main__":
    _rank_main()
