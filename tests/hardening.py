"""Counts for the hardening summary that conftest prints at the end of a run (one module object,
imported by the tests and by conftest alike)."""

HARDENING = {"inputs tried": 0, "faults injected": 0, "frames fuzzed": 0, "failures": 0, "orphans": 0}
