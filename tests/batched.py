"""Many parity cases in one spawn per world size.

A parametrized parity test used to spawn its N ranks once per case; most of that time went into
starting processes (importing torch and diffusers on every rank). `Batched` runs all the cases of
one world size in one spawn, the first time a test asks for one of them, and hands each test the
per-rank results of its own case; the assertions stay in the tests, one per case. Every case builds
its own Engine and process groups inside the same ranks, as a fresh spawn would.
"""

import json

from usp_video.distributed.testing.spawn import run_ranks


def _key(case: dict) -> str:
    return json.dumps(case, sort_keys=True)


class Batched:
    def __init__(self, tests_dir, target: str, cases: list[tuple[int, dict]], timeout_per_case: float = 60.0):
        """target: a function of parity_targets.py; cases: (world_size, kwargs) for every case."""
        self.tests_dir, self.target, self.cases = tests_dir, target, cases
        self.timeout_per_case = timeout_per_case
        self.results: dict[tuple[int, str], list[dict]] = {}

    def __call__(self, world_size: int, **case) -> list[dict]:
        """The per-rank results of one case (running its world size's batch first if needed)."""
        if (world_size, _key(case)) not in self.results:
            batch = [kwargs for n, kwargs in self.cases if n == world_size]
            assert case in batch, f"case {case} on {world_size} ranks is not in the batch"
            ranks = run_ranks(f"{self.tests_dir}/parity_targets.py:run_cases", world_size,
                              dict(target=self.target, cases=batch), timeout=30 + self.timeout_per_case * len(batch))
            for i, kwargs in enumerate(batch):
                prefix = f"{i}/"
                self.results[(world_size, _key(kwargs))] = [
                    {k[len(prefix):]: v for k, v in result.items() if k.startswith(prefix)} for result in ranks]
        return self.results[(world_size, _key(case))]
