"""spm_core: the concept-SemiPermeable Membrane engine, free of any ComfyUI import.

file_format  read/write/validate membrane files
membrane     one membrane's weights and the fused per-layer math
stack        binding membranes to a model, gate context and forward hooks
transport    Facilitated Transport gates from conditioning
training     Latent Anchoring training against a small model protocol

ComfyUI imports this folder as part of the pack (`<pack>.spm_core`), scripts as `spm_core`: two
copies of the same code. No module keeps state the other would need to see (a stack carries its own
gate context), so either copy drives objects the other made; each copy has its own exception
classes, so code around the pack's nodes catches the pack's `spm_core.errors`.
"""
