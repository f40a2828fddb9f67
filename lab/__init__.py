"""The development lab: the miniature world's research harness, the erasure benchmark's library,
and the tools the scripts and tests share (the ComfyUI host, a server driver, tiny test assets).
The pack's `nodes/` and `spm_core/` never import it; the shipped example is `miniworld/`."""
