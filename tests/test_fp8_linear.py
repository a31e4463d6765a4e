"""lib/fp8_linear.py on the CPU (torch's reference FP8 kernel): the products are the scaled e4m3 ones, forward and
backward; the swap leaves the LoRA matrices trainable; train_lora.py --load fp8 learns."""
import json

import pytest
import torch

from lib.fp8_linear import FP8, Fp8FrozenLinear, convert_frozen_linears, quantize_rows
from test_train import some_tales, train, write_tales


def relative_error(a, b):
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


@pytest.fixture
def frozen_linear():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 48, bias=False).to(torch.bfloat16).requires_grad_(False)
    return linear


def test_quantize_rows_maps_each_row_onto_the_e4m3_range():
    x = torch.randn(8, 64) * torch.logspace(-6, 3, 8)[:, None]  # rows nine orders of magnitude apart
    q, scale = quantize_rows(x)
    assert q.dtype == FP8 and scale.shape == (8, 1)
    torch.testing.assert_close(q.float().abs().amax(dim=1), torch.full((8,), 448.0))
    assert relative_error(q.float() * scale, x) < 0.05  # e4m3 keeps 3 mantissa bits: ~2% rms per element


def test_products_are_the_scaled_e4m3_ones(frozen_linear):
    fp8 = Fp8FrozenLinear(frozen_linear)
    x = torch.randn(3, 5, 96, dtype=torch.bfloat16, requires_grad=True)
    y = fp8(x)
    assert y.shape == (3, 5, 48) and y.dtype == torch.bfloat16
    # forward: x and W each rounded to e4m3 with their own per-row scales, then one exact-ish product
    qx, sx = quantize_rows(x.detach().reshape(15, 96))
    w = fp8.rows.float() * fp8.rows_scale
    torch.testing.assert_close(y.reshape(15, 48).float(), (qx.float() * sx) @ w.T, rtol=1e-2, atol=1e-2)
    # backward: dy per row and W^T per input channel
    grad = torch.randn_like(y)
    y.backward(grad)
    qg, sg = quantize_rows(grad.reshape(15, 48))
    wt = fp8.cols.float() * fp8.cols_scale
    torch.testing.assert_close(x.grad.reshape(15, 96).float(), (qg.float() * sg) @ wt.T, rtol=1e-2, atol=1e-2)
    # ... and close to the bf16 layer, but not it: the rounding of FP8 is there
    x16 = x.detach().requires_grad_()
    ref = frozen_linear(x16)
    ref.backward(grad)
    assert 0.005 < relative_error(y, ref) < 0.06
    assert 0.005 < relative_error(x.grad, x16.grad) < 0.06


def test_bias_is_kept():
    linear = torch.nn.Linear(96, 48).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(4, 96, dtype=torch.bfloat16)
    assert relative_error(Fp8FrozenLinear(linear)(x), linear(x)) < 0.06


def test_conversion_swaps_the_frozen_layers_and_leaves_lora_trainable(tiny_bpe):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_bpe[0], dtype=torch.bfloat16)
    ids = torch.randint(0, 1000, (2, 24))
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float().log_softmax(-1)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    layers = model.get_base_model().model.layers
    count = convert_frozen_linears(layers)
    assert count == 7 * len(layers)  # q k v o gate up down, each once
    lora = {n: m for n, m in layers.named_modules() if n.endswith(("lora_A.default", "lora_B.default"))}
    assert lora and all(type(m) is torch.nn.Linear and m.weight.requires_grad for m in lora.values())
    assert type(model.get_output_embeddings()) is torch.nn.Linear  # lm_head is outside the layers: not swapped
    out = model(input_ids=ids, labels=ids)
    # B starts at zero, so this is the base model through FP8: close to the bf16 distributions
    kl = torch.nn.functional.kl_div(out.logits.float().log_softmax(-1), ref, log_target=True, reduction="none")
    assert 0 < float(kl.sum(-1).mean()) < 0.05
    out.loss.backward()  # through the FP8 products to every LoRA B (A's gradient is B^T-weighted: zero at the start)
    assert all(float(m.weight.grad.abs().max()) > 0 for n, m in lora.items() if "lora_B" in n)


def test_train_with_fp8_base_lowers_the_loss(tiny_bpe, tmp_path):
    data = write_tales(tmp_path / "one.jsonl", some_tales(1) * 4)
    train(tiny_bpe[0], data, tmp_path / "ckpt", "--load", "fp8", "--steps", "12", "--lr", "3e-2",
          "--target-modules", "q_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    metrics = json.loads((tmp_path / "ckpt" / "metrics.json").read_text())
    args = json.loads((tmp_path / "ckpt" / "training_args.json").read_text())
    assert args["load"] == "fp8"
    assert metrics["train_loss_last"] < metrics["train_loss_first"] - 0.1


def test_fast_recipe_takes_fp8_only_on_fp8_tensor_cores(tiny_bpe, tmp_path):
    from lib.fp8_linear import has_fp8_tensor_cores
    data = write_tales(tmp_path / "tales.jsonl", some_tales(2))
    train(tiny_bpe[0], data, tmp_path / "ckpt", "--recipe", "fast", "--steps", "1", "--compile", "off")
    args = json.loads((tmp_path / "ckpt" / "training_args.json").read_text())
    assert args["load"] == ("fp8" if has_fp8_tensor_cores() else "bf16")
