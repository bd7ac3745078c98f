"""The post-mortem of a failed group, on canned rank reports and torchrun logs: no processes."""

from pathlib import Path

from usp_video.distributed import postmortem
from usp_video.distributed.postmortem import explain_failure

LOG = Path("/run/usp-video-group-x/group.log")


def summary(failures: list[tuple[int, int]], root: tuple[int, int]) -> str:
    """torchrun's failure summary: (rank, exit code) per failure, then the root cause's."""

    def entry(i: int, rank: int, code: int) -> str:
        return (f"[{i}]:\n  time      : 2026-01-01_00:00:00\n  host      : localhost\n"
                f"  rank      : {rank} (local_rank: {rank})\n  exitcode  : {code} (pid: {1000 + rank})\n"
                "  error_file: <N/A>\n  traceback : To enable traceback see: https://pytorch.org\n")

    return ("rank 0: training...\n" + "=" * 60 + "\nworker_entry.py FAILED\n" + "-" * 60 + "\nFailures:\n"
            + "".join(entry(i + 1, r, c) for i, (r, c) in enumerate(failures)) + "-" * 60
            + "\nRoot Cause (first observed failure):\n" + entry(0, *root) + "=" * 60 + "\n")


def report(rank: int, message: str, time: float, error_type: str = "RuntimeError") -> dict:
    return {"rank": rank, "time": time, "error_type": error_type, "message": message, "traceback": "..."}


def explain(reports=(), ranks=3, dead=(), log="", timeout_s=60.0, clean_exit=False) -> str:
    return explain_failure(list(reports), ranks, list(dead), log, LOG, timeout_s, clean_exit)


def test_a_rank_killed_by_a_signal_is_named_with_its_signal():
    log = summary([(0, -15), (2, -15)], root=(1, -9))
    assert explain(dead=[1], log=log) == f"rank 1 of 3 died (killed by SIGKILL); the group was stopped.\n(log: {LOG})"


def test_a_rank_that_exited_is_named_with_its_exit_code():
    log = summary([(0, -15)], root=(1, 3))
    assert explain(ranks=2, dead=[1], log=log) == (
        f"rank 1 of 2 died (exit code 3); the group was stopped.\n(log: {LOG})")


def test_a_dead_silent_rank_is_the_cause_not_its_peers_reports():
    """Its peers report broken connections; the rank that could not report is the culprit."""
    reports = [report(0, "Connection closed by peer", 2.0), report(2, "Connection reset by peer", 1.0)]
    log = summary([(0, 1), (2, 1)], root=(1, -9))
    assert explain(reports, dead=[1], log=log).startswith("rank 1 of 3 died (killed by SIGKILL)")


def test_without_a_summary_the_dead_rank_is_named_alone():
    assert explain(ranks=2, dead=[1]) == f"rank 1 of 2 died; the group was stopped.\n(log: {LOG})"
    assert explain(ranks=2) == f"a rank of 2 died; the group was stopped.\n(log: {LOG})"


def test_the_culprit_is_not_a_rank_that_torchrun_stopped():
    """torchrun SIGTERMs the survivors; a root cause that ended so is passed over for one that did not."""
    log = summary([(2, -11)], root=(0, -15))
    assert explain(log=log).startswith("rank 2 of 3 died (killed by SIGSEGV)")


def test_the_earliest_report_names_the_rank_that_raised():
    reports = [report(0, "peer gone", 5.0), report(2, "injected fault", 1.0)]
    assert explain(reports) == (f"rank 2 of 3 failed: RuntimeError: injected fault\n(full traceback in {LOG})")


def test_silent_ranks_stopped_by_torchrun_leave_the_report_as_the_cause():
    log = summary([(1, -15)], root=(2, 1))
    assert explain([report(2, "injected fault", 1.0)], dead=[1], log=log).startswith(
        "rank 2 of 3 failed: RuntimeError: injected fault")


def test_a_timeout_names_the_ranks_that_stopped_responding():
    reports = [report(0, "Gloo timed out after 60000ms", 1.0)]
    assert explain(reports, timeout_s=60.0) == (
        "rank 0 of 3 failed: RuntimeError: Gloo timed out after 60000ms\n"
        "A collective waited longer than timeout_s=60 s; rank(s) 1, 2 stopped responding. "
        f"Raise timeout_s if a step legitimately takes longer.\n(full traceback in {LOG})")
    assert postmortem.timed_out(reports) and not postmortem.timed_out([report(0, "boom", 1.0)])


def test_a_clean_exit_without_reports_is_a_lost_connection():
    assert explain(clean_exit=True) == (
        f"the group shut down: its control connection to rank 0 was lost.\n(log: {LOG})")


def test_reports_are_read_from_the_run_dir_and_a_half_written_one_is_skipped(tmp_path):
    import json

    (tmp_path / "rank1.error.json").write_text(json.dumps(report(1, "boom", 1.0)))
    (tmp_path / "rank2.error.json").write_text('{"rank": 2, "ti')
    assert [r["rank"] for r in postmortem.read_reports(tmp_path)] == [1]
    assert postmortem.silent_ranks(postmortem.read_reports(tmp_path), 3) == [0, 2]
