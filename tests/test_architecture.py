"""The tree is the architecture: LoRA itself at the top of `lora/`, one folder per stage, imports
flowing one way, one reading order, and functions a reader takes in at once."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import lora
from conftest import ROOT

PACKAGE = ROOT / "lora"
STAGES = ["data", "train", "infer", "export"]  # the order a run goes through them
MAX_FUNCTION_LINES = 90
MAX_PARAMETERS = 6


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Every module of `lora` that `path` imports, at the top or inside a function."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found |= {f"{base}.{a.name}" for a in node.names} | {base}
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    known = set(modules())
    return {name: imported_modules(path, known) - {"lora"} for name, path in modules().items()}


def place(module: str) -> int:
    """0 for LoRA itself (the top of the package), 1.. for the stages in pipeline order."""
    parts = module.split(".")
    return STAGES.index(parts[1]) + 1 if len(parts) > 2 or parts[-1] in STAGES else 0


def test_the_import_graph_is_what_it_parses_to():
    graph = import_graph()  # the checks below are only as good as this parse: spot-check it
    assert (
        "lora.train.loop" in graph["lora.train.run"] or "lora.train.run" in graph["lora.train.loop"]
    )
    assert "lora.layer" in graph["lora.inject"]
    assert "lora.data.prompt" in graph["lora.train.loss"]


def test_lora_itself_imports_no_stage():
    wrong = {
        (m, d) for m, deps in import_graph().items() if place(m) == 0 for d in deps if place(d) > 0
    }
    assert wrong == set()


def test_a_stage_imports_only_lora_itself_and_earlier_stages():
    graph = import_graph()
    wrong = {(m, d) for m, deps in graph.items() for d in deps if place(d) > place(m)}
    assert wrong == set()


def test_no_import_cycle():
    graph, done, path = import_graph(), set(), []

    def visit(m):
        assert m not in path, " -> ".join(path[path.index(m) :] + [m])
        if m in done:
            return
        path.append(m)
        for d in sorted(graph[m]):
            visit(d)
        path.pop()
        done.add(m)

    for m in graph:
        visit(m)


def reading_order(doc: str) -> list[str]:
    return re.findall(r"^    (\w+\.py|\w+/)", doc, re.M)


def test_one_reading_order_names_every_file_and_folder():
    top = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert sorted(n for n in reading_order(lora.__doc__) if n.endswith(".py")) == top
    assert [n for n in reading_order(lora.__doc__) if n.endswith("/")] == [f"{s}/" for s in STAGES]
    for stage in STAGES:
        doc = ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text()))
        files = sorted(p.name for p in (PACKAGE / stage).glob("*.py") if p.name != "__init__.py")
        assert sorted(reading_order(doc)) == files, stage


def functions(paths):
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(ROOT), node


def test_functions_fit_on_a_screen_and_take_few_parameters():
    paths = [*modules().values(), ROOT / "train.py", ROOT / "infer.py"]
    long, wide = [], []
    for path, fn in functions(paths):
        if fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES:
            long.append(f"{path}:{fn.name}")
        a = fn.args
        named = [
            p.arg
            for p in a.posonlyargs + a.args + a.kwonlyargs
            if p.arg not in ("self", "cls", "ctx")
        ]
        if len(named) + bool(a.vararg) + bool(a.kwarg) > MAX_PARAMETERS:
            wide.append(f"{path}:{fn.name}")
    assert long == [] and wide == []


def test_the_layer_is_its_formula():
    """layer.py holds no training machinery: no custom autograd, no import beyond LoRA itself."""
    source = (PACKAGE / "layer.py").read_text(encoding="utf-8")
    assert "autograd" not in source and "activations" not in source
    assert import_graph()["lora.layer"] <= {"lora.errors", "lora.quantize", "lora.spec"}


def test_the_docs_walk_the_code_in_the_one_reading_order():
    """docs/how-lora-works.md names the files of lora/ in the order lora/__init__.py gives."""
    text = (ROOT / "docs" / "how-lora-works.md").read_text(encoding="utf-8")
    section = text.split("## The ideas, and where each one is")[1].split("\n## ")[0]
    top = [n for n in reading_order(lora.__doc__) if n.endswith(".py")]
    mentioned = []
    for name in re.findall(r"`lora/(\w+\.py)`", section):
        if name in top and name not in mentioned:
            mentioned.append(name)
    assert mentioned == [n for n in top if n in mentioned] and len(mentioned) >= 6
