"""Tests for ftcourse.merge: merging is exact, the copy does not run the original, and an adapter must
fit its base."""

from __future__ import annotations

import types

import pytest
import torch
from export_fixtures import *  # noqa: F403
from export_fixtures import MERGE_MAX_LOGIT_DIFF, copy_model_dir, edit_config, load_model, save_adapter

from ftcourse import merge
from ftcourse.gguf import ExportError


def test_merged_model_logits_equal_adapted_model(export_model_dir):
    from peft import LoraConfig, PeftModel, get_peft_model

    model, tokenizer = load_model(export_model_dir)
    torch.manual_seed(1)
    # init_lora_weights=False: B is random too, so the adapter changes the output (B = 0 would not)
    adapted = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    )
    input_ids = tokenizer(["Kalo miten ravo, said 42. Once upon a time"], return_tensors="pt")["input_ids"]
    merged = merge.merge_adapter(adapted)

    assert not isinstance(merged, PeftModel)
    assert merge.max_logit_difference(merged, adapted, input_ids) < MERGE_MAX_LOGIT_DIFF
    with adapted.disable_adapter():  # the check can fail: the adapter does move the logits
        assert merge.max_logit_difference(merged, adapted, input_ids) > 1e-2
    layer = adapted.base_model.model.model.layers[0].self_attn.q_proj  # W = W0 + (alpha / r) B A, by hand
    by_hand = (
        layer.base_layer.weight + 16 / 8 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    )
    # B·A sums r = 8 products and W0 + s·B·A adds one more term, in the weights' dtype: each element is good
    # to (r + 1)·eps of the sum of its terms' sizes, |W0| + s·|B|·|A|.
    eps = torch.finfo(by_hand.dtype).eps
    B, A = layer.lora_B["default"].weight, layer.lora_A["default"].weight
    scale = (layer.base_layer.weight.abs() + 16 / 8 * B.abs() @ A.abs()).max()
    merged_weight = merged.model.layers[0].self_attn.q_proj.weight
    assert merged_weight.dtype == by_hand.dtype
    torch.testing.assert_close(merged_weight, by_hand, rtol=0, atol=(8 + 1) * eps * scale.item())


def test_merged_copy_does_not_run_the_original_model(export_model_dir):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load_model(export_model_dir)
    original_forward = model.forward

    def patched_forward(self, *args, **kwargs):  # what TRL's fused LM head does to a model it trains
        return original_forward(*args, **kwargs)

    model.forward = types.MethodType(patched_forward, model)
    torch.manual_seed(1)
    adapted = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
    input_ids = tokenizer(["Kalo miten ravo, said 42."], return_tensors="pt")["input_ids"]
    merged = merge.merge_adapter(adapted)

    with adapted.disable_adapter():  # a copy that still called the original would follow the switch
        assert merge.max_logit_difference(merged, adapted, input_ids) > 1e-2
    assert merge.max_logit_difference(merged, adapted, input_ids) < MERGE_MAX_LOGIT_DIFF


# --- An adapter must fit its base -----------------------------------------------------------------


@pytest.fixture(scope="module")
def deeper_and_shallower(export_model_dir, tmp_path_factory):
    """(adapter trained on the 4-layer model, a 2-layer base of the same widths)."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("fit")
    adapter = save_adapter(export_model_dir, root / "adapter")
    shallow = copy_model_dir(export_model_dir, root / "shallow")
    weights = load_file(shallow / "model.safetensors")
    weights = {k: v for k, v in weights.items() if not any(f"layers.{i}." in k for i in (2, 3))}
    save_file(weights, shallow / "model.safetensors", metadata={"format": "pt"})
    edit_config(shallow, num_hidden_layers=2)
    return adapter, shallow


def test_adapter_for_a_deeper_model_is_refused(deeper_and_shallower):
    adapter, shallow = deeper_and_shallower
    with pytest.raises(ExportError, match=r"does not fit the base .*8 adapter tensors have no module"):
        merge.load_adapter(adapter, shallow)  # layers 2-3: 2 modules x (A, B) x 2 layers = 8 tensors


def test_a_different_base_than_recorded_is_reported(deeper_and_shallower, export_model_dir, tmp_path):
    adapter, _ = deeper_and_shallower
    other = copy_model_dir(export_model_dir, tmp_path / "other-base")

    loaded = merge.load_adapter(adapter, other)
    assert len(loaded.notes) == 1 and "records base model" in loaded.notes[0]
    assert merge.load_adapter(adapter).notes == []  # the recorded base: nothing to say


def test_damaged_base_is_refused_before_loading(deeper_and_shallower, export_model_dir, tmp_path):
    adapter, _ = deeper_and_shallower
    base = copy_model_dir(export_model_dir, tmp_path / "base")
    (base / "model.safetensors").write_bytes(b"")
    with pytest.raises(ExportError, match=r"base model folder cannot be used: .*model\.safetensors is empty"):
        merge.load_adapter(adapter, base)
    edit_config(base, architectures=["Qwen2ForCausalLM"])
    with pytest.raises(ExportError, match="Qwen2ForCausalLM"):
        merge.load_adapter(adapter, base)


def test_damaged_adapter_file_is_named(deeper_and_shallower, tmp_path):
    import shutil

    adapter = shutil.copytree(deeper_and_shallower[0], tmp_path / "adapter")
    (adapter / "adapter_model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(ExportError, match=r"adapter_model\.safetensors is not a readable safetensors"):
        merge.read_adapter_config(adapter)
