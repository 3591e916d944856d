"""Tests for ftcourse.gguf_lora: a PEFT LoRA adapter written as a GGUF LoRA file loads in llama.cpp on top of
the base GGUF and gives the merged model's logits; its tensors equal llama.cpp's own converter's."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from export_fixtures import *  # noqa: F403
from export_fixtures import load_model, save_adapter

from ftcourse import gguf_lora, llamacpp, merge
from ftcourse.gguf import ExportError

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def adapter_and_lora(export_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A random all-linear adapter (q and k included: their B rows need the RoPE permutation) and its GGUF."""
    out = tmp_path_factory.mktemp("gguf_lora")
    adapter = save_adapter(export_model_dir, out / "adapter", target_modules=ALL_LINEAR, lora_alpha=4)
    return adapter, gguf_lora.write_lora_gguf(adapter, out / "adapter.gguf", export_model_dir)


def test_base_plus_gguf_adapter_equals_the_merged_model(export_model_dir, export_gguf_files, adapter_and_lora,
                                                       export_prompts):  # fmt: skip
    from peft import PeftModel

    adapter, lora = adapter_and_lora
    base, tokenizer = load_model(export_model_dir)
    merged = merge.merge_adapter(PeftModel.from_pretrained(base, adapter))
    f16 = export_gguf_files["f16"]

    compare = llamacpp.compare_with_llama_cpp
    with_adapter = compare(merged, tokenizer, f16, export_prompts, 8, lora_path=str(lora))
    without = compare(merged, tokenizer, f16, export_prompts, 8)

    assert llamacpp.check_comparison(with_adapter, llamacpp.check_tolerance("f16")) == []
    assert with_adapter.greedy_equal_except_ties(2 * F16_MAX_LOGIT_DIFF)  # noqa: F405
    assert without.max_abs_logit_diff > 20 * F16_MAX_LOGIT_DIFF  # noqa: F405  (the adapter is really applied)


def test_file_holds_the_adapter_keys_and_permuted_pairs(export_model_dir, adapter_and_lora):
    adapter, lora = adapter_and_lora
    reader = gguf.GGUFReader(lora)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    pairs = gguf_lora.read_lora_pairs(adapter)

    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 4.0
    assert len(tensors) == 2 * len(pairs) == 2 * 7 * 4  # 7 matrices x 4 layers, an A and a B each
    a = np.asarray(tensors["blk.0.attn_q.weight.lora_a"].data, dtype=np.float32)
    b = np.asarray(tensors["blk.0.attn_q.weight.lora_b"].data, dtype=np.float32)
    pair = pairs["model.layers.0.self_attn.q_proj.weight"]
    np.testing.assert_allclose(a, pair["A"], atol=1e-3)  # A unchanged (f16 rounding)
    assert not np.allclose(b, pair["B"], atol=1e-3)  # B's rows reordered for llama.cpp's RoPE pairs


def test_rslora_scaling_is_carried_by_alpha():
    assert gguf_lora.lora_alpha_for_llama_cpp({"lora_alpha": 16, "r": 4}) == 16
    # rsLoRA scales by alpha / sqrt(r); llama.cpp divides alpha by r
    stored = gguf_lora.lora_alpha_for_llama_cpp({"lora_alpha": 16, "r": 4, "use_rslora": True})
    assert math.isclose(stored / 4, 16 / math.sqrt(4))


def test_adapters_it_cannot_write_are_refused(export_model_dir, tmp_path):
    dora = save_adapter(export_model_dir, tmp_path / "dora", use_dora=True)
    with pytest.raises(ExportError, match="use_dora"):
        gguf_lora.write_lora_gguf(dora, tmp_path / "dora.gguf", export_model_dir)
    with pytest.raises(ExportError, match="f32 or f16"):
        gguf_lora.write_lora_gguf(dora, tmp_path / "x.gguf", export_model_dir, "q8_0")
    assert not list(tmp_path.glob("*.gguf"))


@pytest.mark.skipif(
    not os.environ.get("FTCOURSE_LLAMA_CPP_SRC"),
    reason="FTCOURSE_LLAMA_CPP_SRC unset: llama.cpp's source (vendor/llama.cpp of llama-cpp-python's sdist)",
)
def test_tensors_equal_llama_cpps_own_converter(export_model_dir, adapter_and_lora, tmp_path):
    source = Path(os.environ["FTCOURSE_LLAMA_CPP_SRC"])
    adapter, lora = adapter_and_lora
    theirs = tmp_path / "theirs.gguf"
    command = [sys.executable, str(source / "convert_lora_to_gguf.py"), str(adapter), "--base",
               str(export_model_dir), "--outtype", "f16", "--outfile", str(theirs)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(source / "gguf-py")}
    subprocess.run(command, check=True, env=env, capture_output=True, timeout=300)

    ours_t = {t.name: t for t in gguf.GGUFReader(lora).tensors}
    theirs_t = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    assert set(ours_t) == set(theirs_t)
    for name, tensor in ours_t.items():
        assert tensor.tensor_type == theirs_t[name].tensor_type and np.array_equal(
            np.asarray(tensor.data), np.asarray(theirs_t[name].data)
        ), name
