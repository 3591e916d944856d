"""Tests for ftcourse.merge.merge_streaming: it equals peft's merge_and_unload bit for bit, shard by shard,
keeps peak memory near one shard, and refuses adapters it cannot merge exactly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ftcourse import merge, toy
from ftcourse.gguf import ExportError

RANK, ALPHA = 4, 12  # alpha != rank and != sqrt(rank)·something trivial: a wrong scaling changes the bits


def save_base(out: Path, dtype: torch.dtype, max_shard_size: str | None = None, source: Path | None = None):
    """The toy model (or source) saved in dtype, as one file or as shards of at most max_shard_size."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = source or toy.model_dir()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def save_lora(base: Path, out: Path, dtype: torch.dtype = torch.float32, seed: int = 2, **options) -> Path:
    """A random (non-zero B) peft LoRA adapter on the model in base, saved with peft's save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    torch.manual_seed(seed)
    config = {"r": RANK, "lora_alpha": ALPHA, "target_modules": "all-linear", "init_lora_weights": False}
    get_peft_model(model, LoraConfig(**{**config, **options})).save_pretrained(out)
    return out


def peft_merged_state(base: Path, adapter: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """peft's own merge: the base in dtype, the adapter loaded with PeftModel, merge_and_unload()."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in folder."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def assert_bit_equal(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    """Same names, dtypes and bits (torch.equal), with the first differing tensor named on failure."""
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        assert tensor.dtype == theirs[name].dtype, name
        assert torch.equal(tensor, theirs[name]), (
            f"{name}: max |diff| {(tensor.float() - theirs[name].float()).abs().max().item()}"
        )


# --- The arithmetic, by hand ---------------------------------------------------------------------------


def test_lora_scaling_is_alpha_over_r_or_over_sqrt_r():
    assert merge.lora_scaling({"r": 4, "lora_alpha": 12}) == 3.0
    assert merge.lora_scaling({"r": 4, "lora_alpha": 12, "use_rslora": True}) == 6.0


def test_merged_weight_by_hand():
    W0 = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # (out=2, in=3)
    A = torch.tensor([[1.0, 0.0, 2.0]])  # (r=1, in=3)
    B = torch.tensor([[1.0], [-1.0]])  # (out=2, r=1)
    # B·A = [[1, 0, 2], [-1, 0, -2]]; times s = 0.5; plus W0
    expected = torch.tensor([[1.5, 2.0, 4.0], [3.5, 5.0, 5.0]])
    assert torch.equal(merge.merged_weight(W0, A, B, 0.5, fan_in_fan_out=False), expected)
    # Conv1D layout: W0 stored as (in, out), the update transposed to match
    merged_t = merge.merged_weight(W0.T.contiguous(), A, B, 0.5, fan_in_fan_out=True)
    assert torch.equal(merged_t, expected.T) and merged_t.is_contiguous()
    # bfloat16: one rounding of the float32 sum, as peft's W0 += delta. Near 256 bfloat16 steps by 2.
    # 256 + 1.00390625 = 257.0039 rounds once to 258; rounding the delta to bfloat16 first (1 + 2^-8 -> 1.0)
    # would give 257, a tie, rounded to even: 256.
    W0_bf16 = torch.tensor([[256.0]], dtype=torch.bfloat16)
    merged_bf16 = merge.merged_weight(
        W0_bf16, torch.tensor([[1.0]]), torch.tensor([[1.00390625]]), 1.0, False
    )
    assert merged_bf16.dtype == torch.bfloat16 and merged_bf16.item() == 258.0


# --- Equal to peft's merge_and_unload ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "max_shard_size", "use_rslora"),
    [
        (torch.float32, None, False),
        (torch.float32, "1MB", True),
        (torch.bfloat16, "1MB", False),
        (torch.bfloat16, None, True),
    ],
    ids=["f32-one-file", "f32-shards-rslora", "bf16-shards", "bf16-one-file-rslora"],
)
def test_streaming_merge_equals_peft_bit_for_bit(tmp_path, dtype, max_shard_size, use_rslora):
    base = save_base(tmp_path / "base", dtype, max_shard_size)
    adapter = save_lora(base, tmp_path / "adapter", dtype, use_rslora=use_rslora)
    result = merge.merge_streaming(adapter, tmp_path / "merged")

    # peft: delta = (B @ A) * s in float32, then W0 += delta rounded once; merge_streaming does the same
    assert_bit_equal(read_folder(result.out_dir), peft_merged_state(base, adapter, dtype))
    assert result.merged_weights == 7 * 4  # all-linear: 7 projections in each of the 4 layers
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert sorted(result.shards) == shards == sorted(p.name for p in result.out_dir.glob("*.safetensors"))
    if max_shard_size:
        assert len(shards) > 3  # the test is about several shards
        index = json.loads((result.out_dir / merge.BASE_INDEX).read_text())
        base_index = json.loads((base / merge.BASE_INDEX).read_text())
        assert index["weight_map"] == base_index["weight_map"]
        assert index["metadata"]["total_size"] == base_index["metadata"]["total_size"]  # same dtype, shapes
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (result.out_dir / name).read_bytes() == (base / name).read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_streaming_merge_loads_and_changes_the_logits(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = save_lora(toy.model_dir(), tmp_path / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(merge.merge_streaming(adapter, tmp_path / "m").out_dir)
    base = AutoModelForCausalLM.from_pretrained(toy.model_dir())
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(toy.model_dir()), adapter)
    ids = torch.randint(0, 4096, (2, 12), generator=torch.Generator().manual_seed(1))
    # merged vs adapted: float32 sums of B·A·x in another order; the existing in-memory bound applies
    assert merge.max_logit_difference(merged, adapted, ids) < 1e-4
    assert merge.max_logit_difference(merged, base, ids) > 1e-2  # the adapter did change the model


def test_fan_in_fan_out_conv1d_equals_peft(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "b")
    adapter = save_lora(
        tmp_path / "b", tmp_path / "a", target_modules=["c_attn", "c_fc"], fan_in_fan_out=True
    )
    assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    ours = read_folder(merge.merge_streaming(adapter, tmp_path / "m").out_dir)
    theirs = peft_merged_state(tmp_path / "b", adapter, torch.float32)
    assert set(theirs) - set(ours) == {"lm_head.weight"}  # tied to wte: not stored in the file
    assert_bit_equal(ours, {k: v for k, v in theirs.items() if k in ours})


def test_standin_llama31_shape_equals_peft(tmp_path):
    from ftcourse.toy import standin

    source = standin.build_standins() / "model"  # Llama 3.1's architecture, bfloat16, built once and cached
    base = save_base(tmp_path / "base", torch.bfloat16, "200KB", source=source)
    assert len(list(base.glob("*.safetensors"))) > 3
    adapter = save_lora(base, tmp_path / "adapter", torch.bfloat16)
    result = merge.merge_streaming(adapter, tmp_path / "merged")
    assert_bit_equal(read_folder(result.out_dir), peft_merged_state(base, adapter, torch.bfloat16))


# --- Peak memory: one shard, not the model -------------------------------------------------------------

MEASURE = r"""
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file
from ftcourse import merge

mode, base, adapter, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
def status_kib(field):  # VmRSS: resident now; VmHWM: the peak of VmRSS (this process's memory map)
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
try:  # "5" resets VmHWM to the current VmRSS (Linux >= 4.0): the imports' own peak is forgotten
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
except OSError:
    pass
before = max(status_kib("VmRSS"), status_kib("VmHWM"))
if mode == "streaming":
    merge.merge_streaming(adapter, out)
else:  # what an in-memory merge must hold at least: every tensor of the model at once, in memory
    # (load_file maps the file and reads a page only when touched: clone() reads every byte, as a load does)
    held = [{k: v.clone() for k, v in load_file(p).items()} for p in sorted(base.glob("*.safetensors"))]
print(json.dumps({"before": before, "peak": status_kib("VmHWM")}))
"""


def peak_rise_bytes(mode: str, base: Path, adapter: Path, out: Path) -> int:
    """How far a fresh process's peak resident set (VmHWM) rose above its resident set before the merge."""
    # Not ru_maxrss: Linux carries the parent's peak into a child across fork and exec, so a child of a
    # big pytest process would report the parent's peak. VmHWM belongs to the child's own memory map.
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, mode, str(base), str(adapter), str(out)],
        capture_output=True, text=True, check=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    numbers = json.loads(done.stdout.strip().splitlines()[-1])
    return 1024 * (numbers["peak"] - numbers["before"])


def test_peak_memory_is_about_one_shard_not_the_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048, hidden_size=512, intermediate_size=1024, num_hidden_layers=16,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base", max_shard_size="8MB")  # ~160 MB float32
    adapter = save_lora(tmp_path / "base", tmp_path / "adapter", r=8)
    shards = sorted((tmp_path / "base").glob("*.safetensors"))
    model_bytes = sum(p.stat().st_size for p in shards)
    largest_shard = max(p.stat().st_size for p in shards)
    adapter_bytes = (adapter / merge.ADAPTER_WEIGHTS).stat().st_size
    assert len(shards) >= 15 and model_bytes > 12 * (largest_shard + adapter_bytes)

    streaming = peak_rise_bytes("streaming", tmp_path / "base", adapter, tmp_path / "merged")
    holding = peak_rise_bytes("holding", tmp_path / "base", adapter, tmp_path / "unused")
    # A shard is resident up to three times (its mapped file, the tensors read, the merged tensors) and the
    # adapter once: a generous factor of 4, plus 16 MiB for the allocator and Python, bounds the streaming
    # merge; holding the model cannot fit under it.
    bound = 4 * (largest_shard + adapter_bytes) + 16 * 2**20
    mib = {k: round(v / 2**20, 1) for k, v in dict(streaming=streaming, holding=holding, bound=bound).items()}
    assert streaming < bound, mib
    assert holding > model_bytes * 0.9 > bound, mib  # the measurement can see a whole model
    assert merge.read_adapter_config(adapter)["r"] == 8
    assert len(read_folder(tmp_path / "merged")) == len(read_folder(tmp_path / "base"))


# --- Refusals -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_adapter(tmp_path_factory) -> Path:
    """A LoRA adapter on q_proj and v_proj of the toy model (fp32, one file)."""
    return save_lora(
        toy.model_dir(), tmp_path_factory.mktemp("toy") / "adapter", target_modules=["q_proj", "v_proj"]
    )


def edited_adapter(adapter: Path, out: Path, edit) -> Path:
    """A copy of adapter whose tensors edit(tensors) rewrote in place."""
    shutil.copytree(adapter, out)
    tensors = load_file(out / merge.ADAPTER_WEIGHTS)
    edit(tensors)
    save_file(tensors, out / merge.ADAPTER_WEIGHTS, metadata={"format": "pt"})
    return out


def edited_config(adapter: Path, out: Path, **changes) -> Path:
    """A copy of adapter with adapter_config.json changed."""
    shutil.copytree(adapter, out)
    config = json.loads((out / merge.ADAPTER_CONFIG).read_text())
    (out / merge.ADAPTER_CONFIG).write_text(json.dumps({**config, **changes}))
    return out


def test_refuses_dora_with_a_reason(tmp_path):
    adapter = save_lora(toy.model_dir(), tmp_path / "dora", target_modules=["q_proj"], use_dora=True)
    with pytest.raises(ExportError, match="use_dora.*DoRA rescales"):
        merge.merge_streaming(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
        ({"lora_bias": True}, "lora_bias"),
        ({"peft_type": "IA3"}, "IA3 adapter"),
    ],
)
def test_refuses_options_it_cannot_merge_exactly(toy_adapter, tmp_path, changes, message):
    with pytest.raises(ExportError, match=message):
        merge.merge_streaming(edited_config(toy_adapter, tmp_path / "a", **changes), tmp_path / "out")


def test_refuses_an_adapter_key_it_would_leave_unused(tmp_path):
    # peft's own save of an embedding adapter: lora_embedding_A/B and the embedding itself
    adapter = save_lora(toy.model_dir(), tmp_path / "emb", target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(ExportError, match="not LoRA A/B weights.*embed_tokens"):
        merge.merge_streaming(adapter, tmp_path / "out")


def test_refuses_half_a_pair(toy_adapter, tmp_path):
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    adapter = edited_adapter(toy_adapter, tmp_path / "a", lambda t: t.pop(key))
    with pytest.raises(ExportError, match="lora_A without lora_B.*layers.1.self_attn.v_proj"):
        merge.merge_streaming(adapter, tmp_path / "out")


def test_refuses_a_module_the_base_lacks(toy_adapter, tmp_path):
    shallow = shutil.copytree(toy.model_dir(), tmp_path / "shallow")
    weights = load_file(shallow / "model.safetensors")
    kept = {k: v for k, v in weights.items() if not any(f"layers.{i}." in k for i in (2, 3))}
    save_file(kept, shallow / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError, match="modules the base .* does not have, e.g. model.layers.2"):
        merge.merge_streaming(toy_adapter, tmp_path / "out", shallow, allow_other_base=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("which", ["A", "B", "rank"])
def test_refuses_shapes_that_do_not_fit(toy_adapter, tmp_path, which):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_"
    if which == "rank":  # the config's r disagrees with the tensors
        adapter = edited_config(toy_adapter, tmp_path / "a", r=RANK * 2)
    else:  # one input or output column too few

        def cut(tensors):
            name = f"{key}{which}.weight"
            tensors[name] = tensors[name][:, :-1] if which == "A" else tensors[name][:-1]
            tensors[name] = tensors[name].contiguous()

        adapter = edited_adapter(toy_adapter, tmp_path / "a", cut)
    with pytest.raises(ExportError, match="does not fit the base.*q_proj.weight is \\[256, 256\\]"):
        merge.merge_streaming(adapter, tmp_path / "out")


def test_refuses_another_base_unless_told(toy_adapter, tmp_path):
    other = shutil.copytree(toy.model_dir(), tmp_path / "other-model")
    with pytest.raises(ExportError, match="was trained on .* allow_other_base=True"):
        merge.merge_streaming(toy_adapter, tmp_path / "out", other)
    result = merge.merge_streaming(toy_adapter, tmp_path / "out", other, allow_other_base=True)
    assert result.merged_weights == 2 * 4 and "records base model" in result.notes[0]


def test_a_hub_id_matches_its_cache_or_download_folder(tmp_path):
    cache = tmp_path / "models--meta-llama--Llama-3.1-70B" / "snapshots" / "abc123"
    download = tmp_path / "Llama-3.1-70B"
    for folder in (cache, download, tmp_path / "Llama-3.1-8B"):
        folder.mkdir(parents=True)
    assert merge._same_base("meta-llama/Llama-3.1-70B", cache)
    assert merge._same_base("meta-llama/Llama-3.1-70B", download)
    assert not merge._same_base("meta-llama/Llama-3.1-70B", tmp_path / "Llama-3.1-8B")


def test_refuses_a_base_without_safetensors(toy_adapter, tmp_path):
    base = tmp_path / "bin-only"
    base.mkdir()
    (base / "config.json").write_text("{}")
    with pytest.raises(ExportError, match="neither model.safetensors.index.json nor model.safetensors"):
        merge.merge_streaming(toy_adapter, tmp_path / "out", base, allow_other_base=True)


def test_a_failure_mid_stream_leaves_nothing_behind(toy_adapter, tmp_path, monkeypatch):
    base = save_base(tmp_path / "base", torch.float32, "1MB")
    calls = []

    def fail_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return original(*args, **kwargs)

    original = merge.merged_weight
    monkeypatch.setattr(merge, "merged_weight", fail_on_third)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("the previous export")
    with pytest.raises(OSError, match="disk full"):
        merge.merge_streaming(toy_adapter, tmp_path / "out", base, allow_other_base=True)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]  # the old folder, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "out"]  # no temporary folder left


# --- merge_into_folder: what the export pipeline calls --------------------------------------------------


def test_merge_into_folder_streams_a_lora_adapter(toy_adapter, tmp_path, monkeypatch):
    monkeypatch.setattr(merge, "load_adapter", lambda *a, **k: pytest.fail("the whole model was loaded"))
    folder, notes = merge.merge_into_folder(toy_adapter, tmp_path / "hf")
    assert notes == []
    assert_bit_equal(read_folder(folder), peft_merged_state(toy.model_dir(), toy_adapter, torch.float32))


def test_merge_into_folder_merges_dora_in_memory_with_a_note(tmp_path):
    adapter = save_lora(toy.model_dir(), tmp_path / "dora", target_modules=["q_proj"], use_dora=True)
    assert "use_dora" in merge.streaming_refusal(adapter)
    folder, notes = merge.merge_into_folder(adapter, tmp_path / "hf")
    assert len(notes) == 1 and "merged in memory in float32" in notes[0] and "use_dora" in notes[0]
    theirs = peft_merged_state(toy.model_dir(), adapter, torch.float32)
    ours = read_folder(folder)
    name = "model.layers.0.self_attn.q_proj.weight"
    # peft's own merge (save_merged calls merge_and_unload) on the same float32 model: the same bits
    assert torch.equal(ours[name], theirs[name])
    assert not torch.equal(ours[name], load_file(toy.model_dir() / "model.safetensors")[name])


def test_merge_into_folder_refuses_a_damaged_base_before_work(toy_adapter, tmp_path):
    base = shutil.copytree(toy.model_dir(), tmp_path / "base")
    (base / "config.json").write_text("{not json")
    with pytest.raises(ExportError, match="base model folder cannot be used: .*config.json"):
        merge.merge_into_folder(toy_adapter, tmp_path / "hf", base)
    assert not (tmp_path / "hf").exists()


def test_export_pipeline_streams_the_standin_adapter_in_bfloat16(tmp_path, monkeypatch):
    from ftcourse import export
    from ftcourse.toy import standin

    source = standin.build_standins() / "model"  # bfloat16, as Llama 3.1's checkpoints
    adapter = save_lora(source, tmp_path / "adapter", torch.bfloat16)
    monkeypatch.setattr(merge, "load_adapter", lambda *a, **k: pytest.fail("the whole model was loaded"))
    result = export.export_pipeline(adapter, tmp_path / "out", ("f16",), progress=False)
    assert result.notes == [] and result.gguf_files["f16"].is_file()
    # the merged folder keeps the base's dtype: a 70B export writes about 141 GB, not 280 GB of float32
    assert_bit_equal(read_folder(result.hf_dir), peft_merged_state(source, adapter, torch.bfloat16))
