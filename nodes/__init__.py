"""ComfyUI nodes of the SPM pack: thin adapters over spm_core."""

from comfy_api.latest import ComfyExtension, io

from .export import MergeSPMIntoModel, SaveSPMAsLoRA
from .inspect import SPMTransportInspector
from .load import LoadSPM, SPMTextEncode
from .train import TrainSPM


class SPMExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [LoadSPM, SPMTextEncode, SPMTransportInspector, SaveSPMAsLoRA, MergeSPMIntoModel, TrainSPM]
