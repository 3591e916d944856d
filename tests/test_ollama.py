"""Tests for ftcourse.ollama: the Modelfile (read back with a port of Ollama's own parser), the Go
chat template, and the client calls against a recording stub server."""

from __future__ import annotations

import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from export_fixtures import *  # noqa: F403
from export_fixtures import CONVERSATION

from ftcourse import ollama


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
    status = ollama.ollama_available()

    assert not status
    assert closed_ollama_port in status.reason and "ollama serve" in status.reason
    with pytest.raises(ollama.OllamaUnavailable, match=re.escape(closed_ollama_port)):
        ollama.register_with_ollama(export_gguf_files["q8_0"], "ftcourse-test")
    with pytest.raises(ollama.OllamaUnavailable, match="No Ollama server"):
        ollama.chat_with_ollama("ftcourse-test", "Hello")


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

    assert ollama.register_with_ollama(path, "ftcourse-test", system="Be brief.") == "ftcourse-test"
    assert ollama.chat_with_ollama("ftcourse-test", "Hello") == "(stub reply)"

    calls = {(method, url.split("/sha256")[0]): body for method, url, body in recording_ollama_stub}
    assert calls[("POST", "/api/blobs")] == path.read_bytes()  # the whole GGUF file is uploaded
    create = json.loads(calls[("POST", "/api/create")])
    assert create["model"] == "ftcourse-test" and create["files"] == {"model.gguf": digest}
    assert create["template"] == ollama.CHATML_OLLAMA_TEMPLATE and create["system"] == "Be brief."
    assert create["parameters"] == {"stop": list(ollama.CHATML_STOP), **ollama.GREEDY_OPTIONS}
    assert ollama.GREEDY_OPTIONS == {"temperature": 0.0, "repeat_penalty": 1.0}  # Ollama: 0.8, 1.1
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
        ollama.CHATML_OLLAMA_TEMPLATE, {"System": CONVERSATION[0]["content"], "Messages": messages}
    )

    assert rendered == tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    without_system = render_go_template(
        ollama.CHATML_OLLAMA_TEMPLATE, {"System": "", "Messages": messages[1:]}
    )
    assert without_system == tokenizer.apply_chat_template(
        CONVERSATION[1:], tokenize=False, add_generation_prompt=True
    )


def test_modelfile_names_file_template_stops_and_greedy_decoding(tmp_path):
    path = ollama.write_modelfile(tmp_path / "Modelfile", tmp_path / "model-q8_0.gguf", system="Be brief.")
    text = path.read_text()

    assert "FROM ./model-q8_0.gguf\n" in text
    assert f'TEMPLATE """{ollama.CHATML_OLLAMA_TEMPLATE}"""' in text
    assert 'SYSTEM """Be brief."""' in text
    assert all(
        f'PARAMETER stop "{token}"' in text for token in ("<|im_end|>", "<|im_start|>", "<|endoftext|>")
    )
    assert "PARAMETER temperature 0\n" in text and "PARAMETER repeat_penalty 1\n" in text


# --- The Modelfile, read back the way Ollama reads it ---------------------------------------------


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, argument) pairs: a line-by-line port of ParseFile in ollama/parser/parser.go."""

    # States and transitions as in the Go code: a value ends at a space or line end only where the text
    # so far "unquotes" (no quote, "...", or """..."""), and only at a line end, not a space.
    # Runes that Go's strconv.IsPrint rejects are dropped unless a transition writes them.
    def unquote(s: str) -> tuple[str, bool]:
        if s[:3] == '"""':
            return (s[3:-3], True) if len(s) >= 6 and s[-3:] == '"""' else ("", False)
        if s[:1] == '"':
            return (s[1:-1], True) if len(s) >= 2 and s[-1] == '"' else ("", False)
        return s, True

    space, newline = " \t", "\r\n"
    commands, name, buf, state = [], "", "", "nil"
    for r in text:
        if state == "nil":
            nxt = "comment" if r == "#" else "nil" if r in space + newline else "name"
        elif state == "name":
            assert r.isalpha() or r in space, f"invalid command character {r!r}"
            nxt = "name" if r.isalpha() else "value"
        elif state == "parameter":
            assert r.isalnum() or r == "_" or r in space, f"invalid parameter name character {r!r}"
            nxt = "parameter" if r not in space else "value"
        elif state == "value":
            nxt = "nil" if r in space + newline else "value"
        else:  # comment
            nxt = "nil" if r in newline else "comment"
        if nxt != state:
            if state == "name":
                assert buf.lower() in {
                    "from",
                    "template",
                    "system",
                    "parameter",
                    "license",
                    "adapter",
                    "message",
                }
                name, nxt = (buf.lower(), "parameter") if buf.lower() == "parameter" else (buf.lower(), nxt)
            elif state == "parameter":
                name = buf
            elif state == "value":
                value, ok = unquote(buf.strip())
                if not ok or r in space:
                    buf += r
                    continue
                commands.append(("model" if name == "from" else name, value))
            buf, state = "", nxt
            if state in ("nil", "comment"):
                continue
            if state != "name":
                continue
        if r.isprintable() and state in ("name", "parameter", "value"):
            buf += r
    if state == "value":
        value, ok = unquote(buf.strip())
        assert ok, "unexpected end of file inside a quoted value"
        commands.append(("model" if name == "from" else name, value))
    assert any(c == "model" for c, _ in commands), "no FROM line"
    return commands


def test_the_parser_port_reads_ollamas_documented_examples():
    text = 'FROM llama3.2\n# comment\nPARAMETER temperature 1\nSYSTEM """You are\nMario."""\n'
    assert parse_modelfile(text) == [
        ("model", "llama3.2"),
        ("temperature", "1"),
        ("system", "You are\nMario."),
    ]
    assert parse_modelfile('FROM "./a b.gguf"\n')[0] == ("model", "./a b.gguf")  # quotes may hold spaces
    with pytest.raises(AssertionError, match="invalid command"):  # """ before a line end ends the value
        parse_modelfile('FROM m\nSYSTEM """x"""\n""" y"""\n')


def test_modelfile_reads_back_exactly_what_was_written(tmp_path):
    system = 'Say "hi" twice.\n\tThen stop; use {{ braces }} and # hashes.'
    text = ollama.modelfile_text(tmp_path / "model-q8_0.gguf", system=system)
    commands = parse_modelfile(text)

    assert commands[0] == ("model", "./model-q8_0.gguf")
    assert ("template", ollama.CHATML_OLLAMA_TEMPLATE) in commands
    assert ("system", system) in commands
    assert [v for c, v in commands if c == "stop"] == list(ollama.CHATML_STOP)
    assert ("temperature", "0") in commands and ("repeat_penalty", "1") in commands


def test_from_path_with_spaces_is_quoted_and_reads_back(tmp_path):
    text = ollama.modelfile_text(tmp_path / "my model v2.gguf")

    assert 'FROM "./my model v2.gguf"\n' in text
    assert parse_modelfile(text)[0] == ("model", "./my model v2.gguf")


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"system": 'Answer with """quotes"""\nplease'}, 'SYSTEM prompt into a Modelfile: it contains """'),
        ({"template": '{{ .Prompt }}"""\n'}, 'TEMPLATE into a Modelfile: it contains """'),
        ({"system": "bell \x07 rings"}, "control characters"),
    ],
)
def test_text_the_parser_cannot_read_back_is_refused(tmp_path, options, match):
    # what the parser would make of it: the value cut short, or characters dropped
    naive = f'FROM ./m.gguf\nSYSTEM """{options.get("system", "")}"""\n'
    if "system" in options:
        with pytest.raises(AssertionError):  # the naive file does not parse back to the same text
            assert ("system", options["system"]) in parse_modelfile(naive)
    with pytest.raises(ollama.ModelfileError, match=match):
        ollama.write_modelfile(tmp_path / "Modelfile", tmp_path / "m.gguf", **options)
    assert not (tmp_path / "Modelfile").exists()


@pytest.mark.parametrize("name", ['say "cheese".gguf', " leading.gguf", "tab\x07.gguf"])
def test_gguf_names_ollama_cannot_read_are_refused(tmp_path, name):
    with pytest.raises(ollama.ModelfileError, match="Rename the GGUF file"):
        ollama.modelfile_text(tmp_path / name)
