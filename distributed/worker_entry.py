"""Script that torch.distributed.run starts on every rank.

It is run by path, so it first makes sure the pack is importable as `usp_video` (it is when
pip-installed; when the pack only sits in ComfyUI's custom_nodes folder, its folder is
registered under that name), then hands over to usp_video.distributed.worker.
"""

import importlib.util
import os
import sys

if importlib.util.find_spec("usp_video") is None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("usp_video", os.path.join(root, "__init__.py"),
                                                  submodule_search_locations=[root])
    module = importlib.util.module_from_spec(spec)
    sys.modules["usp_video"] = module
    spec.loader.exec_module(module)

from usp_video.distributed.worker import main  # noqa: E402

if __name__ == "__main__":
    main()
