"""The membrane math: one membrane's per-layer weights, and the fused stack that applies any
number of membranes to one layer in a single pass.

A membrane adds `s · up(down(x))` to a layer's output, `s = alpha / rank`. Several membranes on
one layer are stacked: D (R x in) holds every membrane's down rows, U (out x R) every up column,
and a per-row gate matrix G (rows x R) scales each membrane's columns, so

    y = W x + ((x Dᵀ) ⊙ G) Uᵀ

which is exactly the sum of the membranes' own branches: no cross-terms, strength linear in the
gate. The official code instead scales both up and down by the gate (effect ∝ gate²); that is
available as `GateLaw.PAPER_SQUARED`.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .concepts import Concept
from .errors import SPMError


class GateLaw(enum.Enum):
    """How a gate turns into branch strength."""

    LINEAR = "linear"
    """strength ∝ gate: what the formula in the paper describes."""
    PAPER_SQUARED = "paper_squared"
    """strength ∝ gate²: what the official code does (it scales both lora_up and lora_down)."""
    OFFICIAL_MERGE = "official_merge"
    """What the official code does with a whole chain: every membrane's down and up scaled by its
    gate and summed into one adapter per layer (`official_merge`): gate² for one membrane,
    cross-terms up_i · down_j for several. Rank-1 membranes (what SPM trains)."""

    def apply(self, gates: torch.Tensor) -> torch.Tensor:
        return gates * gates if self is GateLaw.PAPER_SQUARED else gates


@dataclass
class LayerWeights:
    """One adapted layer of one membrane. `down` is (rank, in), `up` is (out, rank), both fp32
    matrices; `conv` records that the layer is a 1x1 convolution (SD1.x proj_in/proj_out)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    conv: bool = False

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta_weight(self) -> torch.Tensor:
        """The membrane's weight change at gate 1, as an (out, in) matrix."""
        return self.scale * (self.up @ self.down)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """This one membrane's output at gate 1, `alpha/rank · up(down(x))`, differentiable in
        down and up (training uses it; inference uses the fused stack)."""
        if self.conv:  # (rows, in, H, W) as channel matrices
            h = torch.matmul(self.down, x.flatten(2))
            return (self.scale * torch.matmul(self.up, h)).reshape(x.shape[0], self.up.shape[0], *x.shape[2:])
        return self.scale * ((x @ self.down.t()) @ self.up.t())


@dataclass
class Membrane:
    """A concept membrane: what it erases and its weights per layer, keyed by the layer's
    file name (`lora_unet_<diffusers path with _>`)."""

    name: str
    concepts: tuple[Concept, ...]
    layers: dict[str, LayerWeights]
    architecture: str
    metadata: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max(layer.rank for layer in self.layers.values())

    @property
    def parameter_count(self) -> int:
        return sum(layer.down.numel() + layer.up.numel() for layer in self.layers.values())

    @property
    def concept_labels(self) -> list[str]:
        return [c.target if c.surrogate is None else f"{c.target} → {c.surrogate}" for c in self.concepts]


def bake(membranes: list[tuple[Membrane, float]], name: str) -> Membrane:
    """One static membrane equal to the sum of the given membranes at fixed strengths: their ranks
    are concatenated (no cross-terms) and each one's strength · alpha/rank is folded into its ups,
    so the result has alpha = rank (scale 1) and reads as a plain LoRA."""
    parts: dict[str, list[tuple[LayerWeights, float]]] = {}
    for membrane, strength in membranes:
        for layer_name, layer in membrane.layers.items():
            parts.setdefault(layer_name, []).append((layer, strength))
    layers = {}
    for layer_name, weighted in parts.items():
        down = torch.cat([layer.down for layer, _ in weighted])
        up = torch.cat([layer.up * (strength * layer.scale) for layer, strength in weighted], dim=1)
        layers[layer_name] = LayerWeights(down=down, up=up, alpha=float(down.shape[0]), conv=weighted[0][0].conv)
    concepts = tuple(c for membrane, _ in membranes for c in membrane.concepts)
    architectures = {membrane.architecture for membrane, _ in membranes}
    return Membrane(name=name, concepts=concepts, layers=layers,
                    architecture=architectures.pop() if len(architectures) == 1 else "unknown")


def official_merge(membranes: Sequence[Membrane], gates: Sequence[float], name: str = "official merge") -> Membrane:
    """What the official inference code applies for several membranes at once: every membrane's
    down and up scaled by its gate and summed into ONE adapter per layer. The product of the sums
    has cross-terms up_i · down_j (a wrong combination, kept only to measure it); with one
    membrane it is the gate² law."""
    layers = {}
    for layer_name in membranes[0].layers:
        parts = [m.layers[layer_name] for m in membranes]
        layers[layer_name] = LayerWeights(down=sum(g * p.down for g, p in zip(gates, parts)),
                                          up=sum(g * p.up for g, p in zip(gates, parts)),
                                          alpha=parts[0].alpha, conv=parts[0].conv)
    return Membrane(name=name, concepts=(), layers=layers, architecture=membranes[0].architecture)


class FusedLayer:
    """All membranes bound to one model layer, stacked into D (R x in) and U (out x R).

    `column_owner[r]` is the index (in the stack's membrane list) of the membrane that owns
    column r; `alpha / rank` is folded into U once here so that the per-call work is only the
    gate. Device/dtype copies are cached so a hot loop never converts weights twice.
    """

    def __init__(self, parts: list[tuple[int, LayerWeights]], text_tokens_only: bool = False) -> None:
        self.conv = parts[0][1].conv
        # a Flux single-block layer: its input is the text tokens, then the image tokens; only the
        # text tokens get the branch (add_to_text_tokens)
        self.text_tokens_only = text_tokens_only
        self.down = torch.cat([w.down for _, w in parts], dim=0).contiguous()
        self.up = torch.cat([w.up * w.scale for _, w in parts], dim=1).contiguous()
        self.column_owner = torch.cat(
            [torch.full((w.rank,), index, dtype=torch.long) for index, w in parts]
        )
        # The usual stack (rank-1 membranes that all cover this layer, in order) has column r
        # owned by membrane r: the per-call gate expansion is then skipped.
        self._owner_is_identity = torch.equal(self.column_owner, torch.arange(self.column_owner.shape[0]))
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def in_features(self) -> int:
        return self.down.shape[1]

    @property
    def out_features(self) -> int:
        return self.up.shape[0]

    def weights_on(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = (device, dtype)
        if key not in self._cache:
            self._cache[key] = (
                self.down.to(device=device, dtype=dtype),
                self.up.to(device=device, dtype=dtype),
                self.column_owner.to(device=device),
            )
        return self._cache[key]

    def forget_device_copies(self) -> None:
        self._cache.clear()

    def _column_gates(self, gates: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """Per-membrane gates (..., membranes) -> per-column gates (..., R)."""
        if self._owner_is_identity and gates.shape[-1] == owner.shape[0]:
            return gates
        return gates.index_select(-1, owner)

    def delta(self, x: torch.Tensor, row_gates: torch.Tensor) -> torch.Tensor:
        """The fused branch output for input `x`, whose first dim is the batch row.

        `row_gates` is (rows, membranes_in_stack): the effective gate of each membrane for each
        row (already including strength and the gate law). Linear inputs are (rows, ..., in);
        1x1-conv inputs (rows, in, H, W) are used as channel matrices without permuting.
        Out of place, so autograd can differentiate through it.
        """
        down, up, owner = self.weights_on(x.device, x.dtype)
        gates = self._column_gates(row_gates.to(device=x.device, dtype=x.dtype), owner)  # rows x R
        rows = x.shape[0]
        if self.conv:
            h = torch.bmm(gates.unsqueeze(-1) * down, x.reshape(rows, self.in_features, -1))  # rows x R x HW
            return torch.matmul(up, h).reshape(rows, self.out_features, *x.shape[2:])
        h = torch.matmul(x.reshape(rows, -1, self.in_features), down.t()) * gates.unsqueeze(1)  # rows x N x R
        return torch.matmul(h, up.t()).reshape(*x.shape[:-1], self.out_features)

    def merged_delta(self, x: torch.Tensor, gates: torch.Tensor, strengths: torch.Tensor) -> torch.Tensor:
        """GateLaw.OFFICIAL_MERGE's branch: per row, (Σ s_i g_i up_i)(Σ g_i down_i) x, from the raw
        gates (rows, membranes) and strengths (membranes,). Rank-1 membranes only."""
        down, up, owner = self.weights_on(x.device, x.dtype)
        if owner.shape[0] != owner.unique().shape[0]:
            raise SPMError("the official code's merge is defined for rank-1 membranes only")
        gates = gates.to(device=x.device, dtype=x.dtype)
        merged_down = self._column_gates(gates, owner) @ down  # rows x in
        merged_up = self._column_gates(gates * strengths.to(gates), owner) @ up.t()  # rows x out
        rows = x.shape[0]
        if self.conv:
            h = torch.einsum("ri,rip->rp", merged_down, x.reshape(rows, self.in_features, -1))
            return (merged_up[:, :, None] * h[:, None, :]).reshape(rows, self.out_features, *x.shape[2:])
        h = (x.reshape(rows, -1, self.in_features) * merged_down[:, None, :]).sum(-1)  # rows x N
        return (h[:, :, None] * merged_up[:, None, :]).reshape(*x.shape[:-1], self.out_features)

    def add_to(self, output: torch.Tensor, x: torch.Tensor, row_gates: torch.Tensor,
               open_rows: slice | None = None) -> torch.Tensor:
        """`output + delta`. When autograd does not need the original output (and it is a
        contiguous tensor of x's dtype, as Linear and Conv2d outputs are), the branch is
        accumulated into `output` in place, and only for `open_rows` if given (rows outside it
        must have all-zero gates: they are left untouched)."""
        if not output.is_contiguous() or output.dtype != x.dtype or _tracked(output, x, self.down, self.up, row_gates):
            return output + self.delta(x, row_gates)
        if open_rows is None:
            self._accumulate_(output, x, row_gates)
        else:
            self._accumulate_(output[open_rows], x[open_rows], row_gates[open_rows])
        return output

    def add_to_text_tokens(self, output: torch.Tensor, x: torch.Tensor, row_gates: torch.Tensor,
                           text_tokens: int) -> torch.Tensor:
        """`output` with the branch added to its first `text_tokens` tokens (dim 1) only; the image
        tokens after them are left exactly as they are. In place unless autograd needs the original."""
        delta = self.delta(x[:, :text_tokens], row_gates)
        if _tracked(output, x, self.down, self.up, row_gates):
            return torch.cat([output[:, :text_tokens] + delta, output[:, text_tokens:]], dim=1)
        output[:, :text_tokens] += delta
        return output

    def _accumulate_(self, output: torch.Tensor, x: torch.Tensor, row_gates: torch.Tensor) -> None:
        # No intermediate as large as the output exists: the second product is added into
        # `output` by BLAS itself (beta = 1), so the output is read and written once.
        down, up, owner = self.weights_on(x.device, x.dtype)
        gates = self._column_gates(row_gates.to(device=x.device, dtype=x.dtype), owner)  # rows x R
        rows = x.shape[0]
        if self.conv:
            gated_down = gates.unsqueeze(-1) * down  # rows x R x in: the gate folded into D once
            h = torch.bmm(gated_down, x.reshape(rows, self.in_features, -1))  # rows x R x HW
            output.view(rows, self.out_features, -1).baddbmm_(up.expand(rows, -1, -1), h)
            return
        # One plain GEMM over all rows, then the gate on the small (rows·N x R) product: a
        # batched product with a per-row gated D is 2-3x slower on CPU for rank 1.
        h = torch.mm(x.reshape(-1, self.in_features), down.t())
        h.view(rows, -1, h.shape[1]).mul_(gates.unsqueeze(1))
        output.view(-1, self.out_features).addmm_(h, up.t())

    def folded_weight(self, weight: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """The static-gate fast path: `W + U diag(g) D` as a new tensor shaped like `weight`
        ((out, in) Linear or (out, in, 1, 1) conv); `weight` is not modified.

        `gates` (membranes_in_stack,) are effective gates (strength and gate law included) that
        hold for every row and step, so the layer can run without a hook. Computed in fp32 and
        rounded once to the weight's dtype.
        """
        if self.text_tokens_only:
            raise SPMError("a membrane on a Flux single block acts on the text tokens only, which no weight can express")
        down, up, owner = self.weights_on(weight.device, torch.float32)
        column_gates = self._column_gates(gates.to(device=weight.device, dtype=torch.float32), owner)
        base = weight.detach().reshape(self.out_features, self.in_features).float()
        return torch.addmm(base, up * column_gates, down).to(weight.dtype).reshape(weight.shape)


def _tracked(*tensors: torch.Tensor) -> bool:
    """Whether autograd records the hook's work (then the original output must survive)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
