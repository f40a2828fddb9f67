"""SPM (concept-SemiPermeable Membranes) for ComfyUI. Registered through the V3 node API.

The pack's own nodes come from `nodes/`; the miniature world's loader (an example model for the
demo and the benchmark) is added beside them in its own "SPM examples" category."""

from .miniworld.comfy_nodes import EXAMPLE_NODES
from .nodes import SPMExtension
from .nodes.paths import register_folder

WEB_DIRECTORY = "./web"

register_folder()


class SPMPackExtension(SPMExtension):
    async def get_node_list(self):
        return await super().get_node_list() + EXAMPLE_NODES


async def comfy_entrypoint() -> SPMPackExtension:
    return SPMPackExtension()
