"""`python benchmarks/planner_check.py [--out FILE]`: the planner's predictions beside the published multi-GPU
figures (distributed/published.py: each series calibrated on its own 1-GPU figure alone), the issue's out-of-sample
points (#33) marked within 10% or missed. Writes benchmarks/results/planner.json. No GPU needed: it is arithmetic."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from usp_video.distributed import published


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "planner.json")
    args = parser.parse_args(argv)
    print(published.table())
    report = {}
    for series in published.SERIES:
        flops, rows = published.predict(series)
        report[series.label] = {
            "source": series.source, "note": series.note, "link": series.link, "calibrated_tflops": flops / 1e12,
            "rows": [{"gpus": r.gpus, "published": r.published, "predicted": round(r.predicted, 3),
                      "error": round(r.error, 4), "plan": r.plan, "verdict": published.verdict(r)} for r in rows]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
