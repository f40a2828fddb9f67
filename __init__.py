"""SPM (concept-SemiPermeable Membranes) for ComfyUI. Registered through the V3 node API."""

from .nodes import SPMExtension
from .nodes.paths import register_folder

WEB_DIRECTORY = "./web"

register_folder()


async def comfy_entrypoint() -> SPMExtension:
    return SPMExtension()
