"""Ending a rank's process without the gloo shutdown crash.

A gloo process group runs its collectives on worker threads, and a worker thread keeps the last
collective's work object (with the tensors it moved) for a moment after the caller's wait returns;
a barrier even collects the works still in flight. Dropping those tensors releases their Python
objects, which takes the GIL. If that happens while the interpreter is finalizing, CPython ends
the thread inside a C++ destructor and the process aborts: "terminate called without an active
exception", exit -6 (gdb: ProcessGroupGloo::runLoop -> ~AsyncBarrierWork -> ~AsyncAllgatherWork ->
decref_pyobject -> take_gil -> pthread_exit; see pytorch/pytorch#190489). destroy_process_group()
does not prevent it: it only forgets the groups, and the ProcessGroup objects (and their threads)
live on while a DeviceMesh or yunchang still refers to them.

So a rank that has finished cleanly leaves the groups, flushes its output and ends with os._exit,
skipping interpreter finalization (nothing is left to run there: results are written before).
"""

from __future__ import annotations

import logging
import os
import sys

import torch.distributed as dist


def exit_rank(code: int = 0) -> None:
    """Leave every process group, flush stdout/stderr and logging, and end the process with `code`."""
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
