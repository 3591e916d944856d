"""The API reference: every public function documents itself, every module gets a page, every link resolves.

The pages under book/api/ are written at build time by book/_ext/ftcourse_book.py; these tests check the
inputs of that generator (module discovery, docstrings, type hints, the toc glob) without building.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import re
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "book" / "_ext"))
import ftcourse_book  # noqa: E402

MODULES = ftcourse_book.package_modules(ROOT)
ROLE = re.compile(r"\{py:(func|class|meth|mod|attr|data|obj)\}`~?([^`<]+?)(?:\s*<([^>]+)>)?`")


def public_callables(module) -> list[tuple[str, object]]:
    """(qualified name, object) for each public class, function, method and property defined in `module`."""
    found = []
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            found.append((name, obj))
        elif inspect.isclass(obj):
            found.append((name, obj))
            for attr, member in vars(obj).items():
                if attr.startswith("_") and attr != "__init__":
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                elif isinstance(member, property):
                    member = member.fget
                if inspect.isfunction(member) and member.__qualname__.startswith(obj.__qualname__ + "."):
                    found.append((f"{name}.{attr}", member))
    return found


def problems(name: str, function) -> list[str]:
    """What `function` lacks: a docstring with a one-line summary, annotations of parameters and return."""
    found = []
    is_init = name.endswith(".__init__")
    doc = inspect.getdoc(function) if not is_init else "(the class docstring covers __init__)"
    if inspect.isclass(function):
        own = (function.__dict__.get("__doc__") or "").strip()
        if dataclasses.is_dataclass(function) and own.startswith(f"{function.__name__}("):
            own = ""  # @dataclass writes the signature as a docstring when there is none
        return [] if own else [f"{name}: class without a docstring (say what it holds)"]
    if not doc or not doc.splitlines()[0].strip():
        found.append(f"{name}: no docstring (write one line that says what it returns)")
    signature = inspect.signature(function)
    for index, parameter in enumerate(signature.parameters.values()):
        if index == 0 and parameter.name in ("self", "cls") and "." in name:
            continue
        if parameter.annotation is inspect.Parameter.empty:
            found.append(f"{name}: parameter `{parameter.name}` has no type hint")
    if signature.return_annotation is inspect.Signature.empty and not is_init:
        found.append(f"{name}: no return type hint (`-> None` when it returns nothing)")
    return found


def test_docstring_to_rst_by_hand():
    convert = ftcourse_book.docstring_to_rst
    assert convert("J = |a ∩ b| / |a ∪ b|") == r"J = \|a ∩ b\| / \|a ∪ b\|"
    expected = r"ends with <\|eot\_id\|>, see ``max_new_tokens``"
    assert convert("ends with <|eot_id|>, see `max_new_tokens`") == expected
    assert convert("**kwargs go to ``Trainer``") == r"\*\*kwargs go to ``Trainer``"
    assert convert("a lone ` stays text") == r"a lone \` stays text"


def test_checker_catches_what_it_should():
    """The checker itself: a function without hints or docstring is reported, a complete one is not."""

    def bare(x, y=1):
        return x

    def complete(x: int, y: int = 1) -> int:
        """The sum of x and y."""
        return x + y

    assert problems("bare", bare) == [
        "bare: no docstring (write one line that says what it returns)",
        "bare: parameter `x` has no type hint",
        "bare: parameter `y` has no type hint",
        "bare: no return type hint (`-> None` when it returns nothing)",
    ]
    assert problems("complete", complete) == []

    class Undocumented:
        pass

    class Documented:
        """A thing."""

    @dataclasses.dataclass
    class Record:
        x: int

    expected = ["Undocumented: class without a docstring (say what it holds)"]
    assert problems("Undocumented", Undocumented) == expected
    assert problems("Documented", Documented) == []
    assert problems("Record", Record) == ["Record: class without a docstring (say what it holds)"]


def test_module_discovery_matches_the_import_system():
    """The generator finds exactly the modules Python finds, so no module is left without a page."""
    import ftcourse

    imported = {"ftcourse"}
    for info in pkgutil.walk_packages(ftcourse.__path__, prefix="ftcourse."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            imported.add(info.name)
    assert set(MODULES) == imported, (
        f"book/_ext/ftcourse_book.py finds {sorted(set(MODULES) - imported)} that Python does not import, "
        f"and misses {sorted(imported - set(MODULES))}: a module needs an __init__.py in its package."
    )


def test_toc_glob_takes_every_api_page():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    globs = []

    def walk(node):
        if isinstance(node, dict):
            if "glob" in node:
                globs.append(node["glob"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(toc)
    folder = ftcourse_book.API_DIR.as_posix()
    for module in MODULES:
        docname = f"{folder}/{ftcourse_book.api_page_name(module)}".removesuffix(".md")
        assert any(fnmatch(docname, pattern) for pattern in globs), (
            f"_toc.yml has no glob that takes {docname} (the API page of {module}); expected an entry "
            f"`- glob: {folder}/ftcourse*` under the API reference."
        )
        assert f".. automodule:: {module}\n" in ftcourse_book.api_page_text(module)


@pytest.mark.parametrize("module_name", MODULES)
def test_public_functions_have_type_hints_and_docstrings(module_name):
    module = importlib.import_module(module_name)
    found = [problem for name, function in public_callables(module) for problem in problems(name, function)]
    assert not found, f"{module_name} ({len(found)}):\n  " + "\n  ".join(found)


def test_py_roles_in_chapters_name_real_objects():
    """Every {py:func}`ftcourse...` in a page names an object that exists (the build's -n would fail)."""
    missing = []
    for page in sorted((ROOT / "book").rglob("*.md")):
        if any(part.startswith((".", "_")) for part in page.relative_to(ROOT).parts):
            continue
        for match in ROLE.finditer(page.read_text(encoding="utf-8")):
            target = (match.group(3) or match.group(2)).strip()
            if not target.startswith("ftcourse"):
                continue
            if not _resolves(target):
                missing.append(f"{page.relative_to(ROOT)}: {match.group(0)}")
    assert not missing, "These roles name nothing in ftcourse:\n  " + "\n  ".join(missing)


def _resolves(target: str) -> bool:
    parts = target.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attr in parts[split:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False
