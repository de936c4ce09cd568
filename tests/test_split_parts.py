"""Split learning's cuts inside one model: the split forward/backward is the whole model's, what crosses
is recorded and metered by the formula, and cut settings are checked against the model."""

from types import SimpleNamespace

import pytest
import torch

from fedpeft.adapters import adapter_parameters, get_adapter_state, set_adapter_state
from fedpeft.models.peft_wrap import wrap_lora
from fedpeft.models.registry import tiny_bert, tiny_llama
from fedpeft.split.crossings import SplitModel
from fedpeft.split.layout import find_layout
from fedpeft.split.parts import bottom_forward, client_step
from fedpeft.split.spec import CutSpec, check_cut, parse_cut, split_keys


def _wrapped(kind: str, layers: int, dtype=torch.float64, seed: int = 0):
    if kind == "decoder":
        model, tok = tiny_llama(seed=seed, dtype=dtype, layers=layers)
        targets, head = ["q_proj", "v_proj"], "causal_lm"
    else:
        model, tok = tiny_bert(seed=seed, dtype=dtype, layers=layers)
        targets, head = ["query", "value"], "classification"
    peft_cfg = SimpleNamespace(r=2, alpha=4, dropout=0.0, target_modules=targets, rslora=False)
    wrapped = wrap_lora(model, peft_cfg, seed=seed, head=head)
    # Non-zero B everywhere, so every part's LoRA changes the function and gets a non-trivial gradient.
    gen = torch.Generator().manual_seed(seed + 1)
    state = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) * 0.1 for k, v in get_adapter_state(wrapped).items()}
    set_adapter_state(wrapped, state)
    for module in wrapped.modules():  # BERT's dropout would make two train-mode forwards differ
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return wrapped.to(dtype), tok


def _batch(kind: str, batch: int = 3, seq: int = 7, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 200, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # one padded row
    labels = ids.clone() if kind == "decoder" else torch.tensor([0, 1, 1])[:batch]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in adapter_parameters(model).items() if p.grad is not None}


def _three_stage(model, cut: CutSpec, batch):
    """SplitLLM's split step written out independently: detach at both cuts, backward in three stages
    (top from the loss, trunk from the gradient at cut 2, bottom from the gradient at cut 1)."""
    layout = find_layout(model)
    sent = {}

    def leaf(name):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            received = h.detach().requires_grad_(True)
            sent[name] = (h, received)
            return ((received, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": received})
        return hook

    def leaf_after_last(module, args, output):
        received = output.detach().requires_grad_(True)
        sent["cut2"] = (output, received)
        return received

    handles = [layout.blocks[cut.first].register_forward_pre_hook(leaf("cut1"), with_kwargs=True)]
    if cut.second < layout.num_blocks:
        handles.append(layout.blocks[cut.second].register_forward_pre_hook(leaf("cut2"), with_kwargs=True))
    else:
        handles.append(layout.blocks[-1].register_forward_hook(leaf_after_last))
    try:
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()                                    # client: top
        h2, r2 = sent["cut2"]
        torch.autograd.backward(h2, r2.grad)               # server: trunk, from the gradient sent up
        h1, r1 = sent["cut1"]
        if h1.requires_grad:  # the bottom has something to train (a = 0: frozen embeddings only, nothing sent down)
            torch.autograd.backward(h1, r1.grad)           # client: bottom, from the gradient sent down
    finally:
        for h in handles:
            h.remove()
    crossed = {"act_up": r1.detach(), "act_down": r2.detach(), "grad_up": r2.grad.detach()}
    if h1.requires_grad:
        crossed["grad_down"] = r1.grad.detach()
    return loss.detach(), _grads(model), crossed


@pytest.mark.parametrize("kind,layers,cut", [("decoder", 4, "1-3"), ("decoder", 3, "0-3"), ("encoder", 3, "1-3"),
                                             ("encoder", 4, "0-2")])
def test_split_step_equals_whole_model_and_three_stage_backward(kind, layers, cut):
    model, _ = _wrapped(kind, layers)
    batch = _batch(kind)
    spec = parse_cut(cut)
    model.train()
    model.zero_grad(set_to_none=True)
    whole_loss = model(**batch).loss
    whole_loss.backward()
    whole = _grads(model)
    staged_loss, staged, staged_sent = _three_stage(model, spec, batch)

    split = SplitModel(model, spec)
    model.zero_grad(set_to_none=True)
    record = client_step(split, batch)
    got = _grads(model)
    split.remove()

    parts = split_keys(whole, find_layout(model).blocks_prefix, spec)
    assert parts["trunk"], parts  # the trunk has LoRA (bottom and top do in the cuts that leave them blocks)
    assert torch.allclose(record.loss, whole_loss.detach(), rtol=0, atol=1e-12)
    assert torch.allclose(staged_loss, whole_loss.detach(), rtol=0, atol=1e-12)
    assert whole.keys() == got.keys() == staged.keys()
    for name in whole:
        assert torch.allclose(got[name], whole[name], rtol=1e-10, atol=1e-12), name
        assert torch.allclose(staged[name], whole[name], rtol=1e-10, atol=1e-12), name
        assert whole[name].abs().sum() > 0, name
    assert sorted(c.name for c in record.crossings) == sorted(staged_sent)
    for name, expected in staged_sent.items():
        (crossing,) = record.by_name(name)
        assert torch.allclose(crossing.tensor, expected, rtol=1e-10, atol=1e-14), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_crossing_bytes_are_batch_seq_hidden_dtype(dtype):
    model, _ = _wrapped("decoder", 3, dtype=dtype)
    split = SplitModel(model, parse_cut("1-2"))
    batch = _batch("decoder", batch=3, seq=7)
    step = client_step(split, batch)
    hidden = model.get_base_model().config.hidden_size
    expected = 3 * 7 * hidden * {torch.float32: 4, torch.float64: 8}[dtype]
    assert [c.name for c in step.crossings] == ["act_up", "act_down", "grad_up", "grad_down"]
    assert all(c.nbytes == expected for c in step.crossings)
    assert dict(split.meter.bytes) == {n: expected for n in ("act_up", "act_down", "grad_up", "grad_down")}
    assert split.meter.total == 4 * expected and split.meter.forwards == 1
    client_step(split, _batch("decoder", batch=2, seq=5))  # a second step of another shape
    assert split.meter.step_bytes(2) == [4 * expected, 4 * 2 * 5 * hidden * expected // (3 * 7 * hidden)]


def test_nothing_crosses_or_is_defended_in_evaluation_mode():
    model, _ = _wrapped("decoder", 3, dtype=torch.float32)
    batch = _batch("decoder")
    model.eval()
    with torch.no_grad():
        plain = model(**batch).logits
    split = SplitModel(model, parse_cut("1-2"))
    split.defences = type(split.defences)(activation_sigma=5.0)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, plain)
    assert split.meter.total == 0


@pytest.mark.parametrize("kind,cut", [("decoder", "1-3"), ("encoder", "2-3")])
def test_bottom_forward_returns_the_activations_sent_at_cut_1(kind, cut):
    model, _ = _wrapped(kind, 3)
    batch = _batch(kind)
    split = SplitModel(model, parse_cut(cut))
    step = client_step(split, batch)
    model.eval()
    h = bottom_forward(model, cut, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    (sent,) = step.by_name("act_up")
    assert torch.allclose(h, sent.tensor, atol=1e-12)
    # Differentiable in the input embeddings (what embedding inversion optimises).
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    out = bottom_forward(model, cut, inputs_embeds=embeds, attention_mask=batch["attention_mask"])
    out.square().sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0


def test_cut_settings_are_checked_with_the_setting_named():
    assert parse_cut(" 2-26 ") == CutSpec(2, 26)
    for bad, why in [("2", "not a cut"), ("a-b", "not a cut"), ("3-3", "a >= b"), ("5-2", "a >= b"), ("-1-2", "not a cut")]:
        with pytest.raises(ValueError, match=why) as err:
            parse_cut(bad)
        assert "method.options.cut" in str(err.value)
    with pytest.raises(ValueError, match=r"method.options.cut: '1-3' is outside the model's layers: it has 2 blocks"):
        check_cut(parse_cut("1-3"), 2)
    model, _ = _wrapped("decoder", 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="outside the model's layers"):
        SplitModel(model, parse_cut("0-3"))


def test_adapter_keys_fall_in_their_parts():
    model, _ = _wrapped("encoder", 4, dtype=torch.float32)
    layout = find_layout(model)
    parts = split_keys(get_adapter_state(model), layout.blocks_prefix, parse_cut("1-3"))
    assert layout.blocks_prefix.endswith("bert.encoder.layer") and layout.num_blocks == 4
    assert all(".layer.0." in k for k in parts["bottom"]) and parts["bottom"]
    assert all(".layer.1." in k or ".layer.2." in k for k in parts["trunk"])
    assert any("classifier" in k for k in parts["top"]) and any(".layer.3." in k for k in parts["top"])
