import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))


def rel_error(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.fixture(scope="session")
def tests_dir() -> Path:
    return TESTS


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """The tiny Wan model set in ComfyUI's layout, made once per test session."""
    from usp_video.distributed.models.wan21.tiny import make_tiny_models

    root = tmp_path_factory.mktemp("models")
    return {k: str(v) for k, v in make_tiny_models(root).items()}


@pytest.fixture(scope="session")
def tiny_hunyuan(tmp_path_factory) -> dict:
    """The tiny HunyuanVideo model set in ComfyUI's layout, made once per test session."""
    from usp_video.distributed.models.hunyuan_video.tiny import make_tiny_hunyuan_models

    root = tmp_path_factory.mktemp("hunyuan")
    return {k: str(v) for k, v in make_tiny_hunyuan_models(root).items()}


from hardening import HARDENING  # noqa: E402  (counted by test_bad_input, test_faults, test_security)


def pytest_runtest_logreport(report):
    if report.when == "call" and report.failed and any(
            name in report.nodeid for name in ("test_bad_input", "test_faults", "test_security")):
        HARDENING["failures"] += 1


# Every process this session starts inherits this mark; at the end, a sweep of /proc finds the pack's
# processes (ranks, launchers, spawned targets) still alive with it: orphans, whichever test left them.
os.environ["USP_VIDEO_TEST_SESSION"] = str(os.getpid())
_OURS = (b"usp_video", b"torch.distributed.run", b"torchrun", b"parity_targets", b"_bench.py")


def session_orphans() -> list[int]:
    """Live processes that carry this session's mark and run the pack's code (not this process)."""
    mark = f"USP_VIDEO_TEST_SESSION={os.getpid()}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().split(")")[-1].split()[0]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if mark in environ and state != "Z" and any(part in cmdline for part in _OURS):
            found.append(int(proc.name))
    return found


@pytest.hookimpl(trylast=True)  # after the fixtures' own teardown, also on Ctrl-C or pytest.exit
def pytest_sessionfinish(session, exitstatus):
    """Stop the groups the session kept for reuse, then count what outlived them (and fail the run)."""
    import signal
    import time

    from usp_video.distributed.registry import GROUPS

    GROUPS.stop_all()
    deadline = time.monotonic() + 15
    while session_orphans() and time.monotonic() < deadline:
        time.sleep(0.2)
    left = session_orphans()
    HARDENING["orphans"] += len(left)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if left and session.exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter):
    if any(HARDENING[k] for k in ("inputs tried", "faults injected", "frames fuzzed")):
        terminalreporter.write_line("hardening: " + ", ".join(f"{k} {v}" for k, v in HARDENING.items())
                                    + " (orphans: the pack's processes alive at the session's end, found by a "
                                      "sweep of /proc)")
    if HARDENING["orphans"]:
        terminalreporter.write_line(f"FAILED: {HARDENING['orphans']} process(es) of the pack outlived the tests "
                                    "(killed now)")


# The tests that need a real ComfyUI (COMFYUI_DIR) or a browser skip, with a message, where those are
# absent. CI installs both and sets USP_VIDEO_REQUIRE_COMFYUI=1: there a skip of any of them is a failure,
# so that a broken install cannot pass as "skipped".
REQUIRED_IN_CI = ("test_comfyui_native.py", "test_comfyui_integration.py", "test_browser.py")


def _required_here(path) -> bool:
    return os.environ.get("USP_VIDEO_REQUIRE_COMFYUI") == "1" and Path(str(path)).name in REQUIRED_IN_CI


def _skip_reason(longrepr) -> str:
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _required_here(item.path) and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = (f"skipped, but USP_VIDEO_REQUIRE_COMFYUI=1 requires it to run: "
                           f"{_skip_reason(report.longrepr)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _required_here(getattr(collector, "path", "")):
        report.outcome = "failed"
        report.longrepr = (f"skipped at collection, but USP_VIDEO_REQUIRE_COMFYUI=1 requires it to run: "
                           f"{_skip_reason(report.longrepr)}")
