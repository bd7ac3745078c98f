"""usp-video: one video on several GPUs from ComfyUI (Unified Sequence Parallelism).

ComfyUI imports this file from custom_nodes/<folder>/, often under a name that is not
`usp_video` (e.g. "ComfyUI-usp-video"). Workers, tests and the CLI always import the package
as `usp_video`; so that no module is ever loaded twice under two names, a foreign import
registers this folder as `usp_video` (unless it is pip-installed) and hands on from there.

The nodes (V3 schema) reach ComfyUI through `comfy_entrypoint`; they are imported only when
ComfyUI calls it, so that the CLI's workers, which import this package too, never load them.
"""

import importlib.util
import os
import sys

if __name__ != "usp_video" and importlib.util.find_spec("usp_video") is None:
    _here = os.path.dirname(os.path.abspath(__file__))
    _spec = importlib.util.spec_from_file_location(
        "usp_video", os.path.join(_here, "__init__.py"), submodule_search_locations=[_here])
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["usp_video"] = _module
    _spec.loader.exec_module(_module)


async def comfy_entrypoint():
    """ComfyUI's V3 entry point: the pack's extension, with every node (usp_video.nodes)."""
    from usp_video.nodes import comfy_entrypoint as entrypoint

    return await entrypoint()


# The page extension that shows the group's state on the USP Group node (web/js/usp_status.js).
WEB_DIRECTORY = "./web"
__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
