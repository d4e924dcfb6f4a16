"""Number formats: quantize/dequantize round trips, int4 packing, activation quantizers."""
import pytest
import torch

from composer.quant import utils as qu

GEN = lambda s: torch.Generator().manual_seed(s)  # noqa: E731


def rnd(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=GEN(seed)).to(dtype)


def test_int4_pack_layout_and_round_trip():
    q = torch.tensor([[1, 2, 15, 0, 7, 8]], dtype=torch.uint8)
    p = qu.pack_int4(q)
    assert p.dtype == torch.uint8 and p.tolist() == [[0x21, 0x0F, 0x87]]  # element 2j low nibble, 2j+1 high
    r = torch.randint(0, 16, (3, 5, 64), generator=GEN(1), dtype=torch.uint8)
    assert torch.equal(qu.unpack_int4(qu.pack_int4(r)), r)
    with pytest.raises(ValueError, match="even"):
        qu.pack_int4(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        qu.pack_int4(torch.full((2, 2), 16, dtype=torch.int32))


@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("group", [16, -1])
def test_int4_round_trip_error_and_idempotence(zero_point, group):
    w = rnd(3, 10, 64, seed=2)
    packed, scales, zeros = qu.quant_int4(w, group, zero_point, torch.float32)
    g = 64 if group == -1 else group
    assert packed.shape == (3, 10, 32) and scales.shape == (3, 10, 64 // g)
    assert (zeros is not None) == zero_point
    if zero_point:
        assert zeros.shape == (3, 5, 64 // g)
    d = qu.dequant_int4(packed, scales, zeros)
    err = (d - w).abs().reshape(3, 10, 64 // g, g)
    assert bool((err <= scales.reshape(3, 10, 64 // g, 1) * 0.5 + 1e-6).all())  # round to nearest
    assert float(err.max()) > 0  # it is lossy
    p2, s2, z2 = qu.quant_int4(d, group, zero_point, torch.float32)
    assert torch.allclose(qu.dequant_int4(p2, s2, z2), d, atol=1e-6)


def test_int4_scales_in_bf16_are_exact():
    w = rnd(2, 4, 32, seed=3)
    packed, scales, _ = qu.quant_int4(w, 16, False, torch.bfloat16)
    assert scales.dtype == torch.bfloat16
    d = qu.dequant_int4(packed, scales, None)
    assert float((d - w).abs().max()) <= float(scales.float().max()) * 0.5 + 1e-6


def test_int8_per_channel_round_trip():
    w = rnd(2, 12, 40, seed=4)
    q, s = qu.quant_int8_per_channel(w)
    assert q.dtype == torch.int8 and s.shape == (2, 12, 1) and int(q.abs().max()) == 127
    d = q.float() * s
    assert bool(((d - w).abs() <= s * 0.5 + 1e-7).all())
    q2, s2 = qu.quant_int8_per_channel(d)
    assert torch.equal(q2, q)


@pytest.mark.parametrize("kind", ["tensor", "channel", "block"])
def test_fp8_round_trip(kind):
    w = rnd(2, 32, 48, seed=5)
    if kind == "tensor":
        q, s = qu.quant_fp8_per_tensor(w)
        full = s[:, None, None]
        assert s.shape == (2,)
    elif kind == "channel":
        q, s = qu.quant_fp8_per_channel(w)
        full = s
        assert s.shape == (2, 32, 1)
    else:
        q, s = qu.quant_fp8_block(w, 16, 8)
        assert s.shape == (2, 2, 6)
        full = qu.expand_block_scale(s, 16, 8)
    assert q.dtype == torch.float8_e4m3fn
    d = q.float() * full
    # e4m3: 3 mantissa bits -> relative rounding error <= 2^-4 for normal numbers (plus subnormal floor)
    assert bool(((d - w).abs() <= w.abs() * 2 ** -4 + full * 2 ** -9 + 1e-7).all())
    assert float((d - w).abs().max()) > 0
    assert float(q.float().abs().max()) == qu.FP8_MAX  # the amax maps onto the largest fp8 value


def test_activation_quantizers_on_grid():
    t = rnd(5, 64, seed=6) * 3
    i8 = qu.qdq_int8_per_token(t)
    scale = t.abs().amax(-1, keepdim=True) / 127
    k = i8 / scale
    assert torch.allclose(k, k.round(), atol=1e-3) and float((i8 - t).abs().max()) > 0
    assert bool(((i8 - t).abs() <= scale / 2 + 1e-6).all())
    f8 = qu.qdq_fp8_per_token(t)
    s8 = t.abs().amax(-1, keepdim=True) / qu.FP8_MAX
    assert torch.allclose((f8 / s8).to(torch.float8_e4m3fn).float(), f8 / s8, rtol=1e-5)  # on the fp8 grid
    assert float((f8 - t).abs().max()) > 0
    g = qu.qdq_fp8_per_token_group(t, 16)
    # per group: each 16-wide group hits the fp8 max exactly once scaled
    gs = t.reshape(5, 4, 16).abs().amax(-1, keepdim=True) / qu.FP8_MAX
    assert torch.allclose((g.reshape(5, 4, 16) / gs).abs().amax(-1), torch.full((5, 4), qu.FP8_MAX))
    st = qu.qdq_fp8_static(t, torch.tensor(0.001))
    assert float(st.abs().max()) == pytest.approx(qu.FP8_MAX * 0.001)  # saturates at the static range
