"""spm_core: the concept-SemiPermeable Membrane engine, free of any ComfyUI import.

file_format  read/write/validate membrane files
membrane     one membrane's weights and the fused per-layer math
stack        binding membranes to a model, gate context and forward hooks
transport    Facilitated Transport gates from conditioning
"""
