"""docs/ARCHITECTURE.md names only things that exist: every module path of its tree and every public name it lists.

The convention the document follows (and this test enforces):

1. **The tree** is the first fenced block. Each line starts with a name field (up to the first run of two or more
   spaces); its comma-separated entries that end in ``.py`` (a module) or ``/`` (a folder) must exist. An entry
   at column 0 is relative to the repository root; an indented entry is inside the last column-0 folder above
   it. Other lines (descriptions that wrap) name nothing.
2. **Sections** ``### path.py`` or ``### path/`` (an optional remark may follow the path) describe one module or
   package: ``photomaker/<path>`` if that exists, else ``<path>`` at the repository root. Within a section, a
   backticked span that starts with a name is checked against that module:

   - ``Name`` or ``NAME`` (a capitalised bare name: class, constant, exception): an attribute of the module;
     ``PHOTOMAKER_*`` names are environment variables and must appear in the package's source;
   - ``name(...)``, ``Name(...)``, ``a.b``, ``a.b(...)``: the dotted name resolves from the module, from a
     ``photomaker`` submodule of that first name, or, when the first part stands for an instance (``encoder.fuse``)
     or the name is a method (``__call__(...)``), as an attribute, property or dataclass field of one of the classes
     the module exports;
   - in ``name(a, b=1, *, c, **d)`` every lowercase parameter named must be one of the callable's (unless it
     takes ``**kwargs``); a capitalised one is a type (``generate(GenerationRequest)``), or for a class
     (``Pipeline(StableDiffusionXLPipeline)``) a base that must be in its MRO; ``...``, ``*`` and values that
     are not names are skipped;
   - lowercase bare names (``token_ids``: parameter names in prose), quoted strings, ``.method`` spans and spans
     that start with anything but a name are prose and not checked.
3. Outside sections, a backticked ``photomaker.x`` must be an importable module.

Also: every ``*.md`` file that a document or a source file of the repository names must exist in it (the code
once cited sections of a REFERENCE.md that never was in the repository).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ARCHITECTURE.md"
NAME = r"[A-Za-z_][A-Za-z0-9_]*"
HEAD = re.compile(rf"^(?P<head>{NAME}(?:\.{NAME})*)(?P<rest>$|[(\s\[=].*)", re.DOTALL)
SPAN = re.compile(r"`([^`]+)`")
SECTION = re.compile(r"^### +(?P<path>[\w./]+)", re.MULTILINE)
ENV_VAR = re.compile(r"^PHOTOMAKER_[A-Z0-9_]+$")


def _doc() -> str:
    return DOC.read_text(encoding="utf-8")


def tree_paths(text: str) -> list[str]:
    """The module and folder paths listed in the document's first fenced block (convention 1)."""
    block = re.search(r"```[^\n]*\n(.*?)```", text, re.DOTALL)
    assert block, "docs/ARCHITECTURE.md has no fenced tree block"
    paths: list[str] = []
    folder = ""
    for line in block.group(1).splitlines():
        indented = line.startswith(" ")
        field = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
        entries = [entry.strip() for entry in field.split(",")]
        if not all(entry.endswith((".py", "/")) for entry in entries if entry):
            continue  # a wrapped description
        for entry in entries:
            path = f"{folder}{entry}" if indented else entry
            paths.append(path)
            if not indented and entry.endswith("/"):
                folder = entry
    return paths


def sections(text: str) -> Iterator[tuple[str, str]]:
    """(section path, section text) for each ``### path`` heading (convention 2)."""
    matches = list(SECTION.finditer(text))
    for match, following in zip(matches, [*matches[1:], None], strict=True):
        end = following.start() if following else len(text)
        yield match.group("path"), text[match.end() : end]


def module_for(section_path: str) -> ModuleType:
    stem = section_path.rstrip("/").removesuffix(".py")
    if (ROOT / "photomaker" / section_path).exists():
        return importlib.import_module("photomaker." + stem.replace("/", "."))
    assert (ROOT / section_path).exists(), f"section '### {section_path}' names neither photomaker/ nor a root path"
    return importlib.import_module(stem.replace("/", "."))


def exported_classes(module: ModuleType) -> list[type]:
    return [
        value
        for name, value in vars(module).items()
        if not name.startswith("_") and inspect.isclass(value) and value.__module__.startswith("photomaker")
    ]


def class_has(cls: type, name: str) -> bool:
    """An attribute, property, method or dataclass field of `cls` (inherited ones too, but not `object`'s)."""
    for klass in cls.__mro__[:-1]:
        if name in vars(klass) or name in getattr(klass, "__annotations__", {}):
            return True
    return dataclasses.is_dataclass(cls) and name in {field.name for field in dataclasses.fields(cls)}


def class_attribute(cls: type, name: str) -> Any:
    for klass in cls.__mro__[:-1]:
        if name in vars(klass):
            return getattr(cls, name)
    return None  # a field: present, but nothing to inspect


def resolve(module: ModuleType, dotted: str) -> tuple[bool, Any]:
    """(found, object or None) for a dotted name in a section's module (convention 2)."""
    first, *rest = dotted.split(".")
    owner: Any = None
    if hasattr(module, first):
        owner = getattr(module, first)
    else:
        try:
            owner = importlib.import_module(f"photomaker.{first}")
        except ImportError:
            owner = None
    if owner is not None:
        for part in rest:
            if inspect.isclass(owner) and class_has(owner, part):
                owner = class_attribute(owner, part)
            elif hasattr(owner, part):
                owner = getattr(owner, part)
            else:
                return False, None
        return True, owner
    # `first` stands for an instance (encoder.fuse) or the name is a method (__call__): look in the classes.
    member = rest[-1] if rest else first
    if len(rest) > 1:
        return False, None
    for cls in exported_classes(module):
        if class_has(cls, member):
            return True, class_attribute(cls, member)
    return False, None


def split_top_level(arguments: str) -> list[str]:
    """`arguments` split at the commas that are not inside brackets or parentheses."""
    parts, depth, current = [], 0, ""
    for char in arguments:
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current]


def named_parameters(rest: str) -> list[str]:
    """The parameter names in the argument list that opens `rest` (``(a, b=1, *, c) -> ...``)."""
    if not rest.startswith("("):
        return []
    depth, end = 0, len(rest)
    for index, char in enumerate(rest):
        depth += char == "("
        depth -= char == ")"
        if depth == 0:
            end = index
            break
    names = []
    for item in split_top_level(rest[1:end]):
        match = re.match(rf"\*{{0,2}}({NAME})(?:$|[\s=:\[(])", item.strip())
        if match:
            names.append(match.group(1))
    return names


def checked_spans(text: str) -> Iterator[tuple[str, str]]:
    """(dotted head, rest of span) for the spans convention 2 checks."""
    for span in SPAN.findall(text):
        match = HEAD.match(span.strip())
        if not match:
            continue
        head, rest = match.group("head"), match.group("rest")
        is_call = rest.startswith("(")
        if "." in head or is_call or head[0].isupper():
            yield head, rest


def source_text() -> str:
    return "\n".join(path.read_text(encoding="utf-8") for path in (ROOT / "photomaker").rglob("*.py"))


def section_cases() -> list[tuple[str, str, str]]:
    return [(path, head, rest) for path, body in sections(_doc()) for head, rest in checked_spans(body)]


def test_every_path_of_the_tree_exists() -> None:
    paths = tree_paths(_doc())
    assert "photomaker/" in paths and "photomaker/pipeline.py" in paths, paths  # the parser reads the tree
    missing = [path for path in paths if not (ROOT / path).exists()]
    assert not missing, f"docs/ARCHITECTURE.md lists paths that do not exist: {missing}"


def test_every_package_module_is_in_the_tree() -> None:
    """The tree is complete: a module or subpackage added to photomaker/ is listed (tests and data aside)."""
    listed = set(tree_paths(_doc()))
    on_disk = {
        f"photomaker/{path.name}" + ("/" if path.is_dir() else "")
        for path in (ROOT / "photomaker").iterdir()
        if (path.suffix == ".py" or (path.is_dir() and (path / "__init__.py").exists())) and path.name != "__init__.py"
    }
    assert not on_disk - listed, f"docs/ARCHITECTURE.md's tree does not list: {sorted(on_disk - listed)}"


@pytest.mark.parametrize(("section", "head", "rest"), section_cases())
def test_every_listed_name_exists_with_its_parameters(section: str, head: str, rest: str) -> None:
    if ENV_VAR.match(head):
        assert head in source_text(), f"environment variable {head} (### {section}) is not read by photomaker/"
        return
    module = module_for(section)
    found, target = resolve(module, head)
    assert found, f"docs/ARCHITECTURE.md, ### {section}: `{head}` is not in {module.__name__}"
    named = named_parameters(rest)
    if inspect.isclass(target) and named and all(name[0].isupper() for name in named):
        bases = {klass.__name__ for klass in target.__mro__}
        assert set(named) <= bases, f"docs/ARCHITECTURE.md, ### {section}: {head} does not derive from {named}"
        return
    parameters = [name for name in named if not name[0].isupper()]
    if not parameters or target is None or not callable(target):
        return
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return  # a builtin without a signature: nothing to compare
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        known = set(signature.parameters) | set(parameters)
    else:
        known = set(signature.parameters)
    unknown = [name for name in parameters if name not in known]
    assert not unknown, f"docs/ARCHITECTURE.md, ### {section}: `{head}` has no parameters {unknown} ({signature})"


def test_module_names_outside_sections_import() -> None:
    preamble = _doc().split("\n### ", 1)[0]
    for span in SPAN.findall(preamble):
        if re.fullmatch(rf"photomaker(?:\.{NAME})+", span):
            importlib.import_module(span)


def test_markdown_files_that_docs_and_code_name_exist() -> None:
    present = {path.name for path in ROOT.rglob("*.md") if ".git" not in path.parts}
    missing = {}
    for path in [*ROOT.rglob("*.md"), *ROOT.rglob("*.py")]:
        if ".git" in path.parts or path == Path(__file__):
            continue
        named = {Path(name).name for name in re.findall(r"[\w./-]+\.md\b", path.read_text(encoding="utf-8"))}
        if named - present:
            missing[str(path.relative_to(ROOT))] = sorted(named - present)
    assert not missing, f"files name Markdown documents that are not in the repository: {missing}"
