"""Membrane cost on a full-size SD1.5 UNet built from ComfyUI's classes (the speed targets: docs/speed.md).

Prints one table: the fused stack at 1/5/20/50 membranes, one branch per membrane (the naive
baseline), an all-zero gate batch, the static-gate fold, and the Facilitated Transport gate
computation, each beside its target (docs/speed.md).

Forwards of the bare model and of every case run interleaved, round by round (the order
rotates each round). Measures per case:
  hook ratio  1 + (CPU time inside the membrane hook bodies during a forward) / (bare forward
              CPU time), medians; the hook bodies are timed in this script, not in the library.
  A/B CPU     median forward CPU time of the case over that of the bare model.
  A/B wall    the same with wall-clock time: what the speed targets ask for, and what a busy
              machine (tests running beside it) skews most.

    python scripts/benchmark.py               # 64x64 latent, 5 rounds: ~8 min on 2 idle cores
    python scripts/benchmark.py --quick       # 32x32 latent, 3 rounds: ~1.5 min
    python scripts/benchmark.py --threads 1   # steadier when other processes share the cores
    python scripts/benchmark.py --flux        # Flux.1-dev instead (below)

Flux.1-dev (--flux; issue 17): the full model (12B parameters) is built on the meta device, for its
membrane layers only (txt_in, the text stream of its 19 double blocks, linear1 and linear2 of its 38
single blocks); one double block and one single block are built for real at full width (3072, 24
heads) from the same ComfyUI classes. The fused cases run on the real double block, one prompt row
(Flux.1-dev samples at CFG 1), its 256 T5 tokens (ComfyUI pads Flux's prompt to 256) beside the image
tokens of a 512 px picture (--quick: 256 px); the single block's hooks (on its 256 text tokens only)
are timed on the real single block. The hook ratio of the whole model is projected from the blocks:
1 + (19 x hook time per double block + 38 x per single block) / (19 x bare double block + 38 x bare
single block); txt_in (256 tokens, one layer) and the model's small input and output layers are left
out of both.

COMFYUI_ROOT selects the host tree (default ~/.cache/spm-comfy-host/ComfyUI).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: the repository, for lab
from lab.full_size import FLUX_DEV, FLUX_TEXT_TOKENS  # noqa: E402
from lab.host import REPO, use_host  # noqa: E402

use_host()
sys.path.insert(0, os.path.join(REPO, "tests"))  # the tests' membrane helpers build the benchmark's membranes

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from membrane_helpers import key_map_of, modules_of, random_membrane, shapes_of  # noqa: E402

from spm_core.file_format import FLUX_LAYER, is_text_token_layer  # noqa: E402
from spm_core.membrane import FusedLayer, Membrane  # noqa: E402
from spm_core.stack import InstalledHooks, MembraneStack, MembraneUse  # noqa: E402
from spm_core.transport import ConceptEmbedding, Transport, TransportMode  # noqa: E402

# The real SD1.5 UNet (ComfyUI builds output blocks from the end of transformer_depth_output).
SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_middle": 1, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "context_dim": 768, "use_linear_in_transformer": False, "adm_in_channels": None, "use_spatial_transformer": True,
    "legacy": False, "use_temporal_resblock": False, "use_temporal_attention": False,
}
COUNTS = (1, 5, 20, 50)
FUSED_TARGET = {1: "<= 1.01x", 5: "<= 1.015x", 20: "<= 1.025x (wall <= 1.05x)", 50: "<= 1.045x"}
NAIVE_REFERENCE = {20: "probe: 1.5-1.7x", 50: "probe: 2.3-3.1x"}
FOLD_COUNT = 20
ZERO_LABEL = f"all-zero gates, {max(COUNTS)} membranes"


@dataclass
class Case:
    """One way to run the model; `arm` is a context manager that applies it around a forward.
    Times are (wall, cpu) seconds: per round for the forward, per run for the hook bodies."""

    label: str
    short: str
    target: str
    arm: Callable[[], contextlib.AbstractContextManager]
    rounds: int
    runs: dict[int, tuple[float, float]] = field(default_factory=dict)
    hooks: list[tuple[float, float]] = field(default_factory=list)
    output: torch.Tensor | None = None


def now() -> tuple[float, float]:
    """(wall, cpu) clocks. CPU time is the process's, all threads: a process that another one
    pushes off the cores does not accrue it, so it holds steady on a busy machine."""
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = now()
    return wall - start[0], cpu - start[1]


class HookClock:
    """Accumulates the (wall, cpu) time spent inside membrane hook bodies."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def timed(self, hook: Callable) -> Callable:
        def wrapper(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            start = now()
            try:
                return hook(module, inputs, output)
            finally:
                wall, cpu = since(start)
                self.wall += wall
                self.cpu += cpu

        return wrapper


class TimedHooks(InstalledHooks):
    """The library's hooks with each body timed (the timing stays out of the library)."""

    def __init__(self, stack: MembraneStack, clock: HookClock) -> None:
        super().__init__(stack)
        self.clock = clock

    def _hook_for(self, layer: FusedLayer) -> Callable:
        return self.clock.timed(super()._hook_for(layer))


def init_weights_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """N(0, 1/fan_in) weights, small biases, unit norms, so activations stay O(1) through the whole
    depth (garbage or exploding values could change the kernels' speed)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            is_norm = isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm))
            for name, param in module.named_parameters(recurse=False):
                if is_norm or name == "scale":  # Flux's QK RMSNorm keeps its gain in `scale`
                    param.fill_(1.0 if name in ("weight", "scale") else 0.0)
                elif name == "bias":
                    param.normal_(0.0, 0.01, generator=generator)
                else:
                    param.normal_(0.0, param[0].numel() ** -0.5, generator=generator)
    return model


def build_unet(seed: int) -> torch.nn.Module:
    """A ComfyUI SD1.5 BaseModel with init_weights_."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    model = comfy.supported_models.SD15(dict(SD15_UNET)).get_model({})
    init_weights_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def naive_hooks(membranes: list[Membrane], key_map: dict[str, str], modules: dict[str, torch.nn.Module],
                gates: torch.Tensor, clock: HookClock) -> list:
    """The baseline the fused stack replaces: one hook per membrane per layer, each adding
    `g · s · up(down(x))` out of place, as a LoRA module per membrane does."""
    handles = []
    for index, membrane in enumerate(membranes):
        for name, layer in membrane.layers.items():
            gate = gates[:, index] * layer.scale

            def hook(module, inputs, output, layer=layer, gate=gate):
                x = inputs[0]
                if layer.conv:
                    branch = F.conv2d(F.conv2d(x, layer.down[:, :, None, None]), layer.up[:, :, None, None])
                    return output + gate.view(-1, 1, 1, 1) * branch
                return output + gate.view(-1, *([1] * (x.ndim - 1))) * F.linear(F.linear(x, layer.down), layer.up)

            handles.append(modules[key_map[name]].register_forward_hook(clock.timed(hook)))
    return handles


@contextlib.contextmanager
def fused(stack: MembraneStack, modules: dict[str, torch.nn.Module], gates: torch.Tensor, clock: HookClock,
          text_streams: tuple[torch.nn.Module, ...] = ()) -> Iterator[None]:
    hooks = TimedHooks(stack, clock)
    hooks.install(modules, text_streams)
    try:
        with stack.gates_active(gates):
            yield
    finally:
        hooks.remove()


@contextlib.contextmanager
def naive(membranes: list[Membrane], key_map: dict[str, str], modules: dict[str, torch.nn.Module],
          gates: torch.Tensor, clock: HookClock) -> Iterator[None]:
    with removed_after(naive_hooks(membranes, key_map, modules, gates, clock)):
        yield


@contextlib.contextmanager
def output_pass(modules: dict[str, torch.nn.Module], clock: HookClock) -> Iterator[None]:
    """The floor of any output hook: each target output read and written once more, no math."""
    with removed_after([module.register_forward_hook(clock.timed(lambda module, inputs, output: output.add_(0.0)))
                        for module in modules.values()]):
        yield


@contextlib.contextmanager
def removed_after(handles: list) -> Iterator[None]:
    """Hook handles removed when the block ends, however it ends."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def folded(modules: dict[str, torch.nn.Module], weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Swap the folded weights in (no hooks), and the untouched originals back afterwards."""
    originals = {key: modules[key].weight for key in weights}
    for key, weight in weights.items():
        modules[key].weight = torch.nn.Parameter(weight, requires_grad=False)
    try:
        yield
    finally:
        for key, weight in originals.items():
            modules[key].weight = weight


def time_transport(membranes: int, seed: int) -> tuple[float, float]:
    """Microseconds per Transport.gates call in paper mode: median of 7 batches of 50 calls,
    on 2 rows of (77, 768) conditioning with token ids, against `membranes` x 1 concept."""
    generator = torch.Generator().manual_seed(seed)
    concepts = [[ConceptEmbedding(torch.randn(77, 768, generator=generator), frozenset({1000 + m, 2000 + m}))]
                for m in range(membranes)]
    transport = Transport(concepts, TransportMode.PAPER)
    rows = torch.randn(2, 77, 768, generator=generator)
    row_tokens = [frozenset({1000, 5, 6, 7}), frozenset()]
    transport.gates(rows, row_tokens)
    batches = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(50):
            transport.gates(rows, row_tokens)
        batches.append((time.perf_counter() - start) / 50 * 1e6)
    return statistics.median(batches), min(batches)


def hooked_case(clocks: dict[str, HookClock], label: str, short: str, target: str, rounds_for: int,
                make: Callable[[HookClock], contextlib.AbstractContextManager]) -> Case:
    """A case whose hooks report their time to its own clock in `clocks`."""
    clock = clocks.setdefault(label, HookClock())
    return Case(label, short, target, lambda: make(clock), rounds_for)


def hook_cases(clocks: dict[str, HookClock], stacks: dict[int, MembraneStack], modules: dict[str, torch.nn.Module],
               gates: torch.Tensor, rounds: int) -> list[Case]:
    """The cases every model's table has: fused stacks of COUNTS membranes at `gates` (rows x most), the
    floor (one pass over the outputs) and the largest stack with every gate 0."""
    most = max(COUNTS)
    cases = [hooked_case(clocks, f"fused, {n} membranes", f"fused{n}", FUSED_TARGET[n], rounds,
                         lambda clock, n=n: fused(stacks[n], modules, gates[:, :n], clock)) for n in COUNTS]
    cases.append(hooked_case(clocks, "floor: one pass over outputs", "floor", "(reference: the cost of any output hook)",
                             max(1, rounds // 2), lambda clock: output_pass(modules, clock)))
    cases.append(hooked_case(clocks, ZERO_LABEL, "zero", "~1.00x (early exit)", max(1, rounds // 2),
                             lambda clock: fused(stacks[most], modules, torch.zeros(gates.shape[0], most), clock)))
    return cases


def run_rounds(cases: list[Case], bare: Case, forward: Callable[[], torch.Tensor], clocks: dict[str, HookClock],
               rounds: int) -> None:
    for round_index in range(rounds):
        due = [case for case in [bare, *cases] if round_index < case.rounds]
        shift = round_index % len(due)
        for case in due[shift:] + due[:shift]:  # rotate so no case always runs first or last
            clock = clocks.get(case.label)
            before = (clock.wall, clock.cpu) if clock else None
            with case.arm():
                start = now()
                out = forward()
                case.runs[round_index] = since(start)
            if clock:
                case.hooks.append((clock.wall - before[0], clock.cpu - before[1]))
            if case.output is None:
                case.output = out
        bare_wall = bare.runs[round_index][0]
        print(f"  round {round_index + 1}/{rounds}: bare {bare_wall:.2f} s; wall ratios "
              + " ".join(f"{c.short} {c.runs[round_index][0] / bare_wall:.3f}" for c in cases if round_index in c.runs),
              flush=True)


def median_ratio(case: Case, bare: Case, clock: int) -> float:
    """Median forward time of this case over the bare model's. Medians of the two interleaved
    series rather than per-round pairs: a case with one or two runs would otherwise inherit
    whatever disturbed its round's single bare run."""
    return statistics.median(run[clock] for run in case.runs.values()) / statistics.median(run[clock] for run in bare.runs.values())


def print_table(cases: list[Case], bare: Case) -> None:
    bare_wall = statistics.median(run[0] for run in bare.runs.values())
    bare_cpu = statistics.median(run[1] for run in bare.runs.values())
    walls = [run[0] for run in bare.runs.values()]
    print(f"\nbare forward: median {bare_wall:.2f} s wall, {bare_cpu:.2f} s CPU over {len(walls)} runs "
          f"(wall min {min(walls):.2f}, max {max(walls):.2f})")
    header = (f"{'case':30s} {'hook ratio':>10s} {'hook ms':>8s} {'A/B CPU':>8s} {'A/B wall':>8s} {'runs':>4s}"
              "   target")
    print(header)
    print("-" * (len(header) + 10))
    for case in cases:
        if case.hooks:
            hook_cpu = statistics.median(cpu for _, cpu in case.hooks)
            hook_cells = f"{1 + hook_cpu / bare_cpu:9.4f}x {hook_cpu * 1e3:8.1f}"
        else:
            hook_cells = f"{'no hooks':>10s} {'-':>8s}"
        print(f"{case.label:30s} {hook_cells} {median_ratio(case, bare, 1):7.3f}x {median_ratio(case, bare, 0):7.3f}x "
              f"{len(case.runs):4d}   {case.target}")


def flux_blocks(seed: int) -> tuple[dict[str, str], torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """Flux.1-dev on the meta device: its membrane layers (file name -> module key, from ComfyUI's own
    LoRA key map), and its first double block, first single block and rotary embedder (no weights),
    the two blocks made real with init_weights_."""
    import comfy.lora
    import comfy.supported_models

    model = comfy.supported_models.Flux(dict(FLUX_DEV)).get_model({}, device="meta")
    key_map = {name: key[: -len(".weight")] for name, key in comfy.lora.model_lora_keys_unet(model, {}).items()
               if isinstance(key, str) and (FLUX_LAYER.match(name) or is_text_token_layer(name))}
    dit = model.diffusion_model
    double, single = (init_weights_(block.to_empty(device="cpu"), seed + i)
                      for i, block in enumerate((dit.double_blocks[0], dit.single_blocks[0])))
    return key_map, double, single, dit.pe_embedder


def flux_main(rounds: int, pixels: int) -> None:
    """The Flux.1-dev case of the module docstring."""
    started = time.perf_counter()
    key_map, double, single, pe_embedder = flux_blocks(seed=0)
    depth, single_depth, width = FLUX_DEV["depth"], FLUX_DEV["depth_single_blocks"], FLUX_DEV["hidden_size"]
    # the first double block's layers, named by their path inside the block
    prefix = "diffusion_model.double_blocks.0."
    block_map = {name: key[len(prefix):] for name, key in key_map.items() if key.startswith(prefix)}
    modules = {path: double.get_submodule(path) for path in block_map.values()}
    shapes = shapes_of(modules)
    most = max(COUNTS)
    membranes = [random_membrane(block_map, modules, seed=100 + i, target=f"concept{i}", std=0.05) for i in range(most)]
    stacks = {n: MembraneStack([MembraneUse(m) for m in membranes[:n]], block_map, shapes) for n in COUNTS}
    single_prefix = "diffusion_model.single_blocks.0."
    single_map = {name: key[len(single_prefix):] for name, key in key_map.items() if key.startswith(single_prefix)}
    single_modules = {path: single.get_submodule(path) for path in single_map.values()}
    single_membranes = [random_membrane(single_map, single_modules, seed=200 + i, target=f"concept{i}", std=0.05)
                        for i in range(most)]
    single_stacks = {n: MembraneStack([MembraneUse(m) for m in single_membranes[:n]], single_map, shapes_of(single_modules))
                     for n in COUNTS}

    generator = torch.Generator().manual_seed(1)
    side = pixels // 16  # 8x VAE, 2x2 patches
    img = torch.randn(1, side * side, width, generator=generator)
    txt = torch.randn(1, FLUX_TEXT_TOKENS, width, generator=generator)
    vec = torch.randn(1, width, generator=generator)
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    ids = torch.cat([torch.zeros(1, FLUX_TEXT_TOKENS, 3), img_ids.reshape(1, -1, 3)], dim=1)
    pe = pe_embedder(ids)
    gates = torch.rand(1, most, generator=generator) * 0.7 + 0.3

    def forward() -> torch.Tensor:  # the blocks add their residuals in place: fresh inputs every call
        return torch.cat(double(img=img.clone(), txt=txt.clone(), vec=vec, pe=pe), dim=1)

    def forward_single() -> torch.Tensor:
        return single(torch.cat([txt, img], dim=1), vec=vec, pe=pe)

    load = os.getloadavg()[0]
    print(f"SPM membrane benchmark: Flux.1-dev ({len(key_map)} membrane layers on the meta-device model: txt_in, "
          f"{len(block_map)} per double block x {depth}, {len(single_map)} per single block x {single_depth}), "
          f"one real double block ({sum(p.numel() for p in double.parameters()) / 1e6:.0f}M "
          f"parameters, ComfyUI classes) and one real single block, fp32 CPU, {torch.get_num_threads()} threads, "
          f"{pixels} px: {side * side} image + {FLUX_TEXT_TOKENS} text tokens, 1 row, rank 1; set-up "
          f"{time.perf_counter() - started:.0f} s; load average {load:.2f} on {os.cpu_count()} CPUs", flush=True)

    clocks: dict[str, HookClock] = {}
    cases = hook_cases(clocks, stacks, modules, gates, rounds)
    bare = Case("bare double block", "bare", "", contextlib.nullcontext, rounds)
    forward()  # warm-up: first-touch allocations, kernel selection
    run_rounds(cases, bare, forward, clocks, rounds)
    print_table(cases, bare)

    def single_seconds() -> float:
        start = now()
        forward_single()
        return since(start)[1]

    def single_hook_seconds(n: int) -> float:
        """CPU inside the single block's hooks, its text tokens counted by the double block's output."""
        clock = HookClock()
        with fused(single_stacks[n], single_modules, gates[:, :n], clock, (double,)):
            forward()
            forward_single()
        return clock.cpu

    forward_single()
    single_cpu = statistics.median(single_seconds() for _ in range(max(1, rounds // 2)))
    single_hooks = {n: statistics.median(single_hook_seconds(n) for _ in range(max(1, rounds // 2))) for n in COUNTS}
    double_cpu = statistics.median(run[1] for run in bare.runs.values())
    by_label = {case.label: case for case in cases}
    print(f"bare single block: median {single_cpu:.2f} s CPU; the double blocks are "
          f"{depth * double_cpu / (depth * double_cpu + single_depth * single_cpu):.0%} of the blocks' time")
    print(f"{'whole model, projected':30s} hook ratio (19 double + 38 single blocks' hooks over their bare time)"
          f"   single block's hooks")
    for n in COUNTS:
        hook_cpu = statistics.median(cpu for _, cpu in by_label[f"fused, {n} membranes"].hooks)
        ratio = 1 + (depth * hook_cpu + single_depth * single_hooks[n]) / (depth * double_cpu + single_depth * single_cpu)
        print(f"  fused, {n:2d} membranes {ratio:9.4f}x   {FUSED_TARGET[n]}   {single_hooks[n] * 1e3:.1f} ms")
    print(f"checks: all-zero gates bit-identical to bare: {torch.equal(by_label[ZERO_LABEL].output, bare.output)}; "
          f"open membranes change the output: {not torch.equal(by_label[f'fused, {most} membranes'].output, bare.output)}")
    print(f"total {time.perf_counter() - started:.0f} s; load average now {os.getloadavg()[0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32x32 latent and 3 rounds (Flux: 256 px)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds for bare and fused (default 5, quick 3)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--flux", action="store_true", help="a full-width Flux.1-dev double block instead of SD1.5")
    options = parser.parse_args()
    if options.threads:
        torch.set_num_threads(options.threads)
    rounds = options.rounds or (3 if options.quick else 5)
    side = 32 if options.quick else 64
    torch.set_grad_enabled(False)  # as ComfyUI samples
    if options.flux:
        flux_main(rounds, 256 if options.quick else 512)
        return

    started = time.perf_counter()
    patcher = build_unet(seed=0)
    key_map = key_map_of(patcher)
    modules = modules_of(patcher, key_map)
    shapes = shapes_of(modules)
    most = max(COUNTS)
    membranes = [random_membrane(key_map, modules, seed=100 + i, target=f"concept{i}", std=0.05) for i in range(most)]
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, side, side, generator=generator)
    timestep = torch.full((2,), 500.0)
    context = torch.randn(2, 77, 768, generator=generator)
    # per-row gates that differ between the two rows (a CFG pair), all open
    gates = torch.rand(2, most, generator=generator) * 0.7 + 0.3
    unet = patcher.model.diffusion_model

    def forward() -> torch.Tensor:
        return unet(x, timestep, context=context)

    load = os.getloadavg()[0]
    print(f"SPM membrane benchmark: full-size SD1.5 UNet ({sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M "
          f"parameters, ComfyUI classes), fp32 CPU, {torch.get_num_threads()} threads, latent {side}x{side}, batch 2, "
          f"context (2, 77, 768), {len(key_map)} membrane layers, rank 1; set-up {time.perf_counter() - started:.0f} s; "
          f"load average {load:.2f} on {os.cpu_count()} CPUs", flush=True)
    if load > 1.5:
        print("  the machine is busy: wall times are skewed (CPU-time columns much less so); multi-threaded kernels "
              "stall when another process holds a core, so --threads 1 is steadier here", flush=True)

    clocks: dict[str, HookClock] = {}
    stacks = {n: MembraneStack([MembraneUse(m) for m in membranes[:n]], key_map, shapes) for n in COUNTS}
    cases = hook_cases(clocks, stacks, modules, gates, rounds)

    base_weights = {key: modules[key].weight for key in stacks[FOLD_COUNT].layers}
    base_sums = {key: weight.double().sum() for key, weight in base_weights.items()}
    fold_seconds = []
    for _ in range(3):
        start = time.perf_counter()
        folded_weights = stacks[FOLD_COUNT].folded_weights(base_weights, gates[0, :FOLD_COUNT])
        fold_seconds.append(time.perf_counter() - start)
    fold_bytes = sum(w.numel() * w.element_size() for w in folded_weights.values())
    cases.append(Case(f"static fold, {FOLD_COUNT} membranes", "fold", "~1.00x", lambda: folded(modules, folded_weights),
                      max(1, rounds // 2)))
    cases += [hooked_case(clocks, f"naive, {n} membranes", f"naive{n}", NAIVE_REFERENCE[n], 1,
                          lambda clock, n=n: naive(membranes[:n], key_map, modules, gates[:, :n], clock)) for n in (20, 50)]
    bare = Case("bare", "bare", "", contextlib.nullcontext, rounds)

    forward()  # warm-up: first-touch allocations, kernel selection
    run_rounds(cases, bare, forward, clocks, rounds)

    print_table(cases, bare)
    print(f"{'static fold time, 20 membranes':30s} {min(fold_seconds):8.3f} s wall (min of 3; a new copy of "
          f"{fold_bytes / 2**30:.2f} GiB of weights)   <= 0.5 s")
    median_us, best_us = time_transport(most, seed=2)
    print(f"{'gates: paper transport, 50x1':30s} {median_us:8.0f} µs per call (best {best_us:.0f}; 2 rows, token ids, "
          "uncached)   <= 1000 µs per model call")

    by_label = {case.label: case for case in cases}
    opened = by_label[f"fused, {most} membranes"]
    print(f"checks: all-zero gates bit-identical to bare: {torch.equal(by_label[ZERO_LABEL].output, bare.output)}; "
          f"open membranes change the output: {not torch.equal(opened.output, bare.output)}; "
          f"base weights untouched by the fold: {all(torch.equal(w.double().sum(), base_sums[k]) for k, w in base_weights.items())}")
    print(f"total {time.perf_counter() - started:.0f} s; load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
