"""The CPU LoRA dropout: the distribution of ``nn.Dropout`` (checked by counting and by hand),
used only in the bfloat16 CPU training path."""

from __future__ import annotations

import math

import pytest
import torch

from adapterkit import TrainOptions, train
from adapterkit.training.dropout import CpuDropout, effective_p, keep_mask, use_cpu_dropout


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_each_element_is_dropped_with_probability_p_in_every_lane(p):
    """Counted per position modulo 4: each 64-bit draw feeds four elements, and a draw that
    never sets its top bit would never drop the fourth (the bias of a plain int64 random_())."""
    torch.manual_seed(0)
    n = 4_000_000
    dropped = ~keep_mask((n,), p)
    per_lane = n // 4
    se = math.sqrt(p * (1 - p) / per_lane)
    for lane in range(4):
        rate = dropped[lane::4].double().mean().item()
        assert abs(rate - p) < 5 * se, (lane, rate)
    # neighbours are independent: a dropped element does not make its neighbour likelier
    both = (dropped[:-1] & dropped[1:]).double().mean().item()
    assert abs(both - p * p) < 5 * math.sqrt(p * p / n)
    assert abs(effective_p(p) - p) <= 0.5 / 65536


def test_forward_and_backward_by_hand():
    torch.manual_seed(1)
    x = (torch.rand(4, 9, 33) + 0.5).requires_grad_()  # no zeros: a zero output means dropped
    layer = CpuDropout(0.2).train()
    y = layer(x)
    kept = y != 0
    scale = 1 / (1 - effective_p(0.2))
    assert 0.1 < 1 - kept.double().mean().item() < 0.3
    assert torch.equal(y[kept], x.detach()[kept] * scale)
    grad = torch.randn_like(x)
    y.backward(grad)
    assert torch.equal(x.grad, torch.where(kept, grad * scale, 0.0))
    # the same seed draws the same mask (a run, and a resume, are reproducible)
    torch.manual_seed(1)
    torch.rand(4, 9, 33)
    assert torch.equal(layer(x.detach()) != 0, kept)


def test_moments_are_those_of_nn_dropout():
    """Mean x and variance x^2 p/(1-p) per element, as ``nn.Dropout``'s."""
    torch.manual_seed(2)
    x = torch.linspace(-2, 2, 64)
    draws = 20_000
    layer = CpuDropout(0.1).train()
    out = torch.stack([layer(x) for _ in range(draws)])
    p = effective_p(0.1)
    var = x ** 2 * p / (1 - p)
    assert torch.allclose(out.mean(0), x, atol=5 * (var.max().sqrt() / math.sqrt(draws)).item())
    assert torch.allclose(out.var(0), var, rtol=0.1, atol=1e-6)


def test_eval_mode_and_p_zero_are_the_identity_and_p_one_drops_all():
    x = torch.randn(3, 5, requires_grad=True)
    assert CpuDropout(0.3).eval()(x) is x
    assert CpuDropout(0.0).train()(x) is x
    dropped = CpuDropout(1.0).train()(x)
    assert torch.equal(dropped, torch.zeros_like(x)) and dropped.requires_grad
    assert not keep_mask((1000,), 1.0).any() and not keep_mask((1000,), 1 - 1e-7).any()
    assert keep_mask((1000,), 0.0).all()
    with pytest.raises(ValueError):
        keep_mask((3,), 1.5)


def test_only_lora_dropouts_are_replaced():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
    base = LlamaForCausalLM(config)
    base.model.extra = torch.nn.Dropout(0.3)  # a dropout that is not LoRA's stays PyTorch's
    model = get_peft_model(base, LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]))
    assert use_cpu_dropout(model) == 4
    layers = [m for m in model.modules() if hasattr(m, "lora_dropout")]
    assert all(type(m.lora_dropout["default"]) is CpuDropout for m in layers)
    assert all(m.lora_dropout["default"].p == 0.05 for m in layers)
    assert type(model.base_model.model.model.extra) is torch.nn.Dropout
    assert use_cpu_dropout(model) == 0  # already replaced


def test_a_layer_with_another_dropout_keeps_peft_s_cast():
    """PyTorch's dropout scales a bfloat16 input by a rounded 1/(1-p): only layers whose
    dropouts are all ours skip the float32 round trip."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    class Other(torch.nn.Dropout):
        pass

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]))
    q, v = (model.base_model.model.model.layers[0].self_attn.q_proj,
            model.base_model.model.model.layers[0].self_attn.v_proj)
    v.lora_dropout["default"] = Other(0.05)
    use_cpu_dropout(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not q.cast_input_dtype_enabled
        assert v.cast_input_dtype_enabled is True  # PEFT's own default, untouched


@pytest.mark.parametrize("precision, expected", [("bf16", CpuDropout), ("fp32", torch.nn.Dropout)])
def test_the_bf16_cpu_path_uses_it_and_fp32_keeps_pytorchs(precision, expected, tiny_base,
                                                             home, data, pm):
    """fp32 keeps PyTorch's dropout and with it the plain PEFT script's random stream."""
    options = TrainOptions(max_steps=12, learning_rate=3e-2, batch_size=4, save_steps=100,
                           r=8, alpha=16, dropout=0.1, precision=precision,
                           forgetting_budget=0, general="off")
    result = train("sft", base=str(tiny_base), data=str(data), name=f"d-{precision}",
                   options=options, home=home, plugins=pm)
    kinds = {type(m.lora_dropout["default"]) for m in result.model.modules()
             if hasattr(m, "lora_dropout")}
    assert kinds == {expected}
    assert result.metrics["train_loss_final"] < 0.5 * result.metrics["train_loss_first"]


def test_lora_inputs_skip_the_float32_round_trip_under_autocast_with_the_same_bits():
    """The bf16 CPU path lets LoRA layers take their bfloat16 input as it is under autocast
    (``dropout._CastOutsideAutocast``): the loss and every gradient equal PEFT's own cast
    bit for bit, dropout included (the same seed draws the same mask in either dtype); and the
    dropout does see bfloat16 there (PEFT reads the flag), float32 with PEFT's cast."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from adapterkit.training.precision import prepare

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(0))
    grads, losses = {}, {}
    for skip in (False, True):
        torch.manual_seed(0)
        base = LlamaForCausalLM(config).to(torch.bfloat16)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2,
                                                target_modules="all-linear",
                                                init_lora_weights=False))
        prepare(model)
        use_cpu_dropout(model)
        layers = [m for m in model.modules() if hasattr(m, "lora_A")]
        if not skip:
            for m in layers:
                m.cast_input_dtype_enabled = True
        else:
            assert all(m.cast_input_dtype_enabled for m in layers)  # outside autocast: cast
        seen = set()
        for m in layers:
            m.lora_dropout["default"].register_forward_pre_hook(
                lambda module, args, seen=seen: seen.add(args[0].dtype))
        model.train()
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if skip:
                assert all(not m.cast_input_dtype_enabled for m in layers)
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert seen == ({torch.bfloat16} if skip else {torch.float32})
        losses[skip] = loss.detach()
        grads[skip] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert torch.equal(losses[True], losses[False])
    assert grads[True].keys() == grads[False].keys()
    assert all(torch.equal(grads[True][n], grads[False][n]) for n in grads[True])
