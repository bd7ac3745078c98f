"""`python benchmarks/gpu_check.py [--device cpu --small] ...`: the one-GPU check. Its code is the gpu_check/
package beside this file (gpu_check/__main__.py says what it measures; --help prints the same)."""

from gpu_check.__main__ import main  # the package: a folder is found before a module of the same name

if __name__ == "__main__":
    main()
