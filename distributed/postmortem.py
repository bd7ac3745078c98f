"""Why did the group fail? One message, naming the rank, from what the group left behind.

A rank that raised writes a report, rank<N>.error.json in the run directory (worker_entry.py); a
rank that died (killed, out of memory, segfault) cannot, and its peers then report communication
errors: so a dead silent rank is the cause, named from torchrun's failure summary in the group's
log; else the earliest report is. explain_failure is a pure function of those facts; client.py
gathers them (reading the run directory, asking the launcher which ranks still run, waiting for
torchrun's summary) and then stops the group.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

# torchrun's failure summary: "rank : N (local_rank: N)" then "exitcode : C (pid: P)", for every rank
# that ended, its "Root Cause" section last
_SUMMARY_ENTRY = r"rank\s*:\s*(\d+)[^\n]*\n\s*exitcode\s*:\s*(-?\d+)"


def read_reports(run_dir: Path) -> list[dict]:
    """The error reports the ranks have written so far."""
    reports = []
    for path in run_dir.glob("rank*.error.json"):
        try:
            reports.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            pass  # still being written
    return reports


def silent_ranks(reports: list[dict], ranks: int) -> list[int]:
    """The ranks that wrote no report."""
    return sorted(set(range(ranks)) - {r["rank"] for r in reports})


def timed_out(reports: list[dict]) -> bool:
    """Did the earliest report come from a collective that timed out? (The silent ranks then hung,
    rather than died: torchrun may have killed them since.)"""
    first = _earliest(reports)
    return first is not None and ("timed out" in first["message"].lower() or "timeout" in first["message"].lower())


def explain_failure(reports: list[dict], ranks: int, dead: list[int], log_tail: str, log_path: Path,
                    timeout_s: float, clean_exit: bool) -> str:
    """The message of the GroupError for a failed group of `ranks` ranks.

    reports: the ranks' error reports (read_reports); dead: the silent ranks that are no longer running
    (none after a timeout); log_tail: the end of the group's log, with torchrun's failure summary once it
    has exited; clean_exit: torchrun exited with 0, or the group was attached (no torchrun here)."""
    if reports and (not dead or all(_exit_codes(log_tail).get(r) == -signal.SIGTERM for r in dead)):
        # no rank died, or the silent ones were stopped by torchrun after a rank raised: the report says why
        return _rank_failed(reports, ranks, timeout_s, log_path)
    if not reports and not dead and clean_exit:
        return f"the group shut down: its control connection to rank 0 was lost.\n(log: {log_path})"
    return _rank_died(ranks, dead, log_tail, log_path)


def _earliest(reports: list[dict]) -> dict | None:
    return min(reports, key=lambda r: r["time"]) if reports else None


def _exit_codes(log_tail: str) -> dict[int, int]:
    return {int(r): int(c) for r, c in re.findall(_SUMMARY_ENTRY, log_tail)}


def _rank_failed(reports: list[dict], ranks: int, timeout_s: float, log_path: Path) -> str:
    first = _earliest(reports)
    msg = f"rank {first['rank']} of {ranks} failed: {first['error_type']}: {first['message']}"
    if timed_out(reports):
        silent = silent_ranks(reports, ranks)
        msg += (f"\nA collective waited longer than timeout_s={timeout_s:g} s"
                + (f"; rank(s) {', '.join(map(str, silent))} stopped responding" if silent else "")
                + ". Raise timeout_s if a step legitimately takes longer.")
    return msg + f"\n(full traceback in {log_path})"


def _rank_died(ranks: int, dead: list[int], log_tail: str, log_path: Path) -> str:
    exits = _exit_codes(log_tail)
    root = re.findall(_SUMMARY_ENTRY, log_tail.rpartition("Root Cause")[2]) if "Root Cause" in log_tail else []
    order = ([int(root[0][0])] if root else []) + list(exits)
    candidates = [r for r in order if r in dead] if dead else order
    # torchrun stops the other ranks with SIGTERM: the culprit is one that ended otherwise
    rank = next((r for r in candidates if exits.get(r) != -signal.SIGTERM),
                candidates[0] if candidates else (dead[0] if dead else None))
    how = ""
    if rank in exits:
        code = exits[rank]
        how = (f" (killed by {signal.Signals(-code).name})" if code < 0 and -code in signal.valid_signals()
               else f" (exit code {code})")
    who = f"rank {rank}" if rank is not None else "a rank"
    return f"{who} of {ranks} died{how}; the group was stopped.\n(log: {log_path})"
