"""quant.py against bitsandbytes on the same tensors, and against cases worked by hand."""

from __future__ import annotations

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*gemv_4bit.*")
bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

from ftcourse import memory, quant  # noqa: E402


def test_int8_absmax_and_zeropoint_by_hand():
    q, scale = quant.absmax_quantize(torch.tensor([-2.0, 1.0, 0.5]))
    # scale 2/127; 1.0 -> 63.5 rounds to 64 (half to even), 0.5 -> 31.75 -> 32
    assert q.tolist() == [-127, 64, 32] and scale.item() == pytest.approx(2 / 127)
    q, s, z = quant.zeropoint_quantize(torch.tensor([-1.0, 0.0, 3.0]))
    # range 4 over 255 steps; zero point round(1 / (4/255)) = round(63.75) = 64
    assert s.item() == pytest.approx(4 / 255) and z.item() == 64
    assert q.tolist() == [0, 64, 255]
    assert quant.zeropoint_dequantize(q, s, z).tolist() == pytest.approx([-64 * 4 / 255, 0.0, 191 * 4 / 255])


def test_blockwise_scales_contain_an_outlier():
    torch.manual_seed(0)
    x = torch.randn(4096) * 0.02
    x[7] = 5.0  # one outlier spoils the scale of whatever block contains it
    whole = (quant.blockwise_roundtrip(x, 4096) - x).pow(2).mean()
    blocks = (quant.blockwise_roundtrip(x, 64) - x).pow(2).mean()
    assert blocks < whole / 10
    with pytest.raises(ValueError, match="blocksize"):
        quant.blockwise_roundtrip(x, 0)


def test_nf4_code_equals_bitsandbytes_bit_for_bit():
    ours, theirs = quant.nf4_code(), F.get_4bit_type("nf4", device="cpu")
    assert ours.dtype == theirs.dtype == torch.float32 and torch.equal(ours, theirs)
    assert ours[7] == 0 and (ours > 0).sum() == 8 and (ours < 0).sum() == 7
    assert torch.equal(quant.fp4_code(), F.get_4bit_type("fp4", device="cpu"))


def test_nf4_rounding_order_matters_in_the_last_bit():
    # The same quantiles divided in float64 and rounded once miss the table in the last bit of some entries:
    # the reference's order (round to fp32, then divide in fp32) is what makes the table.
    values = quant.nf4_quantiles()
    once = (values / values.max()).float()
    table = F.get_4bit_type("nf4", device="cpu")
    differ = once != table
    assert differ.any()
    ulp = (
        torch.finfo(torch.float32).eps * table.abs()
    )  # one unit in the last place, at most, where they differ
    assert ((once - table).abs()[differ] <= ulp[differ]).all()


def _midpoint_values(quant_type: str) -> torch.Tensor:
    """Every decision midpoint of the codebook in fp32, and its fp32 neighbours one ulp below and above."""
    code = quant.code_for(quant_type).sort().values
    midpoints = (code[:-1] + code[1:]) / 2  # fp32, computed as both quantizers compute them
    below = torch.nextafter(midpoints, torch.tensor(-2.0))
    above = torch.nextafter(midpoints, torch.tensor(2.0))
    return torch.stack([below, midpoints, above], dim=1).reshape(-1)  # (45,)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_values_on_the_midpoints_take_the_lower_code_as_in_bitsandbytes(quant_type):
    grid = _midpoint_values(quant_type)  # 15 midpoints, 45 values
    code = quant.code_for(quant_type)
    order = torch.argsort(code)
    # One block of 64 whose absmax is exactly 1: scaling by 1/absmax leaves each value on its midpoint.
    block = torch.cat([torch.tensor([1.0]), grid, torch.zeros(64 - 1 - grid.numel())])
    packed, absmax = quant.quantize_4bit(block, quant_type, blocksize=64)
    theirs, state = F.quantize_4bit(block, blocksize=64, quant_type=quant_type)
    assert torch.equal(packed, theirs.reshape(packed.shape)) and torch.equal(absmax, state.absmax)
    # By hand: below and on midpoint i -> the i-th smallest code; one ulp above -> the next one.
    index = torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 0xF], dim=1).reshape(-1).long()
    expected = torch.arange(15).repeat_interleave(3) + torch.tensor([0, 0, 1]).repeat(15)
    assert torch.equal(index[1 : 1 + grid.numel()], order[expected])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_4bit_is_bit_exact_on_midpoints_under_any_scale(quant_type):
    # Midpoint values times block scales that are not powers of two (so scaling rounds), in whole blocks
    # (multiplied by 1/absmax) and in a short last block (divided by its absmax), as bitsandbytes does.
    generator = torch.Generator().manual_seed(5)
    grid = _midpoint_values(quant_type)
    blocks = 40
    scales = torch.rand(blocks, 1, generator=generator) * 3 + 0.01
    values = torch.cat(
        [torch.ones(blocks, 1), grid.repeat(blocks, 1), torch.zeros(blocks, 64 - 1 - grid.numel())], 1
    )
    x = torch.cat([(values * scales).reshape(-1), grid[:37] * 0.7])  # 40 whole blocks and 37 values more
    packed, absmax = quant.quantize_4bit(x, quant_type, blocksize=64)
    theirs, state = F.quantize_4bit(x, blocksize=64, quant_type=quant_type)
    assert torch.equal(packed, theirs.reshape(packed.shape)) and torch.equal(absmax, state.absmax)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(64, 128), (33, 70), (1001,)])
def test_quantize_4bit_is_bit_exact(quant_type, shape):
    torch.manual_seed(1)
    x = torch.randn(shape) * 0.05
    packed, state = F.quantize_4bit(x, blocksize=64, quant_type=quant_type)
    ours, absmax = quant.quantize_4bit(x, quant_type, 64)
    assert torch.equal(ours, packed.reshape(ours.shape)) and torch.equal(absmax, state.absmax)
    # Same 16 code values in, same bits out (bitsandbytes' CPU kernel is trusted for whole blocks per row).
    ours_values = quant.dequantize_4bit(ours, absmax, shape, quant_type, code=state.code)
    assert torch.equal(ours_values, quant.safe_dequantize_4bit(packed, state))
    if shape[-1] % 64 == 0:
        assert torch.equal(ours_values, F.dequantize_4bit(packed, state))
    # Our derived codebook is the stored table, bit for bit.
    assert torch.equal(quant.dequantize_4bit(ours, absmax, shape, quant_type), ours_values)


def test_packing_and_ties_by_hand():
    code = quant.nf4_code()
    tie = ((code[7] + code[8]) / 2).item()  # exactly between 0 and the smallest positive code
    packed, absmax = quant.quantize_4bit(torch.tensor([1.0, -1.0, 0.0, 0.5, tie, 0.0]), "nf4", blocksize=6)
    # 1 -> 15, -1 -> 0, 0 -> 7, 0.5 -> 12 (0.4407 is nearer than 0.5626), the tie -> the lower code 7
    assert packed.reshape(-1).tolist() == [0xF0, 0x7C, 0x77]
    assert absmax.tolist() == [1.0]
    theirs, _ = F.quantize_4bit(torch.tensor([1.0, -1.0, 0.0, 0.5, tie, 0.0]), blocksize=64, quant_type="nf4")
    assert theirs.reshape(-1).tolist() == [0xF0, 0x7C, 0x77]


def test_double_quant_matches_bitsandbytes_within_its_rounding():
    torch.manual_seed(2)
    x = torch.randn(2048, 256) * 0.02
    _, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    _, absmax = quant.quantize_4bit(x)
    ours = quant.double_quantize(absmax)
    assert torch.equal(ours["offset"], state.offset) and torch.equal(ours["absmax2"], state.state2.absmax)
    # The C kernel is not exactly nearest-rounding: allow 2% of the codes to differ, by at most 2 steps.
    differ = ours["quantized"].int() != state.absmax.int()
    assert differ.float().mean() < 0.02
    assert (ours["quantized"].int() - state.absmax.int()).abs().max() <= 2
    theirs = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    assert torch.equal(quant.double_dequantize(ours)[~differ], theirs[~differ])
    assert torch.allclose(quant.double_dequantize(ours), absmax, rtol=0.05)


def test_bits_per_parameter():
    assert quant.bits_per_parameter(64) == 4.5
    assert quant.bits_per_parameter(64, double_quant=True) - 4 == pytest.approx(0.127, abs=5e-4)


@pytest.mark.parametrize("double_quant", [True, False])
def test_linear4bit_size_is_what_the_estimator_counts(double_quant):
    layer = bnb.nn.Linear4bit(256, 512, bias=False, compress_statistics=double_quant, quant_type="nf4").to(
        "cpu"
    )
    assert quant.linear4bit_bytes(layer) == memory.quantized_bytes(512, 256, double_quant)


def test_safe_dequantize_on_a_width_that_is_not_whole_blocks():
    torch.manual_seed(3)
    x = torch.randn(64, 96)
    packed, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4")
    ours, absmax = quant.quantize_4bit(x)
    expected = quant.dequantize_4bit(ours, absmax, (64, 96), code=state.code)
    assert torch.equal(quant.safe_dequantize_4bit(packed, state), expected)


def test_guard_sets_the_repack_flag_and_rejects_unsafe_widths():
    model = torch.nn.Sequential(bnb.nn.Linear4bit(128, 64, quant_type="nf4").to("cpu"))
    assert quant.guard_linear4bit(model) == 1
    assert model[0].support_avx512bf16_for_cpu is False
    bad = torch.nn.Sequential(bnb.nn.Linear4bit(96, 64, quant_type="nf4").to("cpu"))
    with pytest.raises(ValueError, match="in_features=96"):
        quant.guard_linear4bit(bad)


def test_kernel_error_is_relative_to_the_reference_and_rounding_counts_as_right():
    # by hand: largest difference 0.5 on a reference whose largest magnitude is 2
    assert quant.kernel_error(torch.tensor([1.0, -2.0]), torch.tensor([1.0, -1.5])) == 0.25
    eps = torch.finfo(torch.float32).eps
    assert quant.kernel_is_right(0.0) and quant.kernel_is_right(2 * eps)
    assert not quant.kernel_is_right(0.25) and not quant.kernel_is_right(10 * eps)


def test_avx512bf16_repack_error_is_measured_only_where_the_path_exists(monkeypatch):
    error = quant.avx512bf16_repack_error()
    assert (error is None) == (not F.has_avx512bf16())  # bitsandbytes' own test decides the path
    assert error is None or error >= 0.0
    monkeypatch.setattr(F, "has_avx512bf16", lambda: False)
    assert quant.avx512bf16_repack_error() is None


@pytest.fixture(scope="module")
def model_4bit():
    return quant.load_4bit()


def test_load_4bit_embedded_model_is_stable_in_eval(model_4bit, no_network):
    layers = [m for m in model_4bit.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 4 * 7 and all(m.support_avx512bf16_for_cpu is False for m in layers)
    before = {id(m): m.weight.quant_state.absmax.clone() for m in layers}
    ids = torch.tensor([[1, 5, 9, 33, 200, 7]])
    with torch.no_grad():
        first = model_4bit(ids).logits
        second = model_4bit(ids).logits
    assert torch.equal(first, second)
    # Eval-mode forward must not have repacked anything in place (the AVX512-BF16 bug).
    assert all(torch.equal(m.weight.quant_state.absmax, before[id(m)]) for m in layers)
    assert all(m.weight.quant_state.nested for m in layers)
    assert no_network == []


def test_roundtrip_linears_changes_every_decoder_weight():
    from ftcourse import profiles

    model = profiles.load_base()
    original = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    assert quant.roundtrip_linears(model, "nf4") == 4 * 7
    restored = model.model.layers[0].mlp.down_proj.weight
    assert not torch.equal(restored, original)
    assert torch.allclose(restored, original, atol=original.abs().max().item() * 0.2)
    with pytest.raises(ValueError, match="kind"):
        quant.roundtrip_linears(model, "int4")


@pytest.mark.parametrize("method", ["absmax", "zeropoint"])
def test_blockwise_roundtrip_equals_per_block_quantization(method):
    torch.manual_seed(4)
    x = torch.randn(10, 13)  # 130 values: two whole blocks of 64 and a short one
    out = quant.blockwise_roundtrip(x, 64, method).reshape(-1)
    flat = x.reshape(-1)
    for start in range(0, 130, 64):
        block = flat[start : start + 64]
        if method == "absmax":
            expected = quant.absmax_dequantize(*quant.absmax_quantize(block))
        else:
            expected = quant.zeropoint_dequantize(*quant.zeropoint_quantize(block))
        # Same fp32 operations on the same values: equal up to a last-bit rounding of the product at most.
        torch.testing.assert_close(
            out[start : start + 64], expected, rtol=torch.finfo(torch.float32).eps, atol=0
        )


def test_nf4_offset_moves_the_outer_levels_and_a_custom_code_round_trips():
    default, wider = quant.nf4_code(), quant.nf4_code(offset=0.99)
    assert torch.equal(default, quant.nf4_code(offset=quant.NF4_OFFSET))
    assert wider.max() == 1 and wider.min() == -1  # scaled to [-1, 1] either way
    # a farther outermost quantile squeezes the inner levels towards 0 (hand check: the level next to 1)
    assert wider.sort().values[-2] < default.sort().values[-2]
    x = torch.randn(4, 64)
    assert torch.equal(quant.roundtrip_4bit(x, code=quant.nf4_code()), quant.roundtrip_4bit(x, "nf4"))
    three = torch.tensor([-1.0, 0.0, 1.0])  # a 3-level code: every value becomes -absmax, 0 or +absmax
    out = quant.roundtrip_4bit(x, code=three)
    absmax = x.abs().amax(dim=1, keepdim=True)
    assert torch.all((out == 0) | torch.isclose(out.abs(), absmax.expand_as(out)))
    with pytest.raises(ValueError, match="between 0.5 and 1"):
        quant.nf4_code(offset=1.2)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        quant.roundtrip_4bit(x, code=torch.tensor([-2.0, 0.0, 2.0]))
    with pytest.raises(ValueError, match="2 to 16"):
        quant.roundtrip_4bit(x, code=torch.linspace(-1, 1, 17))
