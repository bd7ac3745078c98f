"""The shared harness of the ComfyUI reference modules: `python -m comfyui_reference NAME COMFYUI_DIR FILES_JSON`.

Starts ComfyUI's modules on the CPU (before any of them is imported), runs NAME's compare(files) and prints its
result as the last line of stdout, one JSON object (test_comfyui_native.run_reference reads it).
"""

import importlib
import json
import sys

from .common import start_comfy


def main(name: str, comfy_dir: str, files_json: str) -> None:
    start_comfy(comfy_dir)
    module = importlib.import_module(f".{name}", __package__)
    print(json.dumps(module.compare(json.loads(files_json))))


if __name__ == "__main__":
    main(*sys.argv[1:4])
