"""Full-size model configurations, as ComfyUI's model detection gives them, for the scripts that
measure on the meta device or on single real blocks (scripts/benchmark.py, scripts/training_memory.py)."""

# Flux.1-dev as ComfyUI's model detection configures it
FLUX_DEV = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
            "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19, "depth_single_blocks": 38,
            "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True}
FLUX_TEXT_TOKENS = 256  # ComfyUI pads Flux's T5 prompt to 256 tokens
