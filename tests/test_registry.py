"""The pack as the Comfy Registry gets it: the archive `comfy node pack` builds, pyproject's registry fields, and
the registry's security standards on the code that ships.

comfy-cli (in the [test] extra) packs the git-tracked files less the patterns in .comfyignore, plus any
[tool.comfy] `includes`: the same archive that `comfy node publish` uploads. The `archive` fixture runs the real
`comfy node pack` on a copy of this checkout's working tree as it is now (tracked files and the untracked ones
git does not ignore), so an edit to .comfyignore or pyproject.toml counts before it is committed.

- test_archive_holds_the_pack_and_no_dev_files: no tests/, benchmarks/, .ci/ in the archive; the node's files
  are; comfy-cli's own pyproject checks (classifiers, versions, license) print no warning.
- test_registry_fields (smoke): [tool.comfy] and the classifiers, as the registry docs specify them.
- test_shipped_code_has_no_eval_exec_or_runtime_pip (smoke): the registry's standards, checked on the syntax
  tree of every shipped .py file (so a string or a comment that mentions them does not count).

Without comfy-cli the archive tests skip, unless USP_VIDEO_REQUIRE_COMFYUI=1 (CI), where they fail.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import NoReturn

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli", reason="Python 3.10 reads pyproject.toml with tomli")

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))

# Archive paths that are development files: the suite, the benchmarks, CI and the tests' outputs.
DEV_PREFIXES = ("tests/", "benchmarks/", ".ci/", "test-artifacts/", ".venv", "docs/generate.py")
# What ComfyUI needs from the archive: the entry point, the nodes, the engine, the page extension, the workflows.
NEEDED_FILES = ("__init__.py", "pyproject.toml", "README.md")
NEEDED_FOLDERS = ("nodes/", "distributed/", "web/js/", "workflows/")


def _unavailable(reason: str) -> NoReturn:
    """Skip, or fail where CI (USP_VIDEO_REQUIRE_COMFYUI=1) says the tool must be there."""
    if os.environ.get("USP_VIDEO_REQUIRE_COMFYUI") == "1":
        pytest.fail(f"{reason}, but USP_VIDEO_REQUIRE_COMFYUI=1 requires the registry tests to run")
    pytest.skip(reason)


@dataclass
class Archive:
    names: list[str]  # the zip's file list
    zip_path: Path
    output: str  # what `comfy node pack` printed


def _working_tree_files() -> list[str]:
    """The checkout's files as git would commit them now: tracked, plus untracked ones .gitignore lets in."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=REPO, capture_output=True, text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        _unavailable(f"cannot list the checkout's files with git ({exc}): comfy node pack packs git-tracked files")
    # A tracked file deleted in the working tree is not part of what would be committed.
    return [name for name in listed.split("\0") if name and (REPO / name).is_file()]


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Archive:
    """`comfy node pack`'s zip of a copy of this checkout (a fresh git repository with the same files)."""
    if find_spec("comfy_cli") is None:
        _unavailable("comfy-cli is not installed (pip install -e '.[test]' brings it)")
    root = tmp_path_factory.mktemp("pack")
    checkout = root / "checkout"
    for name in _working_tree_files():
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, checkout / name)
    # comfy-cli asks git which files are tracked: the copy gets an index holding all of them (no commit needed).
    subprocess.run(["git", "init", "-q"], cwd=checkout, check=True, timeout=60)
    subprocess.run(["git", "add", "-A"], cwd=checkout, check=True, timeout=60)
    # Its config in a throwaway HOME, no telemetry, and no consent prompt (stdin closed).
    env = {**os.environ, "HOME": str(root / "home"), "DO_NOT_TRACK": "1"}
    run = subprocess.run([sys.executable, "-m", "comfy_cli", "--skip-prompt", "node", "pack"], cwd=checkout,
                         env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    output = run.stdout + run.stderr
    zip_path = checkout / "node.zip"
    assert run.returncode == 0 and zip_path.is_file(), f"comfy node pack failed (rc {run.returncode}):\n{output}"
    with zipfile.ZipFile(zip_path) as zf:
        names = [info.filename for info in zf.infolist() if not info.is_dir()]
    return Archive(names=names, zip_path=zip_path, output=output)


def test_archive_holds_the_pack_and_no_dev_files(archive):
    dev = [name for name in archive.names if name.startswith(DEV_PREFIXES)]
    assert not dev, f"the archive holds development files (add them to .comfyignore): {dev[:10]}"

    missing = [name for name in NEEDED_FILES if name not in archive.names]
    missing += [folder for folder in NEEDED_FOLDERS if not any(n.startswith(folder) for n in archive.names)]
    # Every Python package pyproject installs must be complete in the archive too (usp_video is the root).
    for package in PYPROJECT["tool"]["setuptools"]["packages"]:
        init = "/".join(package.split(".")[1:] + ["__init__.py"])
        if init not in archive.names:
            missing.append(init)
    assert not missing, f"the archive lacks {missing}"

    # comfy-cli validates pyproject as it packs (OS and accelerator classifiers, requires-comfyui, license,
    # version) and only warns, dropping the field it cannot read: a warning means the registry would lose it.
    warnings = [line for line in archive.output.splitlines() if "warning" in line.lower()]
    assert not warnings, "comfy node pack warned:\n" + "\n".join(warnings)


@pytest.mark.smoke
def test_registry_fields():
    """[tool.comfy], the classifiers and the links, as the Comfy Registry's pyproject specification has them."""
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    assert comfy.get("PublisherId") and comfy.get("DisplayName")
    urls = project["urls"]
    for key in ("Repository", "Documentation", "Bug Tracker"):
        assert urls.get(key, "").startswith("https://"), f"[project.urls] lacks {key!r}"

    # Icon: a URL to a committed image, on the repository's main branch; square, at most 400 px.
    owner_repo = urls["Repository"].removeprefix("https://github.com/").strip("/")
    raw_prefix = f"https://raw.githubusercontent.com/{owner_repo}/main/"
    icon_url = comfy.get("Icon", "")
    assert icon_url.startswith(raw_prefix), f"Icon {icon_url!r} is not a file of {raw_prefix}"
    icon = REPO / icon_url.removeprefix(raw_prefix)
    assert icon.is_file(), f"the Icon URL names {icon}, which is not in the checkout"
    assert icon.suffix.lower() in (".png", ".jpg", ".jpeg", ".gif"), "the registry takes SVG, PNG, JPG or GIF"
    from PIL import Image

    with Image.open(icon) as image:
        width, height = image.size
    assert width == height <= 400, f"the icon is {width}x{height}: it must be square and at most 400 px"

    # requires-comfyui: comfy-cli's form (operator and major.minor.patch, comma-separated) admitting the
    # ComfyUI the suite runs against where COMFYUI_DIR names one.
    from packaging.specifiers import SpecifierSet

    requirement = comfy.get("requires-comfyui", "")
    assert requirement, "[tool.comfy] lacks requires-comfyui"
    for part in requirement.split(","):
        assert re.fullmatch(r"\s*(==|>=|<=|!=|~=|>|<)?\s*\d+\.\d+\.\d+\s*", part), f"bad requires-comfyui {part!r}"
    tested = _comfyui_version()
    if tested:
        assert SpecifierSet(requirement).contains(tested), f"requires-comfyui {requirement} excludes {tested}"

    # Classifiers: the registry's OS and accelerator entries, each one PyPI accepts.
    trove = pytest.importorskip("trove_classifiers", reason="trove-classifiers is in the [test] extra")
    classifiers = project.get("classifiers", [])
    for needed in ("Operating System :: POSIX :: Linux", "Environment :: GPU :: NVIDIA CUDA"):
        assert needed in classifiers
    unknown = [c for c in classifiers if c not in trove.classifiers]
    assert not unknown, f"classifiers PyPI does not accept: {unknown}"


def _comfyui_version() -> str | None:
    """The version of the ComfyUI at COMFYUI_DIR (its comfyui_version.py), if one is set."""
    comfyui_dir = os.environ.get("COMFYUI_DIR")
    version_file = Path(comfyui_dir or ".") / "comfyui_version.py"
    if not comfyui_dir or not version_file.is_file():
        return None
    found = re.search(r'__version__\s*=\s*"([^"]+)"', version_file.read_text(encoding="utf-8"))
    return found.group(1) if found else None


# Calls that start a process: subprocess's functions, os.system/popen/exec*/spawn*, asyncio's subprocesses.
def _spawns(dotted: str) -> bool:
    module, _, function = dotted.rpartition(".")
    return (module == "subprocess"
            or (module == "os" and function.startswith(("system", "popen", "exec", "spawn", "posix_spawn")))
            or (module == "asyncio" and function.startswith("create_subprocess")))


def _is_pip(text: str) -> bool:
    """Whether a string names pip as a program or module: "pip", "pip3", ".../pip3.11", "ensurepip"."""
    for word in text.replace("\\", "/").split():
        program = word.rsplit("/", 1)[-1]
        if program in ("pip", "pip3", "ensurepip") or program.startswith("pip3."):
            return True
    return False


class _ForbiddenCalls(ast.NodeVisitor):
    """Collects eval/exec calls and run-time pip (importing pip or ensurepip, a process running pip, a string
    that is pip's name on its own, as a command list built before the call would hold it)."""

    def __init__(self) -> None:
        self.found: dict[int, str] = {}  # line -> the first finding there (a call before the strings in it)
        self.aliases: dict[str, str] = {}  # local name -> dotted name it was imported as

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.asname:  # import a.b as c: c is a.b
                self.aliases[alias.asname] = alias.name
            else:  # import a.b: the name bound is a
                top = alias.name.split(".")[0]
                self.aliases[top] = top
            self._check_module(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            self.aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        self._check_module(node, node.module or "")

    def _check_module(self, node: ast.stmt, module: str) -> None:
        if module.split(".")[0] in ("pip", "ensurepip"):
            self.found.setdefault(node.lineno, f"imports {module}")

    def _dotted(self, func: ast.expr) -> str:
        """The called name with import aliases resolved: `sp.run` -> "subprocess.run", `run` -> "subprocess.run"."""
        parts = []
        while isinstance(func, ast.Attribute):
            parts.append(func.attr)
            func = func.value
        if not isinstance(func, ast.Name):
            return ""
        parts.append(self.aliases.get(func.id, func.id))
        return ".".join(reversed(parts))

    def visit_Call(self, node: ast.Call) -> None:
        dotted = self._dotted(node.func)
        if dotted in ("eval", "exec", "builtins.eval", "builtins.exec", "__builtins__.eval", "__builtins__.exec"):
            self.found.setdefault(node.lineno, f"calls {dotted}()")
        elif dotted == "getattr" and any(isinstance(a, ast.Constant) and a.value in ("eval", "exec")
                                         for a in node.args[1:2]):
            self.found.setdefault(node.lineno, "looks up eval/exec with getattr")
        elif _spawns(dotted) and any(isinstance(c, ast.Constant) and isinstance(c.value, str) and _is_pip(c.value)
                                     for arg in [*node.args, *(k.value for k in node.keywords)]
                                     for c in ast.walk(arg)):
            self.found.setdefault(node.lineno, f"runs pip through {dotted}()")
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and node.value.strip() in ("pip", "pip3", "ensurepip"):
            self.found.setdefault(node.lineno, f"names {node.value.strip()!r} (a command being built?)")


def forbidden_calls(source: str, filename: str) -> list[str]:
    """`filename:line: what` for each eval/exec call and each run-time pip in one Python source."""
    visitor = _ForbiddenCalls()
    visitor.visit(ast.parse(source, filename))
    return [f"{filename}:{line}: {what}" for line, what in sorted(visitor.found.items())]


@pytest.mark.smoke
def test_forbidden_calls_are_found_in_code_not_in_text():
    """The scanner's own check: the forms it must catch, and the look-alikes it must let through."""
    caught = '''import subprocess as sp, builtins
from subprocess import check_call
eval("1")
builtins.exec("x = 1")
sp.run([sys.executable, "-m", "pip", "install", "x"])
check_call("pip3 install x", shell=True)
cmd = [sys.executable, "-m", "pip"]
import ensurepip
from pip._internal.cli.main import main
'''
    found = forbidden_calls(caught, "caught.py")
    assert [int(f.split(":")[1]) for f in found] == [3, 4, 5, 6, 7, 8, 9], found  # each line but the imports
    passed = '''
"""Mentions eval( and subprocess pip install in a docstring."""
# eval("1"); subprocess.run(["pip", "install"])
model.eval()
raise ImportError("needs flash-attn: pip install flash-attn")
subprocess.run([sys.executable, "-m", "usp_video.distributed.worker_entry"])
'''
    assert forbidden_calls(passed, "passed.py") == []


@pytest.mark.smoke
def test_shipped_code_has_no_eval_exec_or_runtime_pip(archive):
    """The registry's standards (no eval/exec, no pip at run time) on every .py file the archive holds."""
    findings = []
    with zipfile.ZipFile(archive.zip_path) as zf:
        for name in archive.names:
            if name.endswith(".py"):
                findings += forbidden_calls(zf.read(name).decode("utf-8"), name)
    assert any(name.endswith(".py") for name in archive.names)
    assert not findings, "shipped code the Comfy Registry refuses:\n" + "\n".join(findings)
