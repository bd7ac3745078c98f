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
    from usp_video.distributed.models.tiny import make_tiny_models

    root = tmp_path_factory.mktemp("models")
    return {k: str(v) for k, v in make_tiny_models(root).items()}
