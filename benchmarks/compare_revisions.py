"""Two revisions of the pack side by side in one run: benchmarks/cpu_bench.py of each, alternated.

    python benchmarks/compare_revisions.py BEFORE [--after WORKTREE] [--rounds 2] [--out FILE]

BEFORE is a git revision of this repository (checked out into a temporary worktree); the after side is this
working tree (or --after). Each round runs the before side's cpu_bench, then the after side's, so that drift in
the machine's speed hits both alike; each side imports its own tree as `usp_video` (a link on PYTHONPATH, which
Python searches before the editable install). Prints each figure of both sides and the after/before ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# (label, path into cpu_bench's JSON, better when higher)
FIGURES = [
    ("2 ranks vs 1, Ulysses 2 (speedup)", ("a_scaling", "ulysses2", "speedup_vs_1_rank"), True),
    ("2 ranks vs 1, Ring 2 (speedup)", ("a_scaling", "ring2", "speedup_vs_1_rank"), True),
    ("world size 1 / stock diffusers (time ratio)", ("d_degree_one", "ratio_ours_over_stock"), False),
    ("sidecar overhead per sampler call (ms)", ("c_sidecar", "overhead_ms_per_call"), False),
    ("latent channel, 480p latent (GB/s)", ("c_sidecar", "transfers", "latent_480p_81f", "gb_per_s"), True),
    ("latent channel, 720p latent (GB/s)", ("c_sidecar", "transfers", "latent_720p_81f", "gb_per_s"), True),
    ("conditioning 512x4096 (GB/s)", ("c_sidecar", "transfers", "conditioning_512x4096", "gb_per_s"), True),
]


def run_bench(tree: Path, out: Path, links: Path) -> dict:
    """cpu_bench.py --quick of one tree, importing that tree as usp_video."""
    link_dir = links / tree.name
    link_dir.mkdir(parents=True, exist_ok=True)
    if not (link_dir / "usp_video").exists():
        (link_dir / "usp_video").symlink_to(tree.resolve(), target_is_directory=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(link_dir), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, str(tree / "benchmarks" / "cpu_bench.py"), "--quick", "--out", str(out)],
                   env=env, check=True, cwd=tree)
    return json.loads(out.read_text())


def value(report: dict, path: tuple[str, ...]) -> float:
    for key in path:
        report = report[key]
    return float(report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", help="a git revision of this repository")
    parser.add_argument("--after", type=Path, default=REPO, help="the tree to compare (default: this one)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write both sides' figures here as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="usp-video-compare-") as tmp:
        tmp = Path(tmp)
        before = tmp / "before"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(before), args.before],
                       check=True)
        try:
            runs = {"before": [], "after": []}
            for i in range(args.rounds):
                for side, tree in (("before", before), ("after", args.after)):
                    print(f"=== round {i + 1}: {side}", flush=True)
                    runs[side].append(run_bench(tree, tmp / f"{side}-{i}.json", tmp / f"links-{side}"))
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(before)], check=False)
    rows = []
    print(f"\n{'figure':<46}{'before':>10}{'after':>10}{'after/before':>14}")
    for label, path, higher in FIGURES:
        b = statistics.median(value(r, path) for r in runs["before"])
        a = statistics.median(value(r, path) for r in runs["after"])
        rows.append({"figure": label, "before": b, "after": a, "after_over_before": a / b, "higher_is_better": higher})
        print(f"{label:<46}{b:>10.3f}{a:>10.3f}{a / b:>13.2f}x")
    if args.out:
        args.out.write_text(json.dumps({"before": args.before, "rounds": args.rounds, "figures": rows}, indent=2))


if __name__ == "__main__":
    main()
