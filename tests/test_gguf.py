"""Tests for ftcourse.gguf: our GGUF writer (Q/K permutation, tokenizer, metadata), its reader, and the
checks that refuse a damaged or inconsistent model folder before a byte is written."""

from __future__ import annotations

import gguf
import pytest
import torch
from export_fixtures import *  # noqa: F403
from export_fixtures import CONVERSATION, copy_model_dir, edit_config
from jinja2.sandbox import ImmutableSandboxedEnvironment
from safetensors.torch import load_file, save_file

from ftcourse import gguf as ftgguf
from ftcourse import llamacpp
from ftcourse.atomic import OutputError

# --- The writer, read back independently -------------------------------------------------------


def test_permute_qk_matches_a_hand_worked_head():
    # one head of dim 4: HF rotates pairs (x0, x2) and (x1, x3); llama.cpp wants them as rows (0, 1), (2, 3)
    weight = torch.arange(8, dtype=torch.float32).reshape(4, 2).numpy()  # rows r0..r3, two inputs each
    permuted = ftgguf.permute_qk(weight, n_heads=1)

    assert permuted.tolist() == [[0, 1], [4, 5], [2, 3], [6, 7]]  # r0, r2, r1, r3
    two_heads = ftgguf.permute_qk(torch.arange(16.0).reshape(8, 2).numpy(), n_heads=2)
    assert two_heads[4:].tolist() == [[8, 9], [12, 13], [10, 11], [14, 15]]  # each head on its own


def test_transformers_reads_back_the_same_tensors(export_model_dir, export_hf, export_gguf_files, tmp_path):
    original = export_hf[0].state_dict()
    read_back = ftgguf.load_gguf_with_transformers(export_gguf_files["f16"]).state_dict()

    assert set(read_back) == set(original)
    for name, tensor in original.items():  # f16 keeps 11 significant bits: relative error <= 2**-11
        assert (read_back[name] - tensor).abs().max() <= 1e-3 * tensor.abs().max(), name
    # transformers undoes llama.cpp's Q/K order; without our permutation q_proj comes back scrambled
    unpermuted = ftgguf.load_gguf_with_transformers(
        ftgguf.write_gguf(export_model_dir, tmp_path / "no-permute.gguf", "f16", permute=False)
    ).state_dict()
    q_name = "model.layers.0.self_attn.q_proj.weight"
    assert (unpermuted[q_name] - original[q_name]).abs().max() > 10 * (
        read_back[q_name] - original[q_name]
    ).abs().max()


def test_gguf_tokenizer_round_trips_ids(export_hf, export_gguf_files):
    from transformers import AutoTokenizer

    tokenizer = export_hf[1]
    path = export_gguf_files["f16"]
    llm = llamacpp.open_llama(path, n_ctx=64, vocab_only=True)
    gguf_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    texts = [  # the first two tell GPT-2's pre-tokenizer from llama-bpe/qwen2/default (" 42" vs " ", "42")
        "Kalo miten ravo, said 42.",
        "(7 + 3 = 10). It'S DONE\r\n\n  x",
        "Hello world!  Two  spaces,\ttab\n\nand lines",
        "<|im_start|>user\nÜnïcödé 数字 123456 it's<|im_end|>",
        " leading space",
        "emoji 🙂 'quotes' don't",
        tokenizer.apply_chat_template(CONVERSATION, tokenize=False),
    ]
    try:
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
            assert llm.detokenize(ids, special=True).decode() == text
            assert gguf_tokenizer(text, add_special_tokens=False)["input_ids"] == ids, text
    finally:
        llm.close()


def test_gguf_metadata_and_chat_template(export_hf, export_gguf_files):
    tokenizer = export_hf[1]
    fields = ftgguf.read_metadata(export_gguf_files["f16"])
    keys = gguf.Keys.Tokenizer
    template = fields[keys.CHAT_TEMPLATE]

    assert fields[gguf.Keys.General.ARCHITECTURE] == "llama"
    assert (fields[keys.MODEL], fields[keys.PRE]) == ("gpt2", "gpt-2")
    assert fields[keys.ADD_BOS] is False
    assert fields[keys.EOS_ID] == tokenizer.eos_token_id
    assert fields[keys.PAD_ID] == tokenizer.pad_token_id
    assert len(fields[keys.LIST]) == export_hf[0].config.vocab_size
    assert fields["llama.block_count"] == export_hf[0].config.num_hidden_layers
    # the embedded template drops {% generation %} yet renders exactly what transformers renders
    assert "generation %}" not in template
    for add_generation_prompt in (True, False):
        rendered = (
            ImmutableSandboxedEnvironment()
            .from_string(template)
            .render(messages=CONVERSATION, add_generation_prompt=add_generation_prompt)
        )
        assert rendered == tokenizer.apply_chat_template(
            CONVERSATION, tokenize=False, add_generation_prompt=add_generation_prompt
        )


def test_gguf_stats_count_every_weight_and_its_type(export_hf, export_gguf_files):
    n_parameters = sum(p.numel() for p in export_hf[0].parameters())
    f16, q8_0, q4_k_m = (ftgguf.gguf_stats(export_gguf_files[q]) for q in ("f16", "q8_0", "Q4_K_M"))

    assert f16.n_weights == q8_0.n_weights == q4_k_m.n_weights == n_parameters
    assert set(q8_0.weights_per_type) == {"Q8_0", "F32"}  # norms stay f32
    assert q8_0.tensor_bits_per_weight == pytest.approx(8.5, abs=0.05)  # 34 bytes per block of 32
    assert "Q4_K" in q4_k_m.weights_per_type and q4_k_m.tensor_bits_per_weight < 6
    assert f16.bits_per_weight > f16.tensor_bits_per_weight  # the file also carries the tokenizer
    assert f16.file_bytes == export_gguf_files["f16"].stat().st_size


def test_q8_0_round_trip_stays_within_half_a_step():
    torch.manual_seed(0)
    weight = torch.randn(4, 64).numpy()
    error = abs(ftgguf.q8_0_round_trip(weight) - weight).reshape(-1, 32)
    half_step = abs(weight).reshape(-1, 32).max(axis=1, keepdims=True) / 127 / 2

    # the scale d is stored as f16 (relative error 2**-11), and |q| <= 127 multiplies that error
    assert (error <= half_step * (1 + 2 * 127 * 2**-11)).all()
    assert error.max() > 0  # it is a real quantization, not a copy


# --- A model folder is checked before anything is written ---------------------------------------


@pytest.fixture
def model_copy(export_model_dir, tmp_path):
    """A copy of the fixture model that the test may damage."""
    return copy_model_dir(export_model_dir, tmp_path / "model")


def _refused(model_dir, tmp_path, match: str) -> None:
    """write_gguf raises ExportError matching `match` and leaves no output file behind."""
    out = tmp_path / "out" / "model.gguf"
    with pytest.raises(ftgguf.ExportError, match=match):
        ftgguf.write_gguf(model_dir, out)
    assert not out.exists() and not any(out.parent.glob(".*partial"))


def _rewrite_weights(model_dir, edit) -> None:
    weights = load_file(model_dir / "model.safetensors")
    edit(weights)
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})


def test_unsupported_architecture_is_named(model_copy, tmp_path):
    edit_config(model_copy, architectures=["MistralForCausalLM"])
    _refused(model_copy, tmp_path, "MistralForCausalLM.*supports LlamaForCausalLM")


def test_missing_tokenizer_file_is_named(model_copy, tmp_path):
    (model_copy / "tokenizer.json").unlink()
    _refused(model_copy, tmp_path, r"has no tokenizer\.json")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"num_hidden_layers": 3}, r"does not have: model\.layers\.3\."),
        ({"num_hidden_layers": 5}, r"says 5 layers.*lack model\.layers\.4\."),
        ({"num_attention_heads": 8}, r"8 heads x 64 dims.*shapes disagree.*q_proj"),
        ({"num_key_value_heads": 4}, r"4 KV heads.*shapes disagree.*k_proj"),
        ({"num_key_value_heads": 3}, "cannot share 3 KV heads"),
        ({"intermediate_size": 512}, r"shapes disagree.*gate_proj"),
        ({"tie_word_embeddings": True}, r"tie_word_embeddings, but lm_head\.weight differs"),
    ],
)
def test_config_that_disagrees_with_the_weights_is_refused(model_copy, tmp_path, change, match):
    edit_config(model_copy, **change)
    _refused(model_copy, tmp_path, match)


def test_missing_tensor_is_refused(model_copy, tmp_path):
    _rewrite_weights(model_copy, lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    _refused(model_copy, tmp_path, r"lack model\.layers\.1\.mlp\.up_proj\.weight")


def test_bias_tensors_are_refused_not_written_unpermuted(model_copy, tmp_path):
    bias = {"model.layers.0.self_attn.q_proj.bias": torch.zeros(256)}
    _rewrite_weights(model_copy, lambda w: w.update(bias))
    _refused(model_copy, tmp_path, r"q_proj\.bias.*Bias tensors need attention_bias")


def test_nan_weights_are_refused(model_copy, tmp_path):
    _rewrite_weights(model_copy, lambda w: w["model.norm.weight"].__setitem__(0, float("nan")))
    _refused(model_copy, tmp_path, r"model\.norm\.weight.*NaN")


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda p: p.write_bytes(b""), "is empty"),
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "not a readable safetensors"),
        (lambda p: p.write_bytes(b"\x93garbage" * 64), "not a readable safetensors"),
    ],
    ids=["empty", "truncated", "garbage"],
)
def test_damaged_safetensors_is_named(model_copy, tmp_path, damage, match):
    damage(model_copy / "model.safetensors")
    _refused(model_copy, tmp_path, rf"model\.safetensors.*{match}|{match}.*model\.safetensors")


def test_invalid_or_incomplete_config_is_named(model_copy, tmp_path):
    (model_copy / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    _refused(model_copy, tmp_path, r"config\.json is not valid JSON")
    (model_copy / "config.json").write_text('["LlamaForCausalLM"]')
    _refused(model_copy, tmp_path, r"config\.json holds a list")
    (model_copy / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 256}')
    _refused(model_copy, tmp_path, r"lacks intermediate_size, num_hidden_layers")


def test_second_safetensors_file_is_refused(model_copy, tmp_path):
    (model_copy / "copy.safetensors").write_bytes((model_copy / "model.safetensors").read_bytes())
    _refused(model_copy, tmp_path, r"2 safetensors files \(copy\.safetensors, model\.safetensors\)")


def test_output_paths_that_cannot_hold_a_file_are_refused(export_model_dir, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")  # works as root too, unlike chmod
    (tmp_path / "a-folder.gguf").mkdir()

    with pytest.raises(OutputError, match="Cannot write .*a-file/model.gguf: .*a-file is a file"):
        ftgguf.write_gguf(export_model_dir, tmp_path / "a-file" / "model.gguf")
    with pytest.raises(OutputError, match="a-folder.gguf: it is a folder"):
        ftgguf.write_gguf(export_model_dir, tmp_path / "a-folder.gguf")
    with pytest.raises(OutputError, match="Cannot write /proc/ftcourse-test/model.gguf"):
        ftgguf.write_gguf(export_model_dir, "/proc/ftcourse-test/model.gguf")  # /proc refuses even root


def test_failed_write_leaves_no_half_written_file(export_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"the previous export")
    original_write = gguf.GGUFWriter.write_tensors_to_file

    def write_then_crash(self, **kwargs):
        self.fout[0].write(b"\0" * 1000)  # some tensor bytes reach the disk...
        raise KeyboardInterrupt  # ...then the user presses Ctrl-C

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", write_then_crash)
    with pytest.raises(KeyboardInterrupt):
        ftgguf.write_gguf(export_model_dir, out)

    assert out.read_bytes() == b"the previous export"  # untouched, not half-overwritten
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]  # no temporary file left behind
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", original_write)
    ftgguf.write_gguf(export_model_dir, out)
    assert out.read_bytes()[:4] == b"GGUF"


def test_unknown_dtype_is_refused_before_reading(tmp_path):
    with pytest.raises(ftgguf.ExportError, match="write_gguf writes f32, f16, q8_0; got 'Q4_K_M'"):
        ftgguf.write_gguf(tmp_path / "does-not-exist", tmp_path / "out.gguf", "Q4_K_M")


def test_weight_beyond_f16_range_is_refused_not_written_as_inf(model_copy, tmp_path):
    # 1e6 > 65504: an f16 file would hold inf and load without a word; f32 stores it as it is.
    _rewrite_weights(model_copy, lambda w: w["model.layers.0.mlp.up_proj.weight"].__setitem__((0, 0), 1e6))
    _refused(model_copy, tmp_path, r"up_proj\.weight.*magnitude 1e\+06.*written as inf.*--quant f32")
    assert ftgguf.write_gguf(model_copy, tmp_path / "model-f32.gguf", "f32").is_file()


def test_refusal_for_other_models_says_what_to_do_when_the_converter_stops(model_copy, tmp_path):
    edit_config(model_copy, architectures=["MistralForCausalLM"])
    _refused(model_copy, tmp_path, r"(?s)convert_hf_to_gguf\.py.*pre-tokenizer was not recognized.*chkhsh")
