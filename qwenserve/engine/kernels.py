"""Linear layers that read their weights at the machine's rate. Measured on the development CPU
(CLAUDE.md): torch's bf16 `linear` on one row reads ~12 GB/s, `torch.mv` on the same weights ~20 GB/s
(the fp32 rate), so a single-row bf16 projection goes through `mv`. `QUANTIZATION=int8` keeps int8
weights with one scale per output channel (weight-only: activations stay bf16)."""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger("qwenserve.engine")


class RowLinear(nn.Module):
    """A bias-free bf16 linear on the CPU: matrix-vector for a single row, `linear` otherwise."""

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

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.register_buffer("qweight", torch.round(weight / scales[:, None]).clamp(-128, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = torch.ops.aten._weight_int8pack_mm(rows, self.qweight, self.scales)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)


def text_linears(decoder_layers, lm_head_owner) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) of every projection in the text decoder, lm_head last."""
    found = []
    for layer in decoder_layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in parent.named_children():
                if isinstance(child, nn.Linear):
                    found.append((parent, name, child))
    found.append((lm_head_owner, "lm_head", lm_head_owner.lm_head))
    return found


def prepare_linears(decoder_layers, lm_head_owner, quantization: str) -> str:
    """Swap the text model's projections for the fastest measured kernels; returns what was done.
    int8 leaves lm_head in bf16 (the logits' precision matters most for sampling)."""
    linears = text_linears(decoder_layers, lm_head_owner)
    weight = linears[0][2].weight
    if quantization == "int8":
        if weight.device.type != "cpu":
            log.warning("QUANTIZATION=int8 is implemented for the CPU only; weights stay %s", weight.dtype)
            return "none"
        for parent, name, linear in linears[:-1]:
            setattr(parent, name, Int8Linear(linear))
        _row_linears(linears[-1:])
        return "int8"
    if weight.dtype == torch.bfloat16 and weight.device.type == "cpu":
        _row_linears(linears)
    return "none"


def _row_linears(linears) -> None:
    for parent, name, linear in linears:
        if linear.bias is None and linear.weight.dtype == torch.bfloat16 and linear.weight.device.type == "cpu":
            setattr(parent, name, RowLinear(linear))
