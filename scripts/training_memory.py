"""What training a membrane on a full-size Flux.1-dev holds in memory, with and without gradient
checkpointing, counted tensor by tensor on ComfyUI's own Flux class built on the meta device
(shapes and dtypes, no weights and no arithmetic: it runs in seconds on any machine).

One training iteration's call with gradients is counted: the rows the membrane is on for (with the
default settings 6: the target, 2 contexts, the empty prompt and 2 anchors), each a 512 px latent
(1024 image tokens) beside ComfyUI's 256 T5 tokens, bf16 activations, the membrane in fp32 on every
layer SPM Train Membrane binds. *Kept for backward* is every tensor autograd saves that is not a
weight, as the trainer keeps it (on Flux each saved activation is a copy: the blocks add their
residuals in place). With checkpointing a block's insides are kept only while it is recomputed in
backward, one block at a time: the largest block's count is added as the peak. Attention is counted
as PyTorch's flash kernel keeps it on a GPU (q, k, v, its output and the log-sum-exp); ComfyUI's CPU
attention would keep more. Not counted: the CUDA allocator's slack and kernels' workspaces, the
gradients of one block's activations in flight, the text encoders (each prompt is encoded once before
training; ComfyUI can offload them), and the membrane with its optimiser state (a few MB).

    python scripts/training_memory.py              # 512 px, 1 and 6 rows
    python scripts/training_memory.py --pixels 1024 --rows 1
    python scripts/training_memory.py --miniature 100   # the time checkpointing costs, on the miniature worlds
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: the repository, for lab
from lab.full_size import FLUX_DEV, FLUX_TEXT_TOKENS  # noqa: E402
from lab.host import use_host  # noqa: E402

GB = 1e9
DEFAULT_ROWS = 6  # target + 2 contexts + the empty prompt + 2 anchors: TrainingConfig's defaults


class _FlashAttention:
    """Attention that keeps for backward what PyTorch's flash kernel keeps (meta device: no arithmetic)."""

    def __init__(self, torch) -> None:
        class Kept(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, v):
                batch, heads, tokens, width = q.shape
                out = torch.empty(batch, tokens, heads * width, dtype=q.dtype, device=q.device)
                log_sum_exp = torch.empty(batch, heads, tokens, dtype=torch.float32, device=q.device)
                ctx.save_for_backward(q, k, v, out, log_sum_exp)
                return out

            @staticmethod
            def backward(ctx, gradient):
                q, k, v, _, _ = ctx.saved_tensors
                return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        self.kept = Kept

    def __call__(self, q, k, v, heads, skip_reshape=True, mask=None, transformer_options=None, **_):
        return self.kept.apply(q, k, v)


@contextlib.contextmanager
def flash_attention():
    import comfy.ldm.flux.math
    import torch

    original = comfy.ldm.flux.math.optimized_attention
    comfy.ldm.flux.math.optimized_attention = _FlashAttention(torch)
    try:
        yield
    finally:
        comfy.ldm.flux.math.optimized_attention = original


def measure(stored, rows: int, pixels: int, checkpointing: bool, single_blocks: bool) -> dict[str, float]:
    """Bytes of weights, bytes kept for backward after the forward, and the most one block kept of it."""
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    from lab.pack_loader import pack_module

    training, core = pack_module("nodes.training"), pack_module("spm_core.training")
    config = comfy.supported_models.Flux(dict(FLUX_DEV))
    config.set_inference_dtype(stored, None if stored == torch.bfloat16 else torch.bfloat16)
    model = config.get_model({}, device="meta")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    modules = training.trained_layers(patcher, single_blocks)
    membrane = core.TrainableMembrane.for_modules(modules, rank=1, alpha=1.0, seed=0).to("meta")
    dit = model.diffusion_model
    weights = {id(p) for p in dit.parameters()} | {id(p) for p in membrane.parameters()}
    kept, per_block, opened = [0], [], []

    def pack(saved):
        if id(saved) not in weights and id(saved._base) not in weights:  # a weight or a view of one is no new memory
            kept[0] += saved.numel() * saved.element_size()
        return saved

    blocks = [*dit.double_blocks, *dit.single_blocks]
    handles = [b.register_forward_pre_hook(lambda *_: opened.append(kept[0])) for b in blocks]
    handles += [b.register_forward_hook(lambda *_: per_block.append(kept[0] - opened.pop())) for b in blocks]
    membrane.attach(modules, pack_module("nodes.architectures").text_stream_blocks(model))
    side = pixels // 8
    meta = dict(device="meta", dtype=torch.bfloat16)
    recompute = training.checkpointed_blocks(dit, membrane, contextlib.nullcontext) if checkpointing \
        else contextlib.nullcontext()
    try:
        with torch.inference_mode(False), torch.enable_grad(), flash_attention(), training.frozen_weights(dit), recompute, \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved):
            membrane.enabled = True
            dit(torch.zeros(rows, 16, side, side, **meta), torch.zeros(rows, device="meta"),
                context=torch.zeros(rows, FLUX_TEXT_TOKENS, FLUX_DEV["context_in_dim"], **meta),
                y=torch.zeros(rows, FLUX_DEV["vec_in_dim"], **meta), guidance=torch.zeros(rows, device="meta"))
    finally:
        membrane.detach()
        for handle in handles:
            handle.remove()
    return {"weights": sum(p.numel() * p.element_size() for p in dit.parameters()), "kept": kept[0],
            "block": max(per_block)}


def miniature_times(iterations: int) -> None:
    """Seconds per iteration of the miniature worlds' default training, without and with checkpointing,
    and how far apart the two membranes end (the same membrane up to float rounding)."""
    import tempfile
    import time

    import torch

    from lab.harness import Lab

    print(f"miniature worlds, default training settings, {iterations} iterations (snowman), {torch.get_num_threads()} threads")
    print(f"{'world':6s} {'checkpointing':>13s} {'s / iteration':>13s} {'largest weight difference':>26s}")
    for world in ("unet", "dit"):
        lab = Lab(world=world, membrane_dir=tempfile.mkdtemp(prefix="spm_memory_"))
        training, file_format = lab.pack("nodes.training"), lab.pack("spm_core.file_format")
        trained = {}
        for checkpointing in (False, True):
            path = os.path.join(lab.membrane_dir, f"snowman-{checkpointing}.safetensors")
            config = lab.training_config(iterations=iterations, gradient_checkpointing=checkpointing)
            started = time.perf_counter()
            with torch.inference_mode(False):
                training.train(lab.model, lab.clip, training.TrainingRequest(["snowman"], [], "", config, path))
            seconds = (time.perf_counter() - started) / iterations
            trained[checkpointing] = file_format.load_membrane(path).layers
            difference = max(float((layer.up - trained[False][n].up).abs().max()) for n, layer in trained[checkpointing].items())
            print(f"{world:6s} {'on' if checkpointing else 'off':>13s} {seconds:13.3f} {difference:26.2e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pixels", type=int, default=512, help="picture side (latent side x 8)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, DEFAULT_ROWS],
                        help="rows with gradients per iteration (default settings: 6)")
    parser.add_argument("--single-blocks", action="store_true", help="a membrane on the single blocks' text tokens too")
    parser.add_argument("--miniature", type=int, metavar="ITERATIONS",
                        help="instead: time the miniature worlds' training without and with checkpointing")
    options = parser.parse_args()
    use_host(cpu=True)
    import torch

    if options.miniature:
        miniature_times(options.miniature)
        return

    single_block = measure(torch.bfloat16, 1, options.pixels, False, options.single_blocks)["block"]
    print(f"Flux.1-dev (ComfyUI's class on the meta device), {options.pixels} px: {(options.pixels // 16) ** 2} image + "
          f"{FLUX_TEXT_TOKENS} text tokens per row; bf16 activations; the largest block keeps "
          f"{single_block / GB:.2f} GB per row")
    header = f"{'weights':8s} {'rows':>4s} {'checkpointing':>13s} {'weights GB':>10s} {'kept GB':>8s} {'peak GB':>8s}"
    print(header)
    print("-" * len(header))
    for label, stored in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
        for rows in options.rows:
            plain = measure(stored, rows, options.pixels, False, options.single_blocks)
            # checkpointed, the largest block's insides (counted in the plain pass) are held while it is recomputed
            for checkpointing, counted in ((False, plain), (True, measure(stored, rows, options.pixels, True, options.single_blocks))):
                peak = counted["weights"] + counted["kept"] + (plain["block"] if checkpointing else 0)
                print(f"{label:8s} {rows:4d} {'on' if checkpointing else 'off':>13s} {counted['weights'] / GB:10.1f} "
                      f"{counted['kept'] / GB:8.1f} {peak / GB:8.1f}", flush=True)


if __name__ == "__main__":
    main()
