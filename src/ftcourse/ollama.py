"""Ollama: a Modelfile for our GGUF file, and registering and chatting through the `ollama` client.

Ollama is a separate server program; the `ollama` Python package is only its client. Nothing here
fakes a reply: with no server every call says so and how to get one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftcourse.atomic import atomic_output

DEFAULT_OLLAMA_HOST = "127.0.0.1:11434"

# ChatML in Ollama's Go template syntax; it renders exactly what the Jinja chat template renders.
# Ollama passes the system prompt in .System AND leaves system messages in .Messages, so the loop
# skips them, or the system prompt would appear twice. `{{-` trims the newline before a tag.
CHATML_OLLAMA_TEMPLATE = """\
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range .Messages }}
{{- if ne .Role "system" }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}
{{- end }}<|im_start|>assistant
"""
CHATML_STOP = ("<|im_end|>", "<|im_start|>", "<|endoftext|>")
# Llama 3.1's chat format in Go template syntax. It renders what Llama 3.1's Jinja template renders after
# its BOS: the system block with the knowledge-date lines is always there, even without a system prompt.
# The BOS itself is not in the template: Ollama adds it as a token, because the GGUF says add_bos_token.
LLAMA3_OLLAMA_TEMPLATE = """\
<|start_header_id|>system<|end_header_id|>

Cutting Knowledge Date: December 2023
Today Date: 26 Jul 2024

{{ if .System }}{{ .System }}{{ end }}<|eot_id|>
{{- range .Messages }}
{{- if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}
{{- end }}<|start_header_id|>assistant<|end_header_id|>

"""
LLAMA3_STOP = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|start_header_id|>")
# Greedy decoding with nothing else on top, so that Ollama picks the tokens transformers' greedy generate
# picks. Ollama's own defaults are temperature 0.8 and repeat_penalty 1.1 over the last 64 tokens; the
# penalty lowers every recently seen token, so it hurts answers that repeat part of the question.
GREEDY_OPTIONS = {"temperature": 0.0, "repeat_penalty": 1.0}


class OllamaUnavailable(RuntimeError):
    """No Ollama server answered; the message says where we looked and what to do."""


class ModelfileError(ValueError):
    """A value that Ollama's Modelfile parser could not read back as written."""


def _unreadable(value: str) -> str | None:
    """Why Ollama's parser would not read value back unchanged, or None when it would."""
    # Ollama's parser (parser/parser.go) has no escapes: a quoted value ends at the first closing quote
    # that is followed by a line end, and it silently drops characters strconv.IsPrint rejects.
    if '"""' in value:
        return 'it contains """, which ends a Modelfile string and cannot be escaped'
    if bad := sorted({c for c in value if not c.isprintable() and c not in "\n\r\t"}):
        return f"it contains control characters {bad!r}, which the parser drops"
    return None


def modelfile_string(value: str, what: str) -> str:
    """value as a Modelfile triple-quoted string; raises ModelfileError if Ollama could not read it back."""
    if why := _unreadable(value):
        raise ModelfileError(
            f"Cannot write {what} into a Modelfile: {why}. Change the text, or register the model with "
            f"register_with_ollama, which sends it through the API without a Modelfile."
        )
    return f'"""{value}"""'


def modelfile_path(gguf_file: str | os.PathLike) -> str:
    """The FROM argument for a GGUF file next to the Modelfile: ./name, quoted when it has spaces."""
    name = Path(gguf_file).name
    if '"' in name or "\n" in name or "\r" in name or _unreadable(name) or name != name.strip():
        raise ModelfileError(
            f"Cannot name {name!r} in a Modelfile's FROM line: quotes, line breaks, control characters and "
            f"leading or trailing spaces do not survive Ollama's parser. Rename the GGUF file."
        )
    return f'"./{name}"' if any(c in name for c in " \t") else f"./{name}"


def chat_format(chat_template: str | None) -> tuple[str, tuple[str, ...]]:
    """The Ollama TEMPLATE and stop tokens for a model's Jinja chat template: Llama 3's, or ChatML's."""
    if chat_template and "<|start_header_id|>" in chat_template:
        return LLAMA3_OLLAMA_TEMPLATE, LLAMA3_STOP
    if chat_template and "<|im_start|>" not in chat_template:
        raise ModelfileError(
            "The model's chat template is neither ChatML (<|im_start|>) nor Llama 3 (<|start_header_id|>): "
            "pass template= and stop= in Ollama's Go template syntax for it."
        )
    return CHATML_OLLAMA_TEMPLATE, CHATML_STOP


def gguf_chat_format(gguf_file: str | os.PathLike) -> tuple[str, tuple[str, ...]]:
    """chat_format() of the chat template stored in a GGUF file; ChatML's when there is no file yet."""
    if not Path(gguf_file).is_file():
        return CHATML_OLLAMA_TEMPLATE, CHATML_STOP
    from ftcourse.gguf import read_metadata

    return chat_format(read_metadata(gguf_file).get("tokenizer.chat_template"))


def modelfile_text(
    gguf_file: str | os.PathLike,
    template: str | None = None,
    system: str | None = None,
    stop: Sequence[str] | None = None,
    temperature: float = GREEDY_OPTIONS["temperature"],
    repeat_penalty: float = GREEDY_OPTIONS["repeat_penalty"],
    num_ctx: int | None = None,
) -> str:
    """The text of an Ollama Modelfile: FROM our GGUF, the chat TEMPLATE, stop tokens, parameters.

    template and stop default to the GGUF file's own chat format (gguf_chat_format: Llama 3 or ChatML).
    """
    own_template, own_stop = gguf_chat_format(gguf_file)
    template = own_template if template is None else template
    stop = own_stop if stop is None else stop
    # FROM ./file is resolved relative to the Modelfile, so the folder can be moved as a whole.
    lines = [
        "# ollama create NAME -f Modelfile",
        f"FROM {modelfile_path(gguf_file)}",
        f"TEMPLATE {modelfile_string(template, 'the TEMPLATE')}",
    ]
    if system:
        lines.append(f"SYSTEM {modelfile_string(system, 'the SYSTEM prompt')}")
    # A plain token in plain quotes, as Ollama writes them; anything else in checked triple quotes.
    lines += [
        f'PARAMETER stop "{token}"' if token.isprintable() and '"' not in token and token.strip() == token
        else f"PARAMETER stop {modelfile_string(token, 'a stop token')}"
        for token in stop
    ]  # fmt: skip
    # temperature 0 and no repeat penalty = greedy decoding, the tokens transformers' greedy generate picks.
    lines.append(f"PARAMETER temperature {temperature:g}")
    lines.append(f"PARAMETER repeat_penalty {repeat_penalty:g}")
    if num_ctx:
        lines.append(f"PARAMETER num_ctx {num_ctx}")
    return "\n".join(lines) + "\n"


def write_modelfile(path: str | os.PathLike, gguf_file: str | os.PathLike, **options: Any) -> Path:
    """Write modelfile_text(gguf_file, **options) to path, next to the GGUF file it names; the path."""
    text = modelfile_text(gguf_file, **options)  # refuses what Ollama could not read, before writing
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@dataclass
class OllamaStatus:
    """Whether an Ollama server answered; false in `if`, with the reason in .reason."""

    available: bool
    host: str
    reason: str = ""

    def __bool__(self) -> bool:
        return self.available


def _host(host: str | None) -> str:
    """The server address the ollama client will use: argument, then OLLAMA_HOST, then the default."""
    return host or os.environ.get("OLLAMA_HOST") or DEFAULT_OLLAMA_HOST


def _client(host: str | None, timeout: float | None = None) -> Any:
    import ollama

    return ollama.Client(host=_host(host), timeout=timeout)


def ollama_available(host: str | None = None, timeout: float = 2.0) -> OllamaStatus:
    """Ask the Ollama server (OLLAMA_HOST, default 127.0.0.1:11434) for its model list, briefly."""
    import httpx
    import ollama

    try:
        _client(host, timeout).list()
    except (ConnectionError, httpx.HTTPError, ollama.ResponseError) as error:
        return OllamaStatus(
            False,
            _host(host),
            (
                f"No Ollama server answered at {_host(host)} ({type(error).__name__}: {error}). Ollama is a "
                f"separate program: install it (https://ollama.com/download), start `ollama serve`, or set "
                f"OLLAMA_HOST to a machine that runs it. The GGUF file and Modelfile do not need it."
            ),
        )
    return OllamaStatus(True, _host(host))


def _require_ollama(host: str | None) -> None:
    """Raise OllamaUnavailable with the reason when no server answers."""
    if not (status := ollama_available(host)):
        raise OllamaUnavailable(status.reason)


def register_with_ollama(
    gguf_path: str | os.PathLike,
    name: str,
    host: str | None = None,
    template: str | None = None,
    system: str | None = None,
    parameters: Mapping | None = None,
) -> str:
    """Upload the GGUF file as a blob and create Ollama model `name` from it; returns the name."""
    _require_ollama(host)
    own_template, own_stop = gguf_chat_format(gguf_path)  # the file's own chat format, Llama 3 or ChatML
    client = _client(host)
    digest = client.create_blob(gguf_path)  # "sha256:..."; the server stores the file under that digest
    client.create(
        model=name,
        files={"model.gguf": digest},
        template=own_template if template is None else template,
        system=system,
        parameters=dict(parameters or {"stop": list(own_stop), **GREEDY_OPTIONS}),
    )
    return name


def chat_with_ollama(
    name: str,
    messages: str | Sequence[Mapping[str, str]],
    host: str | None = None,
    options: Mapping | None = None,
) -> str:
    """One chat turn with an Ollama model; a plain string is sent as a single user message."""
    _require_ollama(host)
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    response = _client(host).chat(
        model=name, messages=list(messages), options=dict(options or GREEDY_OPTIONS)
    )
    return response.message.content
