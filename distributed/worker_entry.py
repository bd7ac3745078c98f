"""The script torch.distributed.run starts on every rank: one rank's life, from its command line to exit.

    python -m torch.distributed.run --nproc-per-node N worker_entry.py --run-dir DIR --config-json '{...}'

launcher.py writes that command (a hand-started multi-host group passes the group flags instead of
--config-json: docs/architecture.md, "More than one host"). The rank joins the process group, builds its Engine,
and runs the request loop (worker.py; rank 0 with its ControlServer). A rank that fails writes
rank<N>.error.json into the run directory for the client's post-mortem (postmortem.py) and exits
at once.

It is run by path, so it first makes sure the pack is importable as `usp_video` (it is when
pip-installed; when the pack only sits in ComfyUI's custom_nodes folder, its folder is registered
under that name), then names its package (PEP 366) so that its relative imports work.
"""

import importlib
import importlib.util
import os
import sys

if __name__ == "__main__" and not __package__:
    # Python put this script's folder first on sys.path: its modules would shadow libraries of the same
    # name (`import requests` in diffusers would find distributed/requests.py). The pack is imported as
    # usp_video only. Python puts the folder there with symbolic links resolved (a pack linked into
    # custom_nodes), so the folders are compared resolved.
    _here = os.path.dirname(os.path.realpath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != _here]
    if importlib.util.find_spec("usp_video") is None:
        _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        _spec = importlib.util.spec_from_file_location("usp_video", os.path.join(_root, "__init__.py"),
                                                       submodule_search_locations=[_root])
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["usp_video"] = _module
        _spec.loader.exec_module(_module)
    importlib.import_module("usp_video.distributed")
    __package__ = "usp_video.distributed"

import argparse  # noqa: E402
import ctypes  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from .config import GroupConfig  # noqa: E402
from .control_server import SECRET_ENV, ControlServer  # noqa: E402
from .engine import Engine  # noqa: E402
from .parallel.teardown import exit_rank  # noqa: E402
from .worker import Worker  # noqa: E402


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
    try:
        config = group_config(args, world_size)  # a bad config is reported like any rank failure
        run_rank(config, args.run_dir, rank, world_size)
    except BaseException as exc:
        write_error(args.run_dir, rank, exc)
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # do not wait on collectives that will never finish
    exit_rank(0)  # not a normal interpreter exit: see parallel/teardown.py


def run_rank(config: GroupConfig, run_dir: Path, rank: int, world_size: int) -> None:
    """Join the group, build this rank's engine and serve requests until the group shuts down."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if config.threads_per_rank:
        torch.set_num_threads(config.threads_per_rank)
    if rank == 0 and not os.environ.get(SECRET_ENV):
        raise ValueError(f"{SECRET_ENV} is not set: rank 0 needs the group's secret to authenticate its client")
    if config.device == "cuda":
        torch.cuda.set_device(local_rank)
    control_group = init_process_groups(config, rank, world_size)
    engine = Engine(config, rank=rank, local_rank=local_rank)
    server = None
    if rank == 0:
        server = ControlServer(run_dir, os.environ[SECRET_ENV], heartbeat_s=min(30.0, config.timeout / 4),
                               frame_timeout=float(os.environ.get("USP_VIDEO_FRAME_TIMEOUT", "30")))
        server.listen()
    Worker(engine, control_group, server, os.environ.get("USP_VIDEO_ALLOW_FAULTS") == "1").serve()


def init_process_groups(config: GroupConfig, rank: int, world_size: int) -> dist.ProcessGroup:
    """Init the default process group (nccl on GPUs, gloo on CPUs) and return the gloo control group."""
    backend = "nccl" if config.device == "cuda" else "gloo"
    timeout = timedelta(seconds=config.timeout)
    if os.environ.get("USP_VIDEO_STORE"):  # single host: a file store, nothing listens on the network
        store = dist.FileStore(os.environ["USP_VIDEO_STORE"], world_size)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    else:  # torchrun's own rendezvous (several hosts)
        dist.init_process_group(backend, timeout=timeout)
    # Requests, stop flags and errors travel on a CPU group, whatever the compute backend.
    return dist.new_group(backend="gloo", timeout=timeout)


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this rank when its parent (torchrun's agent) dies."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def write_error(run_dir: Path, rank: int, exc: BaseException) -> None:
    report = {"rank": rank, "time": time.time(), "error_type": type(exc).__name__, "message": str(exc),
              "traceback": traceback.format_exc()}
    path = run_dir / f"rank{rank}.error.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report))
    tmp.replace(path)


if __name__ == "__main__":
    main()
