"""Linear layers that read their weights at the machine's rate (measurements in CLAUDE.md).

- Projections of the same input are fused (q, k, v; gate, up): one matmul reads one larger matrix
  instead of several small ones, where each call's start-up cost weighs. The original modules become
  views of the fused weights (no extra memory), so Transformers' own forward (media prefill) still works.
- bf16 on a CPU with AMX: weights are packed once into AMX tiles and every projection, any number of
  rows, goes through our kernel (native.py, amx_rows.c): it reads the weights at the memory rate where
  torch's bf16 kernels read at about half, and a row's result does not depend on its batch. A tied
  embedding reads its rows from the packed lm_head. Without AMX: `torch.mv` for one row (faster than
  bf16 `linear` here), `linear` for more.
- `QUANTIZATION=int8`: int8 weights with one scale per output channel (weight-only: activations bf16)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from . import native

log = logging.getLogger("qwenserve.engine")


class PackedLinear(nn.Module):
    """A linear over AMX-packed weights (see native.py): bf16, or int8 with per-output fp32 scales."""

    def __init__(self, packed: torch.Tensor, bias: torch.Tensor | None, scales: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.bias = bias
        self.out_features = packed.shape[0] * native.TILE_OUTPUTS
        self.in_features = packed.shape[1] * native.TILE_INPUTS

    @classmethod
    def pack(cls, linear: nn.Linear) -> PackedLinear:
        return cls(native.pack(linear.weight), linear.bias)

    @classmethod
    def pack_int8(cls, linear: nn.Linear) -> PackedLinear:
        qweight, scales = quantize_int8(linear.weight)
        return cls(native.pack(qweight), linear.bias, scales.float())

    def rows(self, start: int, stop: int) -> PackedLinear:
        """The projection of output channels start..stop (multiples of 16), sharing this one's memory."""
        bias = None if self.bias is None else self.bias[start:stop]
        scales = None if self.scales is None else self.scales[start:stop]
        return PackedLinear(self.packed[start // native.TILE_OUTPUTS: stop // native.TILE_OUTPUTS], bias, scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = native.matmul(self.packed, x.reshape(-1, self.in_features).to(torch.bfloat16), self.scales)
        out = out.view(*x.shape[:-1], self.out_features)
        out = out if self.bias is None else out + self.bias.to(out.dtype)
        return out.to(x.dtype)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (int8 weights, bf16 scales)."""
    weight = weight.detach().float()
    scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    qweight = torch.round(weight / scales[:, None]).clamp(-128, 127).to(torch.int8)
    return qweight, scales.to(torch.bfloat16)


class PackedEmbedding(nn.Module):
    """An embedding tied to a packed lm_head: its rows are read from the packed weights."""

    def __init__(self, lm_head: PackedLinear):
        super().__init__()
        self.lm_head = lm_head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return native.gather(self.lm_head.packed, ids).view(*ids.shape, self.lm_head.in_features)


class RowLinear(nn.Module):
    """A bias-free bf16 linear on a CPU without AMX: matrix-vector for one row, `linear` otherwise."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight  # shared, not copied (tied embeddings stay tied)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == self.in_features:
            return torch.mv(self.weight, x.reshape(-1)).view(*x.shape[:-1], self.out_features)
        return nn.functional.linear(x, self.weight)


class Int8Linear(nn.Module):
    """Weight-only int8: symmetric per-output-channel scales; the matmul takes bf16 activations."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.bias = bias
        self.out_features, self.in_features = qweight.shape

    @classmethod
    def quantize(cls, linear: nn.Linear) -> Int8Linear:
        return cls(*quantize_int8(linear.weight), linear.bias)

    def rows(self, start: int, stop: int) -> Int8Linear:
        """The projection of output channels start..stop, sharing this one's memory."""
        bias = None if self.bias is None else self.bias[start:stop]
        return Int8Linear(self.qweight[start:stop], self.scales[start:stop], bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = torch.ops.aten._weight_int8pack_mm(rows, self.qweight, self.scales)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)


class Fused(nn.Module):
    """Several projections of the same input as one matmul; returns their outputs, split."""

    def __init__(self, projection: nn.Module, sizes: list[int]):
        super().__init__()
        self.projection, self.sizes = projection, sizes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.projection(x).split(self.sizes, dim=-1)


def prepare_linears(text: nn.Module, owner: nn.Module, quantization: str) -> str:
    """Fuse and swap the text model's projections for the fastest measured kernels; each layer gets
    `qkv` and `gate_up` (Fused). Returns the quantization done. int8 leaves lm_head in bf16 (the
    logits' precision matters most for sampling)."""
    weight = text.layers[0].self_attn.q_proj.weight
    if quantization == "int8" and weight.device.type != "cpu":
        log.warning("QUANTIZATION=int8 is implemented for the CPU only; weights stay %s", weight.dtype)
        quantization = "none"
    for layer in text.layers:
        attn, mlp = layer.self_attn, layer.mlp
        layer.qkv = _fuse(attn, ("q_proj", "k_proj", "v_proj"), quantization)
        layer.gate_up = _fuse(mlp, ("gate_proj", "up_proj"), quantization)
        attn.o_proj = _kernel(attn.o_proj, quantization)
        mlp.down_proj = _kernel(mlp.down_proj, quantization)
    tied = owner.lm_head.weight is text.embed_tokens.weight
    owner.lm_head = _kernel(owner.lm_head, "none")
    if tied and isinstance(owner.lm_head, PackedLinear):
        text.embed_tokens = PackedEmbedding(owner.lm_head)
    return quantization


def in_use(model: nn.Module) -> str:
    """"amx" where the projections run on our packed kernel, else "torch" (for /health)."""
    return "amx" if any(isinstance(m, PackedLinear) for m in model.modules()) else "torch"


def _fuse(parent: nn.Module, names: tuple[str, ...], quantization: str) -> Fused:
    parts = [getattr(parent, name) for name in names]
    weight = torch.cat([part.weight.detach() for part in parts])
    biases = [part.bias for part in parts]
    bias = None if any(b is None for b in biases) else torch.cat([b.detach() for b in biases])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    fused.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    whole_tiles = all(part.out_features % native.TILE_OUTPUTS == 0 for part in parts)  # for the views
    projection = _kernel(fused, quantization, pack=whole_tiles)
    start = 0
    for name, part in zip(names, parts):
        stop = start + part.out_features
        setattr(parent, name, _view(projection, part, start, stop))
        start = stop
    return Fused(projection, [part.out_features for part in parts])


def _view(projection: nn.Module, part: nn.Linear, start: int, stop: int) -> nn.Module:
    """The original projection as rows start..stop of the fused one."""
    if isinstance(projection, (Int8Linear, PackedLinear)):
        return projection.rows(start, stop)
    part.weight = nn.Parameter(projection.weight[start:stop], requires_grad=False)
    if part.bias is not None:
        part.bias = nn.Parameter(projection.bias[start:stop], requires_grad=False)
    return _kernel(part, "none")


def _kernel(linear: nn.Linear, quantization: str, pack: bool = True) -> nn.Module:
    if quantization == "int8":
        if pack and native.packable(linear.weight, torch.int8):
            return PackedLinear.pack_int8(linear)
        return Int8Linear.quantize(linear)
    if pack and native.packable(linear.weight):
        return PackedLinear.pack(linear)
    if linear.bias is None and linear.weight.dtype == torch.bfloat16 and linear.weight.device.type == "cpu":
        return RowLinear(linear)
    return linear
