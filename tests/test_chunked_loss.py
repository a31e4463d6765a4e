"""lib/chunked_loss.py gives Transformers' training loss and gradients without materialising the logits."""
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, Qwen2Config

from helpers import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from lib.chunked_loss import FinalHidden, causal_lm_loss, supports_chunked_loss  # noqa: E402

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def tiny(config_class, dtype):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_class(**SMALL), dtype=dtype)
    model.get_output_embeddings().weight.requires_grad_(False)  # frozen, as in LoRA training
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (3, 11), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt
    labels[2, 8:] = -100  # padding at the end of the last row
    mask = (labels != -100) | (torch.arange(11) < 4)
    return ids, labels, mask.long()


def loss_and_grads(model, use_chunks: bool, chunk: int = 7):
    ids, labels, mask = batch()
    count = int((labels[:, 1:] != -100).sum())
    model.zero_grad(set_to_none=True)
    if use_chunks:
        hidden = FinalHidden(model)
        model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
        loss = causal_lm_loss(hidden.take(), model.get_output_embeddings(), labels, count, chunk=chunk)
        hidden.handle.remove()
    else:
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=count).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("config_class", [LlamaConfig, Qwen2Config])
def test_chunks_give_transformers_loss_and_gradients_in_fp32(config_class):
    model = tiny(config_class, torch.float32)
    assert supports_chunked_loss(model)
    ref_loss, ref_grads = loss_and_grads(model, use_chunks=False)
    for chunk in (7, 4096):  # chunks that split rows, and one chunk for all
        loss, grads = loss_and_grads(model, use_chunks=True, chunk=chunk)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
        assert grads.keys() == ref_grads.keys() and len(grads) > 10
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_loss_is_transformers_loss_and_gradients_agree_to_bf16_rounding():
    model = tiny(LlamaConfig, torch.bfloat16)
    ref_loss, ref_grads = loss_and_grads(model, use_chunks=False)
    loss, grads = loss_and_grads(model, use_chunks=True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)  # fp32 sums, only their order differs
    for name in grads:
        cos = torch.nn.functional.cosine_similarity(grads[name].float().flatten(), ref_grads[name].float().flatten(),
                                                    dim=0)
        assert cos > 0.999, name


def test_soft_capped_logits_keep_transformers_loss():
    # Gemma 2 caps its logits (tanh): lm_head(final norm) is not its logits, so the chunked loss must not be used
    model = tiny(lambda **kw: Gemma2Config(**kw, head_dim=8), torch.float32)
    assert model.config.final_logit_softcapping
    assert not supports_chunked_loss(model)
