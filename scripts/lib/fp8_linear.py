"""Frozen linear layers whose matrix products run in FP8 (e4m3) with per-row scales, for LoRA training.

A LoRA step spends most of its time in the frozen base's products: forward, and backward to the activations
(the frozen weights take no gradient). On GPUs with FP8 tensor cores (compute capability 8.9+: Ada, Hopper,
Blackwell) those run at about twice the bf16 rate. Each frozen weight W (out x in) is kept twice in e4m3,
which together take the memory of one bf16 copy:
- rows: W scaled per output channel, for the forward product y = x W^T;
- cols: W^T stored contiguous and scaled per input channel, for the backward product dx = dy W.
Both products reduce along the weight's unscaled axis, so every scale factors out of the sum and
torch._scaled_mm applies it to the result. The activations (forward) and their gradients (backward) are
quantized per token on the fly, with the scale from that row's largest magnitude, so no value saturates.
The LoRA matrices, norms, embeddings and lm_head stay in their own dtype.
"""
from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (m, k) -> (e4m3 (m, k), fp32 scale (m, 1)) with x ~= q * scale; each row's largest magnitude maps to 448."""
    x = x.float()
    scale = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    return (x / scale).to(FP8), scale


def scaled_matmul(a: torch.Tensor, a_scale: torch.Tensor, b_rows: torch.Tensor, b_scale: torch.Tensor,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """(a * a_scale) @ (b_rows * b_scale)^T for e4m3 a (m, k) and b_rows (n, k), scales (m, 1) and (n, 1)."""
    return torch._scaled_mm(a, b_rows.t(), scale_a=a_scale, scale_b=b_scale.t(), out_dtype=out_dtype)


class _FrozenFp8Product(torch.autograd.Function):
    """x @ W^T with W given as its two e4m3 copies; the gradient flows to x only."""

    @staticmethod
    def forward(ctx, x, rows, rows_scale, cols, cols_scale):
        flat = x.reshape(-1, x.shape[-1])
        q, scale = quantize_rows(flat)
        ctx.save_for_backward(cols, cols_scale)
        ctx.x_shape = x.shape
        return scaled_matmul(q, scale, rows, rows_scale, x.dtype).reshape(*x.shape[:-1], rows.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        cols, cols_scale = ctx.saved_tensors
        q, scale = quantize_rows(grad_out.reshape(-1, grad_out.shape[-1]))
        return scaled_matmul(q, scale, cols, cols_scale, grad_out.dtype).reshape(ctx.x_shape), None, None, None, None


class Fp8FrozenLinear(torch.nn.Module):
    """Stands in for a frozen torch.nn.Linear (bias kept as it was); in and out features multiples of 16."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        rows, rows_scale = quantize_rows(weight)
        cols, cols_scale = quantize_rows(weight.t())
        self.register_buffer("rows", rows.contiguous(), persistent=False)
        self.register_buffer("rows_scale", rows_scale, persistent=False)
        self.register_buffer("cols", cols.contiguous(), persistent=False)
        self.register_buffer("cols_scale", cols_scale, persistent=False)
        self.bias = linear.bias
        self.compute_dtype = weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _FrozenFp8Product.apply(x.to(self.compute_dtype), self.rows, self.rows_scale, self.cols, self.cols_scale)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 per-row scales"


def has_fp8_tensor_cores() -> bool:
    """A CUDA GPU of compute capability 8.9+ (Ada, Hopper, Blackwell): where FP8 products are fast."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def convert_frozen_linears(root: torch.nn.Module) -> int:
    """Replace every frozen nn.Linear under root (not the trainable LoRA matrices) with Fp8FrozenLinear, freeing
    the 16-bit weight as it goes; returns how many were replaced."""
    count = 0
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if (type(child) is torch.nn.Linear and not child.weight.requires_grad
                    and child.in_features % 16 == 0 and child.out_features % 16 == 0):
                setattr(parent, name, Fp8FrozenLinear(child))
                count += 1
    return count
