"""The one-GPU check (`python benchmarks/gpu_check.py`, or `python -m gpu_check` from benchmarks/): are the
attention kernels right on this device, how fast is a Wan step with each backend, and what memory does it take.
__main__.py says what each section measures and holds the command line.

Layout: one module per section, each with run(ctx) -> its part of the report and show(result, ctx) -> its
printed table, beside each other so a number and the line that prints it are read together:
kernels (1), step (2), fp8 (3), fit (4), memory (5), kernel_timing (6), comfyui (7). common.py holds what they
share (the run's Context: settings, deadline, report, save). __main__.py runs the sections in order within the
time budget, each in try/except, saves the report after each, and prints the tables last.
"""
