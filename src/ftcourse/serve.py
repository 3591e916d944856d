"""Serving a GGUF file over the OpenAI API: llama.cpp's server (llama-cpp-python's `server` extra).

In use::

    with serve_gguf("model-q8_0.gguf") as server:       # a child process on 127.0.0.1, a free port
        chat_openai(server.base_url, messages)          # the official openai client
        chat_openai(server.base_url, messages, stream=True)
        chat_http(server.base_url, messages)            # plain HTTP, no client library
    # the server is stopped here, whatever happened inside the block

The same client code talks to Ollama: point it at OLLAMA_OPENAI_URL instead (Ollama serves the same
/v1/chat/completions route beside its own /api/chat and /api/generate).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ftcourse.gguf import ExportError

OLLAMA_OPENAI_URL = "http://localhost:11434/v1"  # Ollama's OpenAI-compatible endpoint, default port
SERVER_INSTALL = 'pip install "llama-cpp-python[server]" openai'
# Greedy decoding, nothing on top: what every number in the deployment chapter was measured with.
GREEDY = {"temperature": 0.0, "top_p": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0}
# llama-cpp-python's server applies repeat_penalty 1.1 unless a request says otherwise (its own field, not
# OpenAI's; in-process Llama.create_completion defaults to 1.0). Ollama sets it in the Modelfile instead.
SERVER_REPEAT_PENALTY_DEFAULT = 1.1
Messages = Sequence[dict[str, str]]


class ServeError(ExportError):
    """The server could not start or answer; the message carries the end of its log."""


@dataclass(frozen=True)
class Server:
    """A running server: where to reach it, the model name it answers to, and its process id."""

    base_url: str  # e.g. http://127.0.0.1:41237/v1, what an OpenAI client takes as base_url
    model: str
    pid: int
    log: Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _no_proxy_opener() -> urllib.request.OpenerDirector:
    """urllib without the environment's proxies: a local server must never be reached through one."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _wait_until_ready(child: subprocess.Popen, base_url: str, log: Path, timeout_s: float) -> None:
    """Poll GET /v1/models until it answers; raise ServeError if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-8:])
            raise ServeError(f"The server exited with status {child.returncode}. Its log ends:\n{tail}")
        try:
            with _no_proxy_opener().open(f"{base_url}/models", timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.1)
    raise ServeError(f"The server at {base_url} did not answer within {timeout_s:.0f} s (log: {log}).")


@contextmanager
def serve_gguf(
    gguf_path: str | os.PathLike,
    *,
    lora_path: str | os.PathLike | None = None,
    n_ctx: int = 512,
    model_alias: str = "ftcourse",
    timeout_s: float = 120.0,
) -> Iterator[Server]:
    """Run llama.cpp's OpenAI-compatible server on 127.0.0.1 for the block; it is stopped on every exit."""
    try:
        import llama_cpp.server  # noqa: F401  (fastapi, uvicorn, sse-starlette: the server extra)
    except ImportError as error:
        raise ServeError(f"llama.cpp's server is not installed ({error}): {SERVER_INSTALL}") from error
    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise ServeError(f"No GGUF file at {gguf_path}.")
    port = free_port()
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path), "--model_alias", model_alias,
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx),
        # one thread: a toy model is faster on one, and a shared CI machine stays usable
        "--n_threads", "1", "--n_threads_batch", "1",
    ]  # fmt: skip
    if lora_path is not None:
        command += ["--lora_path", str(lora_path)]
    base_url = f"http://127.0.0.1:{port}/v1"
    with tempfile.NamedTemporaryFile(prefix="ftcourse-server-", suffix=".log", delete=False) as log:
        log_path = Path(log.name)
    with open(log_path, "wb") as log:
        # its own session: a Ctrl-C in the notebook reaches us, and we stop the server ourselves
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until_ready(child, base_url, log_path, timeout_s)
        yield Server(base_url, model_alias, child.pid, log_path)
    finally:
        child.terminate()  # uvicorn shuts down on SIGTERM
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        log_path.unlink(missing_ok=True)


def _request(messages: Messages, model: str, max_tokens: int, repeat_penalty: float | None) -> dict:
    """The JSON body of a greedy chat request; repeat_penalty None leaves the server's default."""
    body = {"model": model, "messages": list(messages), "max_tokens": max_tokens, **GREEDY}
    return body | ({} if repeat_penalty is None else {"repeat_penalty": repeat_penalty})


def chat_openai(
    base_url: str,
    messages: Messages,
    *,
    model: str = "ftcourse",
    max_tokens: int = 16,
    stream: bool = False,
    repeat_penalty: float | None = 1.0,
) -> str:
    """The reply from /v1/chat/completions through the official openai client, greedy; streamed if asked."""
    from openai import DefaultHttpxClient, OpenAI

    # Neither llama.cpp's server nor Ollama checks the key, but the client insists on one.
    client = OpenAI(
        base_url=base_url, api_key="unused", max_retries=0, timeout=60,
        http_client=DefaultHttpxClient(trust_env=False),  # no proxy from the environment for a local server
    )  # fmt: skip
    with client:
        body = _request(messages, model, max_tokens, repeat_penalty)
        extra = {key: body.pop(key) for key in ("repeat_penalty",) if key in body}  # not an OpenAI field
        if not stream:
            reply = client.chat.completions.create(**body, extra_body=extra)
            return reply.choices[0].message.content or ""
        chunks = client.chat.completions.create(**body, extra_body=extra, stream=True)
        return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def chat_http(
    base_url: str,
    messages: Messages,
    *,
    model: str = "ftcourse",
    max_tokens: int = 16,
    repeat_penalty: float | None = 1.0,
) -> str:
    """The reply from POST /v1/chat/completions with nothing but urllib and JSON."""
    body = _request(messages, model, max_tokens, repeat_penalty)
    request = urllib.request.Request(
        f"{base_url}/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with _no_proxy_opener().open(request, timeout=60) as response:
        return json.load(response)["choices"][0]["message"]["content"] or ""
