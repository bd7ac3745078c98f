"""What every test shares: the tiny model sets (session fixtures), the relative error, the markers, the orphan
sweep at the session's end, and CI's rule that a ComfyUI test may not skip.

The tiny sets are the real on-disk formats with shrunk architectures (each family's tiny.py); the parity harness
(test_parity.py) names their files by role through `family_models`. parity_targets.py holds what runs on the
spawned gloo ranks (usp_video.distributed.testing.spawn).

Subsets (markers declared in pyproject.toml, given here and in test_parity.py):

    python -m pytest -m smoke              about a minute: pure checks, and one 2-rank parity case per family
    python -m pytest -m "not slow"         all but the soak, the fault loops, the 4-rank parity sweep and the
                                           compiled-blocks cases (every family x factorization of 2 and 3 ranks)
    python -m pytest -k "wan2.2-a14b"      one family's parity cases (only the selected cases are spawned)
"""

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


@pytest.fixture(scope="session")
def tiny_hv15(tmp_path_factory) -> dict:
    """The tiny HunyuanVideo 1.5 set in Comfy-Org's layout, made once per test session."""
    from usp_video.distributed.models import FAMILIES

    return {k: str(v) for k, v in FAMILIES["hunyuan-video-1.5"].make_tiny(tmp_path_factory.mktemp("hv15")).items()}


@pytest.fixture(scope="session")
def tiny_wan22(tmp_path_factory) -> dict:
    """The tiny Wan 2.2 A14B set (two experts, the shared VAE and UMT5), made once per test session."""
    from usp_video.distributed.models.wan22_a14b.tiny import make_tiny_models

    return {k: str(v) for k, v in make_tiny_models(tmp_path_factory.mktemp("wan22")).items()}


@pytest.fixture(scope="session")
def experts(tiny_wan22) -> list[str]:
    """The two tiny Wan 2.2 A14B experts: [high noise, low noise]."""
    return [tiny_wan22["high_noise"], tiny_wan22["low_noise"]]


@pytest.fixture(scope="session")
def tiny_5b(tmp_path_factory) -> dict:
    """The tiny Wan 2.2 TI2V-5B set, made once per test session."""
    from usp_video.distributed.models import FAMILIES

    return {k: str(v) for k, v in FAMILIES["wan2.2-ti2v-5b"].make_tiny(tmp_path_factory.mktemp("wan22_5b")).items()}


@pytest.fixture(scope="session")
def wan22_i2v(tiny_wan22) -> list[str]:
    """The two tiny Wan 2.2 I2V A14B experts of the tiny set: 36 input channels, no image embedder."""
    return [tiny_wan22["i2v_high_noise"], tiny_wan22["i2v_low_noise"]]


@pytest.fixture(scope="session")
def two_experts(tiny_models, tmp_path_factory) -> list[str]:
    """The tiny Wan DiT and a second one of the same architecture with other weights."""
    from usp_video.distributed.models.wan21.tiny import make_tiny_models

    return [tiny_models["dit"], str(make_tiny_models(tmp_path_factory.mktemp("expert2"), seed=1)["dit"])]


@pytest.fixture(scope="session")
def tiny_vace(tmp_path_factory) -> dict:
    """The tiny Wan 2.1 VACE set (ComfyUI-detectable DiT, a 4096-wide tiny UMT5, the Wan-VAE), made once per session."""
    from usp_video.distributed.models import FAMILIES

    return {k: str(v) for k, v in FAMILIES["wan2.1-vace"].make_tiny(tmp_path_factory.mktemp("wan_vace")).items()}


@pytest.fixture(scope="session")
def family_models(tiny_models, tiny_hunyuan, experts, tiny_5b, wan22_i2v, two_experts, tiny_vace, tiny_wan22,
                  tiny_hv15) -> dict:
    """{family name: {role: path}}: the files the parity harness (test_parity.py) names by role."""
    return {"wan2.1": {"dit": tiny_models["dit"], "dit2": two_experts[1], "dit_i2v": tiny_models["dit_i2v"],
                       "dit_fun_control": tiny_models["dit_fun_control"]},
            "hunyuan-video": {"dit": tiny_hunyuan["dit"]},
            "wan2.2-a14b": {"high_noise": experts[0], "low_noise": experts[1], "i2v_high_noise": wan22_i2v[0],
                            "i2v_low_noise": wan22_i2v[1], "fun_control_high_noise": tiny_wan22["fun_control_high_noise"],
                            "fun_control_low_noise": tiny_wan22["fun_control_low_noise"]},
            "wan2.2-ti2v-5b": {"dit": tiny_5b["dit"], "fun_control": tiny_5b["fun_control"]},
            "wan2.1-vace": {"dit": tiny_vace["dit"]}, "hunyuan-video-1.5": {"dit": tiny_hv15["dit"]}}


from hardening import HARDENING  # noqa: E402  (counted by test_bad_input, test_faults, test_security)

# The long tests, by file: the soak, the fault-injection loops, two hosts in network namespaces.
SLOW_FILES = ("test_soak.py", "test_faults.py", "test_multihost.py")
# The smoke subset outside the parity harness: checks of a second or two, no group started.
SMOKE_TESTS = ("test_layout.py::test_the_circle_check_can_fail", "test_planner.py::", "test_protocol.py::",
               "test_usp_attention.py::test_lse_kernels_agree_with_math_reference",
               "test_usp_attention.py::test_resolve_degrees", "test_wan_parity.py::test_world_size_one_matches",
               "test_hunyuan_parity.py::test_world_size_one_matches", "test_docs.py::test_every_",
               "test_docs.py::test_readme_is_short", "test_docs.py::test_generated_tables_are_current",
               "test_docs.py::test_ci_blocks_are_what_ci_runs", "test_docs.py::test_commands_that_need",
               "test_docs.py::test_links_", "test_docs.py::test_troubleshooting")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
        if any(test in item.nodeid for test in SMOKE_TESTS):
            item.add_marker(pytest.mark.smoke)


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
REQUIRED_IN_CI = ("test_comfyui_native.py", "test_comfyui_integration.py", "test_browser.py", "test_previous_release.py",
                  "test_comfy_internals.py", "test_registry.py")


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
