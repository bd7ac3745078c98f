"""usp-video: one video on several GPUs from ComfyUI (Unified Sequence Parallelism).

ComfyUI imports this file from custom_nodes/<folder>/, often under a name that is not
`usp_video` (e.g. "ComfyUI-usp-video"). Workers, tests and the CLI always import the package
as `usp_video`; so that no module is ever loaded twice under two names, a foreign import
registers this folder as `usp_video` (unless it is pip-installed) and re-exports from there.
"""

import importlib.util
import os
import sys

if __name__ == "usp_video":
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    if importlib.util.find_spec("usp_video") is None:
        _here = os.path.dirname(os.path.abspath(__file__))
        _spec = importlib.util.spec_from_file_location(
            "usp_video", os.path.join(_here, "__init__.py"), submodule_search_locations=[_here])
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["usp_video"] = _module
        _spec.loader.exec_module(_module)
    from usp_video.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

# The page extension that shows the group's state on the USP Group node (web/js/usp_status.js).
WEB_DIRECTORY = "./web"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
