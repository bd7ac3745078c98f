"""The groups this process started: the one process-global registry of the pack.

ComfyUI's nodes and the CLI ask for a group by its GroupConfig (get_group): the current group is
reused across prompts while its config is unchanged and it is alive, relaunched after a failure,
and replaced when the config changes; every group still running is stopped when the process exits (at exit, and,
inside ComfyUI, on a SIGTERM too: stop_groups_on_sigterm). The groups themselves are client.UspGroup.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading

from .client import UspGroup
from .config import GroupConfig


class GroupRegistry:
    """The owner of the groups this process started: the current one, reused across prompts while its
    config is unchanged, and every one still running, stopped when the process exits."""

    def __init__(self):
        self.current: UspGroup | None = None
        self.live: set[UspGroup] = set()

    def get(self, config: GroupConfig) -> UspGroup:
        """The running group for config: reused while alive, relaunched after a failure, replaced
        (the old one stopped first) when the config changes."""
        current = self.current
        if current is not None and current.config == config and current.alive():
            return current
        if current is not None:
            self._stop(current)
        group = UspGroup(config)
        self.current = group
        self.live.add(group)
        return group.start()

    def free(self) -> bool:
        """Stop the current group, if any (frees its GPU memory). Returns whether one ran."""
        group, self.current = self.current, None
        if group is None:
            return False
        self._stop(group)
        return True

    def stop_all(self) -> None:
        for group in list(self.live):
            self._stop(group, timeout=5.0)
        self.current = None

    def _stop(self, group: UspGroup, timeout: float = 10.0) -> None:
        group.close(timeout=timeout)
        group.cleanup_files()
        self.live.discard(group)


GROUPS = GroupRegistry()  # this process's groups (ComfyUI's, or the CLI's)
atexit.register(GROUPS.stop_all)


def get_group(config: GroupConfig) -> UspGroup:
    return GROUPS.get(config)


def free_group() -> bool:
    return GROUPS.free()


__all__ = ["GroupRegistry", "GROUPS", "get_group", "free_group"]


def stop_groups_on_sigterm() -> bool:
    """Stop this process's groups (their ranks, their run folders) when it gets a SIGTERM, then end it as the
    SIGTERM would have (the handler found before, else the default action). Python runs no atexit hook on a SIGTERM,
    so a `kill` of ComfyUI would leave the run folders behind. Only from the main thread (where Python allows a
    handler); returns whether it was installed."""
    if threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        try:
            GROUPS.stop_all()
        finally:
            if callable(previous):
                previous(signum, frame)
            else:
                signal.signal(signum, signal.SIG_DFL if previous in (None, signal.SIG_DFL) else previous)
                os.kill(os.getpid(), signum)

    if getattr(previous, "__name__", "") != on_sigterm.__name__:  # once, however often the pack is loaded
        signal.signal(signal.SIGTERM, on_sigterm)
    return True
