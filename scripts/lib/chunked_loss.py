"""A causal LM's training loss taken from its final hidden states chunk by chunk, never the whole logits at once.

Transformers' loss materialises the logits of the whole micro-batch, casts them to fp32 and keeps the
log-softmax for the backward pass: for 12 x 512 tokens and Llama 3's 128,256-token vocabulary that is
1.6 GB of bf16 logits plus 3.2 GB for each fp32 copy, most of the memory of a QLoRA step. Here each chunk
of tokens gets its logits, its loss and its gradient towards the hidden states in one go (lm_head is
frozen, so the hidden states are the only thing that needs a gradient); only that gradient is kept.

The arithmetic is Transformers' own (logits in the model's dtype, then fp32 for the log-softmax), so the loss
differs only in the order of the fp32 sum, and the gradient in where one bf16 rounding falls (1/label_count is
applied after the gradient towards the hidden states, not before it).
"""
from __future__ import annotations

import torch

# Architectures whose logits are exactly lm_head(final norm output): no soft-capping (Gemma 2/3) or scale.
PLAIN_HEAD_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
CHUNK_TOKENS = 2048  # 2048 x 128,256 fp32 logits = 1.05 GB at a time


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum over tokens of cross_entropy(hidden @ weight.T, labels), labels == -100 ignored; weight frozen."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk].to(weight.dtype), labels[start:start + chunk]
            logits = (h @ weight.T).float()
            keep = y != -100
            target = y.clamp_min(0)
            log_probs = torch.log_softmax(logits, dim=-1)
            total += -(log_probs.gather(1, target[:, None]).squeeze(1) * keep).sum()
            probs = log_probs.exp_()  # d loss / d logits = softmax - one_hot, on the kept tokens
            probs[torch.arange(len(y), device=y.device), target] -= 1
            probs *= keep[:, None]
            grad[start:start + chunk] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None


def causal_lm_loss(hidden: torch.Tensor, lm_head: torch.nn.Linear, labels: torch.Tensor, label_count: int,
                   chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """Transformers' causal-LM loss with num_items_in_batch=label_count: position t predicts labels[t + 1]."""
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    flat = hidden.reshape(-1, hidden.shape[-1])
    return _LinearCrossEntropySum.apply(flat, lm_head.weight, shifted.reshape(-1), chunk) / label_count


class FinalHidden:
    """Catches the output of the decoder's final norm (the input of lm_head) on each forward call."""

    def __init__(self, model):
        decoder = model.get_decoder()
        self.value = None
        self.handle = decoder.norm.register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        self.value = output

    def take(self) -> torch.Tensor:
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError("the model's final norm did not run")
        return value


def supports_chunked_loss(model) -> bool:
    """True where the logits are lm_head(final norm): a plain Linear head over the decoder's `norm`."""
    head = model.get_output_embeddings()
    return (model.config.model_type in PLAIN_HEAD_MODEL_TYPES and type(head) is torch.nn.Linear
            and head.bias is None and hasattr(model.get_decoder(), "norm"))
