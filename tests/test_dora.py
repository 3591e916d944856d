"""ftcourse.dora against peft's use_dora=True on the same inputs, and against cases worked by hand."""

from __future__ import annotations

import math

import pytest
import torch
from adapter_fixtures import ATOL, assert_equal_to_peft, peft_and_ours, sample_input_ids, tiny_llama
from test_lora import assert_low_precision_equal_to_peft
from torch import nn

from ftcourse import dora, lora

# peft 0.21 asks transformers 5.23 for a renamed attribute; the warning is theirs, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


@pytest.fixture(scope="module")
def base() -> nn.Module:
    return tiny_llama()


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return sample_input_ids()


def test_outputs_and_grads_equal_peft_dora(base, input_ids):
    theirs, ours = peft_and_ours(base, use_dora=True)
    assert_equal_to_peft(theirs, ours, input_ids, {"A", "B", "m"})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_outputs_and_grads_equal_peft_dora_on_a_half_precision_base(dtype):
    # peft keeps the base layer's own W0·x and adds (m/‖V‖ - 1)·W0·x + (m/‖V‖)·s·B·A·x in float32; ours too.
    assert_low_precision_equal_to_peft(dtype, use_dora=True)


def test_norm_is_per_output_row_worked_by_hand():
    base = nn.Linear(2, 2, bias=True)
    with torch.no_grad():
        base.weight.copy_(
            torch.tensor([[3.0, 4.0], [0.0, 2.0]])
        )  # row norms 5 and 2; column norms 3 and 4.47
        base.bias.copy_(torch.tensor([1.0, -1.0]))
    layer = dora.DoRALinear(base, rank=1, alpha=1)
    torch.testing.assert_close(layer.m.detach(), torch.tensor([5.0, 2.0]))
    x = torch.tensor([[1.0, 1.0]])
    torch.testing.assert_close(layer(x), base(x))  # m = ‖W0‖ and B = 0: the layer is W0 itself
    with torch.no_grad():
        layer.m.copy_(torch.tensor([10.0, 2.0]))  # double the first row's magnitude, keep its direction
    torch.testing.assert_close(layer(x), torch.tensor([[2 * 7.0 + 1.0, 2.0 - 1.0]]))


def test_norm_is_not_differentiated():
    layer = dora.DoRALinear(nn.Linear(3, 2, bias=False), rank=1, alpha=1)
    with torch.no_grad():
        layer.B.fill_(0.5)
    layer(torch.ones(1, 3)).sum().backward()
    # With the norm treated as a constant, dy/dB = (m/‖V‖)·s·(A·x); a differentiated norm would subtract
    # the component of that gradient along V.
    scale = (layer.m / layer.weight_norm()).detach()
    expected_B = (scale * layer.scaling)[:, None] * (layer.A.detach() @ torch.ones(3, 1)).T
    torch.testing.assert_close(layer.B.grad, expected_B)


def test_merged_equals_unmerged_dora(base, input_ids):
    _, ours = peft_and_ours(base, use_dora=True)
    with torch.no_grad():
        before = ours(input_ids=input_ids).logits
        lora.merge_lora(ours)
        after = ours(input_ids=input_ids).logits
    assert not lora.adapter_layers(ours)
    torch.testing.assert_close(after, before, atol=ATOL, rtol=0)


def test_magnitude_and_direction_change_by_hand():
    W0 = torch.eye(2)
    assert dora.magnitude_direction_change(W0, torch.tensor([[2.0, 0.0], [0.0, 1.0]])) == pytest.approx(
        (0.5, 0.0)
    )
    # the first row turns by 90 degrees at equal length: cosine 0, so ΔD = (1 + 0) / 2
    assert dora.magnitude_direction_change(W0, torch.tensor([[0.0, 1.0], [0.0, 1.0]])) == pytest.approx(
        (0.0, 0.5)
    )
    with pytest.raises(ValueError, match="of one shape"):
        dora.magnitude_direction_change(W0, torch.eye(3))


def test_bad_input_is_explained(base):
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        dora.inject_dora(tiny_llama(), ["q_proj"], 0, 8)
    with pytest.raises(TypeError, match="not an nn.Linear"):
        dora.inject_dora(tiny_llama(), ["self_attn"], 2, 4)


def test_effective_weights_and_changes_follow_training():
    model = tiny_llama()
    dora.inject_dora(model, ["q_proj"], 2, 4)
    names = list(lora.adapter_layers(model))
    start = dora.effective_weights(model, names)
    assert all(torch.equal(start[n], model.get_submodule(n).W0) for n in names)  # W = W0 at step 0
    # float32 weights: a row scaled by m/‖W‖ = 1 up to one rounding has a norm within eps of its own (so
    # ΔM <= eps·‖row‖) and points the same way up to an angle of order eps (so ΔD, 1 - cos, of order eps²).
    eps = torch.finfo(torch.float32).eps
    for name, change in dora.decomposition_changes(model, start).items():
        row_norm = start[name].norm(dim=1).mean().item()
        assert change == pytest.approx((0.0, 0.0), abs=eps * row_norm)
    with torch.no_grad():
        model.get_submodule(names[0]).m.mul_(2.0)  # pure magnitude change of every row
    delta_m, delta_d = dora.decomposition_changes(model, start)[names[0]]
    # ΔM = mean ‖row‖ (doubled minus once): a mean of `in` squares per row, then of `out` rows, in float32
    n_terms = sum(start[names[0]].shape)
    assert delta_m == pytest.approx(start[names[0]].norm(dim=1).mean().item(), rel=n_terms * eps)
    assert delta_d == pytest.approx(0.0, abs=eps)


def test_saved_activation_bytes_counts_dora_extra():
    from adapter_fixtures import tiny_llama as make

    batch = {"input_ids": torch.randint(0, 64, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    plain, decomposed = make(), make()
    lora.inject_lora(plain, ["q_proj"], 2, 4)
    dora.inject_dora(decomposed, ["q_proj"], 2, 4)
    saved_lora = dora.saved_activation_bytes(plain, batch)
    saved_dora = dora.saved_activation_bytes(decomposed, batch)
    assert 0 < saved_lora < saved_dora  # DoRA keeps the unscaled output for the gradient of m


def test_length_direction_coupling_is_plus_one_minus_one_or_undefined_by_construction():
    # Unit rows e_i turned by angle theta_i towards e_{i+8} (in their own plane), then scaled by a length
    # factor: the coupling is the correlation, across rows, of (length change, angle).
    theta = torch.linspace(0.05, 0.5, 8, dtype=torch.float64)
    W0 = torch.eye(16, dtype=torch.float64)[:8]  # 8 rows of width 16
    towards = torch.eye(16, dtype=torch.float64)[8:]
    turned = torch.cos(theta)[:, None] * W0 + torch.sin(theta)[:, None] * towards
    assert dora.length_direction_coupling(W0, (1 + theta)[:, None] * turned) == pytest.approx(1.0)
    assert dora.length_direction_coupling(W0, (1 - theta)[:, None] * turned) == pytest.approx(-1.0)
    assert math.isnan(dora.length_direction_coupling(W0, 2 * W0))  # lengths changed, nothing turned
    with pytest.raises(ValueError, match="one shape"):
        dora.length_direction_coupling(W0, W0.T)
