"""The README and docs/ say what is true: every shell command in a fenced block runs, or (where it needs what CI
lacks) parses; the generated tables equal the files they come from; the README stays a newcomer's page.

A block's info string says what it needs (GitHub reads only the first word, the language):

    ```bash             run here, for real, in a scratch folder (docs/, benchmarks/ and workflows/ linked in)
    ```bash ci          the two commands .ci/run takes from README.md and runs: checked to be those
    ```bash gpu / weights / comfyui / hosts / slow
                        needs a GPU, real model files, a ComfyUI server, two hosts (tests/test_multihost.py runs
                        them) or takes too long here (the other families' tiny demos; .ci/run runs Wan 2.1's,
                        test_wan22*.py run wan2.2's and wan2.2-5b's): each `usp-video` command's flags are
                        parsed by the CLI's own parser, so a wrong flag fails
    ```bash benchmark   a benchmark script: its flags must be in the script's --help
    ```bash system      installs or clones (pip, apt-get, git clone): not run
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKERS = {"", "ci", "gpu", "weights", "comfyui", "hosts", "slow", "benchmark", "system"}
PARSED = {"gpu", "weights", "comfyui", "hosts", "slow"}
FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```\s*$", re.M | re.S)
SHELLS = {"bash", "sh", "shell", "console"}
README_MAX_LINES = 300


def shell_blocks() -> list[tuple[str, int, str, str]]:
    """(file, line, marker, body) of every fenced shell block of README.md and docs/*.md."""
    blocks = []
    for path in DOC_FILES:
        text = path.read_text()
        for m in FENCE.finditer(text):
            words = m.group("info").split()
            if not words or words[0] not in SHELLS:
                continue
            marker = " ".join(words[1:])
            line = text.count("\n", 0, m.start()) + 1
            blocks.append((str(path.relative_to(ROOT)), line, marker, m.group("body")))
    return blocks


def commands(body: str) -> list[str]:
    """The block's commands: continuation lines joined, comments and blank lines dropped."""
    out, current = [], ""
    for raw in body.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        text = current.strip()
        current = ""
        if text and not text.startswith("#"):
            out.append(text)
    return out


def words_of(command: str) -> list[str]:
    """The command's words up to a comment (shlex drops it)."""
    return shlex.split(command, comments=True)


BLOCKS = shell_blocks()


def block_id(block) -> str:
    return f"{block[0]}:{block[1]}"


def test_every_block_has_a_known_marker():
    assert BLOCKS, "no shell blocks found"
    bad = [(block_id(b), b[2]) for b in BLOCKS if b[2] not in MARKERS]
    assert bad == [], f"unknown block markers {bad}; known: {sorted(MARKERS)}"


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/ (<= {README_MAX_LINES})"


def test_generated_tables_are_current():
    """docs/generate.py --check: the benchmark tables equal benchmarks/results/*.json, the defaults table the code."""
    run = subprocess.run([sys.executable, str(ROOT / "docs" / "generate.py"), "--check"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_a_stale_table_fails(tmp_path, monkeypatch):
    """The check can fail: a number changed in a generated table is found."""
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import generate
    finally:
        sys.path.remove(str(ROOT / "docs"))
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    table = re.search(r"<!-- generated: cpu -->\n(.*?)<!-- end generated: cpu -->", text, re.S).group(1)
    changed = re.sub(r"\d\.\d\d s", "9.99 s", table, count=1)
    assert changed != table
    assert generate.render(text.replace(table, changed)) == text


def test_ci_blocks_are_what_ci_runs():
    """.ci/run greps README.md for its two commands: they are the README's `ci` blocks, and it runs them."""
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'bash -c "$test_cmd' in ci and 'bash -c "$demo_cmd"' in ci
    lines = (ROOT / "README.md").read_text().splitlines()
    venv = [line for line in lines if "python3 -m venv" in line]
    test_cmd = next(line for line in venv if "pip install torch==2.13.0 -e '.[test]'" in line)
    demo_cmd = next(line for line in venv if "usp-video demo" in line)
    ci_commands = [c for f, _, marker, body in BLOCKS if marker == "ci" for c in commands(body)]
    assert test_cmd in ci_commands and demo_cmd in ci_commands
    assert all(c in (test_cmd, demo_cmd) for c in ci_commands), ci_commands


def _usp_commands(marker_set: set[str]) -> list[tuple[str, list[str]]]:
    found = []
    for b in BLOCKS:
        if b[2] in marker_set:
            for c in commands(b[3]):
                words = words_of(c)
                if words and words[0] == "usp-video":
                    found.append((block_id(b), words[1:]))
    return found


@pytest.mark.parametrize("where,argv", _usp_commands(PARSED), ids=lambda x: x if isinstance(x, str) else None)
def test_commands_that_need_what_ci_lacks_parse(where, argv):
    """A usp-video command that needs a GPU, real weights or a server still has only flags the CLI knows."""
    from usp_video.distributed.cli import build_parser

    parser = build_parser()
    try:
        parser.parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{where}: usp-video {' '.join(argv)} does not parse (exit {exc.code})")
    # argparse takes a prefix of a flag (--shard-weight for --shard-weights): the docs must spell it whole
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[argv[0]]
    flags = {w.split("=")[0] for w in argv if w.startswith("--")}
    assert flags <= set(sub._option_string_actions), \
        f"{where}: usp-video {argv[0]} has no {sorted(flags - set(sub._option_string_actions))}"


def _benchmark_commands() -> list[tuple[str, str, list[str]]]:
    found = []
    for b in BLOCKS:
        if b[2] == "benchmark":
            for c in commands(b[3]):
                words = words_of(c)
                assert words[0] in ("python", "python3") and words[1].startswith("benchmarks/"), (block_id(b), c)
                found.append((block_id(b), words[1], [w for w in words[2:] if w.startswith("--")]))
    return found


def test_benchmark_commands_name_real_flags():
    """Benchmarks are not run in CI: each script exists and its --help lists the flags the docs give it."""
    helps: dict[str, str] = {}
    for where, script, flags in _benchmark_commands():
        assert (ROOT / script).is_file(), f"{where}: no {script}"
        if flags and script not in helps:
            run = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                                 timeout=120, cwd=ROOT)
            assert run.returncode == 0, run.stderr
            helps[script] = run.stdout
        known = set(re.findall(r"--[\w-]+", helps.get(script, "")))
        missing = [f for f in flags if f.split("=")[0] not in known]
        assert missing == [], f"{where}: {script} has no {missing}"


RUN_BLOCKS = [b for b in BLOCKS if b[2] == ""]


@pytest.mark.parametrize("block", RUN_BLOCKS, ids=block_id)
def test_commands_run(block, tmp_path):
    """The plain blocks run for real (with this Python's usp-video and python first on PATH), each command in
    the scratch folder shared by its block; a command that fails fails the test with its output."""
    for name in ("docs", "benchmarks", "workflows"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for command in commands(block[3]):
        run = subprocess.run(["bash", "-c", f"set -euo pipefail; {command}"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, (f"{block_id(block)}: `{command}` exited {run.returncode}\n"
                                     f"{run.stdout[-2000:]}\n{run.stderr[-2000:]}")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_the_pages_resolve():
    """Every relative link of README.md and docs/ names a file that exists, and a heading that does."""
    anchors = {}
    for path in DOC_FILES:
        text = FENCE.sub("", path.read_text())
        anchors[path.resolve()] = {_slug(m.group(1)) for m in re.finditer(r"^#+ (.*)$", text, re.M)}
    broken = []
    for path in DOC_FILES:
        for m in re.finditer(r"\]\(([^)#\s]*)(#[^)\s]*)?\)", path.read_text()):
            target, anchor = m.group(1), m.group(2)
            if target.startswith(("http://", "https://")):
                continue
            resolved = (path.parent / target).resolve() if target else path.resolve()
            if not resolved.exists():
                broken.append(f"{path.name}: {target}")
            elif anchor and resolved.suffix == ".md" and anchor[1:] not in anchors.get(resolved, set()):
                broken.append(f"{path.name}: {target}{anchor}")
    assert broken == [], f"broken links: {broken}"


def test_every_shipped_workflow_and_family_is_in_the_docs():
    """The README's model table names every shipped UI workflow, and docs/models.md has a section per family (a new
    workflow or family without them fails here: add its row and its section)."""
    from usp_video.distributed.models import FAMILIES

    readme = (ROOT / "README.md").read_text()
    missing = [p.stem for p in sorted((ROOT / "workflows").glob("*.json")) if f"`{p.stem}`" not in readme]
    assert missing == [], f"README.md's model table does not name the workflows {missing}"
    headings = re.findall(r"^## (.*)$", FENCE.sub("", (ROOT / "docs" / "models.md").read_text()), re.M)
    no_section = [f.label for f in FAMILIES.values() if not any(h.startswith(f.label) for h in headings)]
    assert no_section == [], f"docs/models.md has no section for {no_section} (a '## <label> ...' heading)"


def test_images_are_small():
    big = [(p.name, p.stat().st_size) for p in (ROOT / "docs").rglob("*") if p.suffix.lower() in (".png", ".jpg")
           and p.stat().st_size > 300_000]
    assert big == [], f"images over 300 KB in docs/: {big}"


def test_every_node_is_in_the_reference():
    """docs/reference.md's node table has a row for every node the pack registers, but the deprecated ids."""
    from usp_video.nodes import NODE_LIST

    reference = (ROOT / "docs" / "reference.md").read_text()
    schemas = [node.define_schema() for node in NODE_LIST]
    missing = [s.display_name for s in schemas if not s.is_deprecated and f"**{s.display_name}**" not in reference]
    assert missing == [], f"docs/reference.md's node table lacks {missing}"


def _troubleshooting_table() -> str:
    text = (ROOT / "README.md").read_text()
    return text[text.index("## Troubleshooting"):text.index("## Known limitations")]


def _as_pattern(quote: str) -> str:
    """An abridged message as a regex: `...` stands for anything, R, N, X, Y and NAME for one word."""
    pattern = ".*".join(re.escape(part.strip()) for part in quote.split("..."))
    return re.sub(r"\b(R|N|X|Y|NAME)\b", r"\\S+", pattern)


def _cases():
    """(the README's quote, a call giving the code's message) for the rows a CPU machine can provoke."""
    from usp_video.distributed import cards, postmortem
    from usp_video.distributed.launcher import visible_gpus
    from usp_video.distributed.parallel.mesh import resolve_degrees
    from usp_video.nodes.group_node import parse_gpus

    log = Path("/tmp/usp-video-group-x/group.log")
    report = {"rank": 1, "error_type": "DistBackendError", "message": "Watchdog caught collective operation timeout",
              "time": 0.0}
    return [
        ("ulysses=8 does not divide the model's 12 attention heads. Valid choices for 8 ranks and 12 heads: ...",
         lambda: resolve_degrees(8, 12, 8, "auto")),
        ("ulysses x ring = 2 x 2 = 4, but the group has 2 ranks", lambda: resolve_degrees(2, 12, 2, 2)),
        ("device 'cuda' was chosen but no CUDA/ROCm GPU is visible; choose device 'cpu'", lambda: parse_gpus("all", 0)),
        ("gpus lists [4], but this machine has 4 GPU(s): 0, 1, 2, 3", lambda: parse_gpus("4", 4)),
        ("rank R of N failed: ...", lambda: postmortem._rank_failed([report], 2, 600.0, log)),
        ("A collective waited longer than timeout_s=600 s", lambda: postmortem._rank_failed([report], 2, 600.0, log)),
        ("usp-video groups do not run on native Windows: the ranks' GPU collectives need NCCL, ...",
         lambda: cards.check_platform("Windows")),
        ("the group's GPUs differ (...): every step waits for the slowest card, GPU N (NAME ...",
         lambda: cards.mixed_warning([cards.Card(0, "NVIDIA GeForce RTX 5090", 32 << 30, (12, 0), 170, 2407000),
                                      cards.Card(1, "NVIDIA GeForce RTX 4090", 24 << 30, (8, 9), 128, 2520000)])),
        ("gpus lists [2], but CUDA_VISIBLE_DEVICES=3,5 shows this process 2 GPU(s): use indices 0..1",
         lambda: visible_gpus((0, 2), "3,5")),
        ("rank R of N died (killed by SIGKILL); the group was stopped.",
         lambda: postmortem._rank_died(2, [1], "rank       : 1 (local_rank: 1)\n  exitcode   : -9 (pid: 1)\n", log)),
    ]


def test_troubleshooting_quotes_the_real_messages():
    """The README's troubleshooting rows quote what the code says: each case below is provoked here and its
    message must match the row's abridged quote (which must be in the table)."""
    table = _troubleshooting_table()
    for quote, call in _cases():
        assert f"`{quote}`" in table, f"the troubleshooting table no longer quotes {quote!r}"
        try:
            message = call()  # a warning is returned, an error raised
        except ValueError as exc:
            message = str(exc)
        assert re.search(_as_pattern(quote), message, re.S), f"README quotes {quote!r}; the code says {message!r}"


def test_the_model_table_weights_are_the_planners():
    """The README's "DiT weights (bf16)" column: 2 bytes a parameter of the planner's model (within 10%)."""
    from usp_video.distributed.planner import MODELS

    rows = {"Wan 2.1 T2V 1.3B": "wan-1.3b", "Wan 2.1 T2V 14B": "wan-14b", "Wan 2.2 TI2V-5B": "wan2.2-5b",
            "HunyuanVideo T2V": "hunyuan", "Wan 2.2 T2V A14B": "wan2.2-a14b"}
    table = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| ")]
    for label, key in rows.items():
        row = next((line for line in table if line.startswith(f"| {label}")), None)
        assert row is not None, f"README's model table has no {label!r} row"
        quoted = float(re.findall(r"~(\d+(?:\.\d+)?) GB", row)[-1])
        expected = MODELS[key].params * 2 / 1e9
        assert abs(quoted - expected) <= 0.1 * expected, f"{label}: README says ~{quoted} GB, the planner {expected:.1f}"
