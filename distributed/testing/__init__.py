"""Test and benchmark infrastructure that ships with the pack but is no part of a run.

spawn.py starts N local gloo ranks and runs one function on each (the parity tests under tests/ and the
benchmarks under benchmarks/ use it). Nothing in the runtime (engine, worker, client, nodes) imports it.
"""
