"""Wire compression round-trips within its stated error; byte counts equal the formula."""

from __future__ import annotations

import pytest
import torch

from fedpeft.adapters import state_bytes
from fedpeft.metering.compression import SCHEMES, decode, encode, max_error, payload_bytes, roundtrip

torch.set_num_threads(1)


def lora_state(rank: int = 4, d_in: int = 48, d_out: int = 40, scale: float = 0.05) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    prefix = "base_model.model.model.layers.0.self_attn"
    return {
        f"{prefix}.q_proj.lora_A.default.weight": torch.randn(rank, d_in, generator=gen) * scale,
        f"{prefix}.q_proj.lora_B.default.weight": torch.randn(d_out, rank, generator=gen) * scale * 3,
        f"{prefix}.v_proj.lora_A.default.weight": torch.randn(rank, d_in, generator=gen) * 100,  # a wide range
        f"{prefix}.v_proj.lora_B.default.weight": torch.zeros(d_out, rank),  # freshly initialised B
        "base_model.model.lora_magnitude_vector": torch.rand(d_out, generator=gen) + 0.5,  # 1-D
    }


@pytest.mark.parametrize("scheme", SCHEMES)
def test_roundtrip_within_stated_error(scheme):
    state = lora_state()
    decoded, nbytes = roundtrip(state, scheme)
    assert set(decoded) == set(state)
    for key, x in state.items():
        y = decoded[key]
        assert y.dtype == torch.float32 and y.shape == x.shape
        err = (x - y).abs()
        assert (err <= max_error(x, scheme)).all(), (scheme, key, float(err.max()))


def test_int8_error_is_absmax_over_254():
    x = torch.linspace(-1.0, 1.0, 1001).reshape(7, 143)
    y, _ = roundtrip({"w": x}, "int8")
    assert float((x - y["w"]).abs().max()) <= 1.0 / 254 + 1e-7
    # and not much better: the bound is tight for a dense range
    assert float((x - y["w"]).abs().max()) > 0.8 / 254


def test_channel_scales_follow_the_rank_dimension():
    state = lora_state(rank=4, d_in=48, d_out=40)
    payload, _ = encode(state, "int8_channel")
    a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"
    assert payload[a].dtype == torch.int8
    assert tuple(payload[a + "::scale"].shape) == (4, 1)  # A: r x in -> a scale per row
    assert tuple(payload[b + "::scale"].shape) == (1, 4)  # B: out x r -> a scale per column
    assert payload["base_model.model.lora_magnitude_vector::scale"].dim() == 0


@pytest.mark.parametrize("rank,d_in,d_out", [(4, 48, 40), (8, 64, 96), (1, 16, 16)])
def test_bytes_equal_formula(rank, d_in, d_out):
    state = lora_state(rank, d_in, d_out)
    n = sum(t.numel() for t in state.values())
    two_d = [t for t in state.values() if t.dim() == 2]
    one_d = [t for t in state.values() if t.dim() == 1]
    expected = {
        "none": 4 * n,
        "fp16": 2 * n,
        "bf16": 2 * n,
        "int8": n + 4 * len(state),
        "int8_channel": n + 4 * (rank * len(two_d) + len(one_d)),
    }
    for scheme, want in expected.items():
        payload, nbytes = encode(state, scheme)
        assert nbytes == want == payload_bytes(state, scheme) == state_bytes(payload), scheme
    assert expected["int8"] < expected["fp16"] < expected["none"]


def test_zero_tensor_and_empty_tensor():
    state = {"z": torch.zeros(3, 5), "e": torch.zeros(0)}
    for scheme in SCHEMES:
        decoded, _ = roundtrip(state, scheme)
        assert torch.equal(decoded["z"], state["z"]) and decoded["e"].numel() == 0


def test_rejects_non_finite_and_fp16_overflow():
    with pytest.raises(ValueError, match="NaN or inf"):
        encode({"w": torch.tensor([1.0, float("nan")])}, "int8")
    with pytest.raises(ValueError, match="exceeds 65504"):
        encode({"w": torch.tensor([1e6])}, "fp16")
    with pytest.raises(ValueError, match="unknown wire compression"):
        encode({"w": torch.ones(2)}, "int4")


def test_decode_needs_scales():
    payload, _ = encode({"w": torch.ones(2, 2)}, "int8")
    del payload["w::scale"]
    with pytest.raises(ValueError, match="lacks the scale"):
        decode(payload, "int8")
