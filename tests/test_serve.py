"""Tests for ftcourse.serve: llama.cpp's OpenAI-compatible server on an exported GGUF file answers the
openai client (plain and streamed) and plain HTTP exactly as llama.cpp does in-process, and is always
stopped."""

from __future__ import annotations

import os
import socket

import pytest
from export_fixtures import *  # noqa: F403

from ftcourse import llamacpp, serve

QUESTIONS = ["What is 12 + 7?", "Which is largest: 3 9 4?", "Once upon a time"]


@pytest.fixture
def only_local_connections(monkeypatch) -> list:
    """Every address this process connects to; anything but 127.0.0.1 raises."""
    seen, connect = [], socket.socket.connect

    def local_only(sock, address):
        seen.append(address)
        if address[0] != "127.0.0.1":
            raise AssertionError(f"connection to {address} from a local-server test")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)
    return seen


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_server_replies_equal_in_process_greedy_replies(export_hf, export_gguf_files, only_local_connections):
    tokenizer = export_hf[1]
    messages = [[{"role": "user", "content": q}] for q in QUESTIONS]
    prompts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
    in_process = llamacpp.generate_with_llama_cpp(export_gguf_files["q8_0"], prompts)

    with serve.serve_gguf(export_gguf_files["q8_0"]) as server:
        assert server.base_url.startswith("http://127.0.0.1:") and server.base_url.endswith("/v1")
        by_client = [serve.chat_openai(server.base_url, m) for m in messages]
        streamed = [serve.chat_openai(server.base_url, m, stream=True) for m in messages]
        by_http = [serve.chat_http(server.base_url, m) for m in messages]
        pid = server.pid

    assert by_client == streamed == by_http == in_process
    assert _gone(pid) and only_local_connections  # stopped; every connection went to 127.0.0.1


def test_server_is_stopped_when_the_block_raises(export_gguf_files):
    with pytest.raises(RuntimeError, match="inside"), serve.serve_gguf(export_gguf_files["f16"]) as server:
        pid = server.pid
        raise RuntimeError("inside the block")
    assert _gone(pid)


def test_a_file_the_server_cannot_load_is_reported_with_its_log(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(serve.ServeError, match="exited with status"), serve.serve_gguf(bad, timeout_s=60):
        pytest.fail("a server started on a damaged file")
    with pytest.raises(serve.ServeError, match="No GGUF file"), serve.serve_gguf(tmp_path / "none.gguf"):
        pass
