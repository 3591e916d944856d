"""Tests for ftcourse.export and ftcourse.modelfile: merging, GGUF, llama.cpp agreement, Ollama, CLI.

Every test takes the model folder from the `export_model_dir` fixture: by default the book's embedded
model (`ftcourse.toy.model_dir()`). Set FTCOURSE_EXPORT_MODEL_DIR to run the same tests on another
Llama folder.

llama-cpp-python is a test dependency: without it the llama.cpp tests fail (they never skip).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import gguf
import pytest
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ftcourse import export, modelfile, toy
from ftcourse.cli import main as cli_main

CONVERSATION = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "And another?"},
]
# Tolerances, with what was measured while writing them (a 2-layer fixture; the embedded model passes too).
F16_MAX_LOGIT_DIFF = 0.05  # measured 0.005-0.015: f16 weights, and llama.cpp keeps its KV cache in f16
Q8_0_MIN_ARGMAX_AGREEMENT = 0.9  # measured 0.96-1.0; a random-word corpus leaves many near ties
MERGE_MAX_LOGIT_DIFF = 1e-4  # STACK-NOTES measured ~5e-6 for merge_and_unload


# --- The fixture model ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def export_model_dir(tmp_path_factory) -> Path:
    """The Llama folder every export test uses; FTCOURSE_EXPORT_MODEL_DIR points it elsewhere."""
    if os.environ.get("FTCOURSE_EXPORT_MODEL_DIR"):
        return Path(os.environ["FTCOURSE_EXPORT_MODEL_DIR"])
    return toy.model_dir()  # the book's embedded model, as shipped


def _load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def export_hf(export_model_dir):
    """(model, tokenizer) loaded with transformers; tests must not modify them."""
    return _load(export_model_dir)


@pytest.fixture(scope="session")
def export_prompts(export_hf) -> list[str]:
    """A ChatML prompt and plain text, with special tokens, digits, punctuation and unseen words."""
    tokenizer = export_hf[1]
    chat = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    return [chat, "Kalo miten ravo, said 42.", "Once upon a time, there was", "Numbers: 3.14 and 2718!"]


@pytest.fixture(scope="session")
def export_gguf_files(export_model_dir, tmp_path_factory) -> dict[str, Path]:
    """f16, q8_0 (our writer) and Q4_K_M (llama.cpp's quantizer) files of the fixture model."""
    out = tmp_path_factory.mktemp("export_gguf")
    files = {q: export.write_gguf(export_model_dir, out / f"model-{q}.gguf", q) for q in ("f16", "q8_0")}
    files["Q4_K_M"] = export.quantize_gguf(files["f16"], out / "model-Q4_K_M.gguf", "Q4_K_M")
    return files


def _compare(export_hf, export_prompts, path: Path) -> export.GGUFComparison:
    model, tokenizer = export_hf
    report = export.compare_with_llama_cpp(model, tokenizer, path, export_prompts, max_new_tokens=16)
    print(f"{report.summary()}; {path.stat().st_size} bytes")  # visible with pytest -s
    return report


# --- Merging ----------------------------------------------------------------------------------


def test_merged_model_logits_equal_adapted_model(export_model_dir):
    from peft import LoraConfig, PeftModel, get_peft_model

    model, tokenizer = _load(export_model_dir)
    torch.manual_seed(1)
    # init_lora_weights=False: B is random too, so the adapter changes the output (B = 0 would not)
    adapted = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    )
    input_ids = tokenizer(["Kalo miten ravo, said 42. Once upon a time"], return_tensors="pt")["input_ids"]
    merged = export.merge_adapter(adapted)

    assert not isinstance(merged, PeftModel)
    assert export.max_logit_difference(merged, adapted, input_ids) < MERGE_MAX_LOGIT_DIFF
    with adapted.disable_adapter():  # the check can fail: the adapter does move the logits
        assert export.max_logit_difference(merged, adapted, input_ids) > 1e-2


def test_merged_copy_does_not_run_the_original_model(export_model_dir):
    import types

    from peft import LoraConfig, get_peft_model

    model, tokenizer = _load(export_model_dir)
    original_forward = model.forward

    def patched_forward(self, *args, **kwargs):  # what TRL's fused LM head does to a model it trains
        return original_forward(*args, **kwargs)

    model.forward = types.MethodType(patched_forward, model)
    torch.manual_seed(1)
    adapted = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
    input_ids = tokenizer(["Kalo miten ravo, said 42."], return_tensors="pt")["input_ids"]
    merged = export.merge_adapter(adapted)

    with adapted.disable_adapter():  # a copy that still called the original would follow the switch
        assert export.max_logit_difference(merged, adapted, input_ids) > 1e-2
    assert export.max_logit_difference(merged, adapted, input_ids) < MERGE_MAX_LOGIT_DIFF


# --- GGUF in llama.cpp ------------------------------------------------------------------------


def test_llama_cpp_is_installed():
    assert export.llama_cpp_available(), f"llama-cpp-python is a test dependency: {export.LLAMA_CPP_INSTALL}"


def test_f16_gguf_gives_transformers_logits_and_greedy_tokens(export_hf, export_prompts, export_gguf_files):
    report = _compare(export_hf, export_prompts, export_gguf_files["f16"])

    assert report.max_abs_logit_diff < F16_MAX_LOGIT_DIFF
    assert report.argmax_agreement >= 0.98  # measured 1.0; only a near tie could flip
    # a near tie (top two logits closer than the tolerance allows) may flip; anything else may not
    divergences = [(p.first_divergence, p.gap_at_divergence) for p in report.prompts]
    assert report.greedy_equal_except_ties(tie_gap=2 * F16_MAX_LOGIT_DIFF), divergences


def test_without_qk_permutation_llama_cpp_logits_differ(
    export_model_dir, export_hf, export_prompts, tmp_path
):
    broken = export.write_gguf(export_model_dir, tmp_path / "no-permute.gguf", "f16", permute=False)
    report = _compare(export_hf, export_prompts, broken)

    assert report.max_abs_logit_diff > 20 * F16_MAX_LOGIT_DIFF  # measured ~5 on the fixture model
    assert report.argmax_agreement < 1.0


def test_q8_0_gguf_agrees_on_the_argmax(export_hf, export_prompts, export_gguf_files):
    report = _compare(export_hf, export_prompts, export_gguf_files["q8_0"])

    assert report.argmax_agreement >= Q8_0_MIN_ARGMAX_AGREEMENT
    assert report.max_abs_logit_diff < 1.0  # measured ~0.3
    assert export_gguf_files["q8_0"].stat().st_size < 0.6 * export_gguf_files["f16"].stat().st_size


def test_q4_k_m_uses_k_quants_and_stays_close(export_hf, export_prompts, export_gguf_files):
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(export_gguf_files["Q4_K_M"]).tensors}
    report = _compare(export_hf, export_prompts, export_gguf_files["Q4_K_M"])

    assert "Q4_K" in types.values(), types  # rows of 256 and 768 allow K-quants, no fallback
    assert export_gguf_files["Q4_K_M"].stat().st_size < export_gguf_files["q8_0"].stat().st_size
    assert report.argmax_agreement >= 0.7  # measured ~0.9; greedy output may diverge at 4 bits


def test_gguf_stats_count_every_weight_and_its_type(export_hf, export_gguf_files):
    n_parameters = sum(p.numel() for p in export_hf[0].parameters())
    f16, q8_0, q4_k_m = (export.gguf_stats(export_gguf_files[q]) for q in ("f16", "q8_0", "Q4_K_M"))

    assert f16.n_weights == q8_0.n_weights == q4_k_m.n_weights == n_parameters
    assert set(q8_0.weights_per_type) == {"Q8_0", "F32"}  # norms stay f32
    assert q8_0.tensor_bits_per_weight == pytest.approx(8.5, abs=0.05)  # 34 bytes per block of 32
    assert "Q4_K" in q4_k_m.weights_per_type and q4_k_m.tensor_bits_per_weight < 6
    assert f16.bits_per_weight > f16.tensor_bits_per_weight  # the file also carries the tokenizer
    assert f16.file_bytes == export_gguf_files["f16"].stat().st_size


# --- Serving with llama.cpp alone --------------------------------------------------------------


def test_llama_cpp_adds_no_bos_because_the_file_says_so(export_gguf_files):
    llm = export.open_llama(export_gguf_files["f16"], vocab_only=True)
    try:
        # add_bos=True asks for the model's BOS *if* its add_bos_token flag is true; ours is false
        assert llm.tokenize(b"Hello", add_bos=True) == llm.tokenize(b"Hello", add_bos=False)
    finally:
        llm.close()


def test_llama_cpp_completion_is_the_greedy_continuation(export_hf, export_prompts, export_gguf_files):
    model, tokenizer = export_hf
    path = export_gguf_files["f16"]
    report = export.compare_with_llama_cpp(model, tokenizer, path, export_prompts, max_new_tokens=8)
    replies = export.generate_with_llama_cpp(path, export_prompts, max_new_tokens=8)

    for compared, reply in zip(report.prompts, replies, strict=True):
        tokens = compared.gguf_tokens  # llama.cpp's own greedy tokens, from the logits
        if tokenizer.eos_token_id in tokens:  # the completion stops at EOS and leaves it out
            tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
        assert reply == tokenizer.decode(tokens, skip_special_tokens=False)


def test_exact_match_with_llama_cpp_scores_llama_cpp_replies(export_hf, export_gguf_files):
    from ftcourse import evaluate
    from ftcourse.toy.tasks import build_tasks

    tokenizer = export_hf[1]
    tasks = build_tasks("test", per_family=2)
    report = export.exact_match_with_llama_cpp(export_gguf_files["q8_0"], tokenizer, tasks)
    prompts = [evaluate.chat_prompt(tokenizer, task) for task in tasks]
    replies = export.generate_with_llama_cpp(export_gguf_files["q8_0"], prompts)

    assert report.n_tasks == len(tasks) and set(report.by_family) == {t.family for t in tasks}
    assert report.replies == tuple(evaluate.first_answer(r) for r in replies)
    hits = [answer == task.answer for answer, task in zip(report.replies, tasks, strict=True)]
    assert report.overall == sum(hits) / len(tasks)


# --- GGUF contents, read independently ---------------------------------------------------------


def test_transformers_reads_back_the_same_tensors(export_model_dir, export_hf, export_gguf_files, tmp_path):
    original = export_hf[0].state_dict()
    read_back = export.load_gguf_with_transformers(export_gguf_files["f16"]).state_dict()

    assert set(read_back) == set(original)
    for name, tensor in original.items():  # f16 keeps 11 significant bits: relative error <= 2**-11
        assert (read_back[name] - tensor).abs().max() <= 1e-3 * tensor.abs().max(), name
    # transformers undoes llama.cpp's Q/K order; without our permutation q_proj comes back scrambled
    unpermuted = export.load_gguf_with_transformers(
        export.write_gguf(export_model_dir, tmp_path / "no-permute.gguf", "f16", permute=False)
    ).state_dict()
    q_name = "model.layers.0.self_attn.q_proj.weight"
    assert (unpermuted[q_name] - original[q_name]).abs().max() > 10 * (
        read_back[q_name] - original[q_name]
    ).abs().max()


def test_gguf_tokenizer_round_trips_ids(export_hf, export_gguf_files):
    import llama_cpp
    from transformers import AutoTokenizer

    tokenizer = export_hf[1]
    path = export_gguf_files["f16"]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False, vocab_only=True)
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
    fields = {
        name: field.contents() for name, field in gguf.GGUFReader(export_gguf_files["f16"]).fields.items()
    }
    keys = gguf.Keys.Tokenizer
    template = fields[keys.CHAT_TEMPLATE]

    assert fields[gguf.Keys.General.ARCHITECTURE] == "llama"
    assert (fields[keys.MODEL], fields[keys.PRE]) == ("gpt2", "gpt-2")
    assert fields[keys.ADD_BOS] is False
    assert fields[keys.EOS_ID] == tokenizer.eos_token_id
    assert fields[keys.PAD_ID] == tokenizer.pad_token_id
    assert len(fields[keys.LIST]) == export_hf[0].config.vocab_size
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


# --- Errors a learner will meet ---------------------------------------------------------------


def _copy_model_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_unsupported_architecture_is_named(export_model_dir, tmp_path):
    model_dir = _copy_model_dir(export_model_dir, tmp_path / "mistral")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))

    with pytest.raises(export.ExportError, match="MistralForCausalLM.*supports LlamaForCausalLM"):
        export.write_gguf(model_dir, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_missing_tokenizer_file_is_named(export_model_dir, tmp_path):
    model_dir = _copy_model_dir(export_model_dir, tmp_path / "no-tokenizer")
    (model_dir / "tokenizer.json").unlink()

    with pytest.raises(export.ExportError, match=r"has no tokenizer\.json"):
        export.write_gguf(model_dir, tmp_path / "out.gguf")


def test_unwritable_output_is_reported(export_model_dir, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")  # works as root too, unlike chmod

    with pytest.raises(export.ExportError, match="Cannot write .*a-file/model.gguf"):
        export.write_gguf(export_model_dir, tmp_path / "a-file" / "model.gguf")


def test_failed_write_leaves_no_half_written_file(export_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"the previous export")
    original_write = gguf.GGUFWriter.write_tensors_to_file

    def write_then_crash(self, **kwargs):
        self.fout[0].write(b"\0" * 1000)  # some tensor bytes reach the disk...
        raise KeyboardInterrupt  # ...then the user presses Ctrl-C

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", write_then_crash)
    with pytest.raises(KeyboardInterrupt):
        export.write_gguf(export_model_dir, out)

    assert out.read_bytes() == b"the previous export"  # untouched, not half-overwritten
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]  # no temporary file left behind
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", original_write)
    export.write_gguf(export_model_dir, out)
    assert out.read_bytes()[:4] == b"GGUF"


# --- Ollama -----------------------------------------------------------------------------------


@pytest.fixture
def closed_ollama_port(monkeypatch) -> str:
    """OLLAMA_HOST pointing at a local port where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    host = f"127.0.0.1:{port}"
    monkeypatch.setenv("OLLAMA_HOST", host)
    return host


def test_no_ollama_server_gives_a_clear_message(closed_ollama_port, export_gguf_files):
    status = modelfile.ollama_available()

    assert not status
    assert closed_ollama_port in status.reason and "ollama serve" in status.reason
    with pytest.raises(modelfile.OllamaUnavailable, match=re.escape(closed_ollama_port)):
        modelfile.register_with_ollama(export_gguf_files["q8_0"], "ftcourse-test")
    with pytest.raises(modelfile.OllamaUnavailable, match="No Ollama server"):
        modelfile.chat_with_ollama("ftcourse-test", "Hello")


class _RecordingOllamaHandler(BaseHTTPRequestHandler):
    """Answers the four Ollama API calls our client makes and records each request. A test stub:
    its chat answer is a fixed string, so only the requests we send are under test."""

    def _answer(self, body: dict) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        payload = self.rfile.read(length)
        self.server.requests.append((self.command, self.path, payload))
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # /api/tags, used by ollama_available
        self._answer({"models": []})

    def do_POST(self):  # /api/blobs/<digest>, /api/create, /api/chat
        if self.path == "/api/chat":
            message = {"role": "assistant", "content": "(stub reply)"}
            self._answer(
                {"model": "m", "created_at": "2026-01-01T00:00:00Z", "message": message, "done": True}
            )
        else:
            self._answer({"status": "success"})

    def log_message(self, *args):
        pass


@pytest.fixture
def recording_ollama_stub(monkeypatch):
    """A local HTTP server speaking just enough of Ollama's API; yields its list of requests."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RecordingOllamaHandler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{server.server_address[1]}")
    yield server.requests
    server.shutdown()
    server.server_close()


def test_register_and_chat_send_what_ollama_expects(recording_ollama_stub, export_gguf_files):
    import hashlib

    path = export_gguf_files["q8_0"]
    digest = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()

    assert modelfile.register_with_ollama(path, "ftcourse-test", system="Be brief.") == "ftcourse-test"
    assert modelfile.chat_with_ollama("ftcourse-test", "Hello") == "(stub reply)"

    calls = {(method, url.split("/sha256")[0]): body for method, url, body in recording_ollama_stub}
    assert calls[("POST", "/api/blobs")] == path.read_bytes()  # the whole GGUF file is uploaded
    create = json.loads(calls[("POST", "/api/create")])
    assert create["model"] == "ftcourse-test" and create["files"] == {"model.gguf": digest}
    assert create["template"] == modelfile.CHATML_OLLAMA_TEMPLATE and create["system"] == "Be brief."
    assert create["parameters"] == {"stop": list(modelfile.CHATML_STOP), **modelfile.GREEDY_OPTIONS}
    assert modelfile.GREEDY_OPTIONS == {"temperature": 0.0, "repeat_penalty": 1.0}  # Ollama: 0.8, 1.1
    chat = json.loads(calls[("POST", "/api/chat")])
    assert chat["messages"] == [{"role": "user", "content": "Hello"}] and chat["options"]["temperature"] == 0
    assert chat["options"]["repeat_penalty"] == 1


_GO_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def render_go_template(template: str, data: dict) -> str:
    """Render the subset of Go's text/template the Ollama template uses: if/else/range/end, eq/ne, .Field."""
    parts, trim_next, pos = [], False, 0
    for match in _GO_ACTION.finditer(template):  # {{- trims whitespace before, -}} after
        text = template[pos : match.start()]
        text = text.lstrip() if trim_next else text
        parts += [("text", text.rstrip() if match.group(1) else text), ("action", match.group(2))]
        trim_next, pos = bool(match.group(3)), match.end()
    parts.append(("text", template[pos:].lstrip() if trim_next else template[pos:]))

    def value(expr: str, dot: dict):
        if expr.startswith('"'):
            return json.loads(expr)
        if op := re.fullmatch(r"(eq|ne) (\S+) (\S+)", expr):
            equal = value(op.group(2), dot) == value(op.group(3), dot)
            return equal if op.group(1) == "eq" else not equal
        assert re.fullmatch(r"\.\w+", expr), f"unsupported Go template expression {expr!r}"
        return dot[expr[1:]]

    def run(i: int, dot: dict, out: list[str] | None) -> tuple[int, str]:
        """Execute parts from i until else/end; out=None skips. Returns (index after, terminator)."""
        while i < len(parts):
            kind, body = parts[i]
            i += 1
            if kind == "text":
                if out is not None:
                    out.append(body)
            elif body in ("end", "else"):
                return i, body
            elif body.startswith("if "):
                condition = out is not None and bool(value(body[3:], dot))
                i, stop = run(i, dot, out if condition else None)
                if stop == "else":
                    i, stop = run(i, dot, out if out is not None and not condition else None)
            elif body.startswith("range "):
                start, items = i, (value(body[6:], dot) if out is not None else [])
                i, _ = run(start, dot, None)  # find the matching end
                for item in items:
                    run(start, item, out)
            elif out is not None:  # a field such as .Content; skipped branches may lack it
                out.append(str(value(body, dot)))
        return i, "eof"

    out: list[str] = []
    run(0, data, out)
    return "".join(out)


def test_ollama_template_renders_like_the_chat_template(export_hf):
    tokenizer = export_hf[1]
    messages = [{"Role": m["role"], "Content": m["content"]} for m in CONVERSATION]
    # Ollama passes the system prompt in .System and also leaves the system message in .Messages
    rendered = render_go_template(
        modelfile.CHATML_OLLAMA_TEMPLATE, {"System": CONVERSATION[0]["content"], "Messages": messages}
    )

    assert rendered == tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    without_system = render_go_template(
        modelfile.CHATML_OLLAMA_TEMPLATE, {"System": "", "Messages": messages[1:]}
    )
    assert without_system == tokenizer.apply_chat_template(
        CONVERSATION[1:], tokenize=False, add_generation_prompt=True
    )


def test_modelfile_names_file_template_stops_and_greedy_decoding(tmp_path):
    path = modelfile.write_modelfile(tmp_path / "Modelfile", tmp_path / "model-q8_0.gguf", system="Be brief.")
    text = path.read_text()

    assert "FROM ./model-q8_0.gguf\n" in text
    assert f'TEMPLATE """{modelfile.CHATML_OLLAMA_TEMPLATE}"""' in text
    assert 'SYSTEM """Be brief."""' in text
    assert all(
        f'PARAMETER stop "{token}"' in text for token in ("<|im_end|>", "<|im_start|>", "<|endoftext|>")
    )
    assert "PARAMETER temperature 0\n" in text and "PARAMETER repeat_penalty 1\n" in text


# --- Pipeline and command line ----------------------------------------------------------------


def test_cli_exports_an_adapter_end_to_end(export_model_dir, tmp_path, closed_ollama_port, capsys):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = _load(export_model_dir)
    torch.manual_seed(2)
    adapted = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    adapted.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "export"

    status = cli_main(
        [
            "export",
            str(tmp_path / "adapter"),
            str(out),
            "--base",
            str(export_model_dir),
            "--ollama-name",
            "ftcourse-test",
            "--no-progress",
        ]
    )

    printed = capsys.readouterr().out
    assert status == 1 and "No Ollama server" in printed  # every file is written; only registration failed
    assert {p.name for p in out.iterdir()} >= {
        "hf",
        "model-f16.gguf",
        "model-q8_0.gguf",
        "model-Q4_K_M.gguf",
        "Modelfile",
    }
    merged = _load(out / "hf")[0]
    ids = tokenizer(["Once upon a time"], return_tensors="pt")["input_ids"]
    assert (
        export.max_logit_difference(merged, adapted, ids) < MERGE_MAX_LOGIT_DIFF
    )  # the adapter is in the export
    report = export.compare_with_llama_cpp(merged, tokenizer, out / "model-f16.gguf", ["Once upon a time"], 8)
    assert report.max_abs_logit_diff < F16_MAX_LOGIT_DIFF
    assert report.greedy_equal_except_ties(tie_gap=2 * F16_MAX_LOGIT_DIFF)


def test_without_llama_cpp_k_quants_are_skipped_with_the_install_command(
    export_model_dir, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` raise ImportError

    result = export.export_pipeline(export_model_dir, tmp_path, progress=False)

    assert (
        set(result.gguf_files) == {"f16", "q8_0"}
        and "pip install llama-cpp-python" in result.skipped["Q4_K_M"]
    )
    assert "FROM ./model-q8_0.gguf" in result.modelfile.read_text()
    with pytest.raises(export.ExportError, match="CMAKE_ARGS=.* pip install llama-cpp-python=="):
        export.quantize_gguf(result.gguf_files["f16"], tmp_path / "q4.gguf")


def test_cli_reports_a_bad_model_dir(tmp_path, capsys):
    assert cli_main(["export", str(tmp_path / "missing"), str(tmp_path / "out"), "--no-progress"]) == 1
    assert "has no config.json" in capsys.readouterr().err


def test_cli_runs_as_a_module():
    result = subprocess.run(
        [sys.executable, "-m", "ftcourse.cli", "export", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(export.__file__).parents[1])},
    )
    assert result.returncode == 0 and "--ollama-name" in result.stdout
