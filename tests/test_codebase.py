"""Rules of the code base that a machine can check: small modules, no private names across modules,
no compiler at run time, sub-commands that do not import the command line's root."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 400
#: a measured figure in prose (a time, a rate or a speed ratio), or a pointer to where figures live: both belong in benchmarks/RESULTS.md
FIGURE = re.compile(r"\d\s?(ms|µs)\b|\d\s?(tok/s|tokens/s|bytes/s)|(?<![\w.])\d+(\.\d+)?\s?[x×](?!\w|\s?\d)|\d\s?% (faster|slower)|RESULTS\.md")


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module under src/."""
    out = {}
    for p in sorted(ROOT.rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an ``from ... import`` in ``module`` (file ``path``) reads from."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def private_uses(source: str, module: str, path: Path, known: dict[str, Path]) -> list[str]:
    """``from X import _y`` and ``X._y`` (X one of ``known``) in ``source``: private names of other modules."""
    tree = ast.parse(source)
    found, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = absolute(module, path, node)
            for a in node.names:
                if private(a.name) and mod in known:
                    found.append(f"{path.name}:{node.lineno}: from {mod} import {a.name}")
                if f"{mod}.{a.name}" in known:
                    aliases[a.asname or a.name] = f"{mod}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            chain, cur = [], node.value
            while isinstance(cur, ast.Attribute):
                chain.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id in aliases:
                target = ".".join([aliases[cur.id], *reversed(chain)])
                if target in known and target != module:
                    found.append(f"{path.name}:{node.lineno}: {target}.{node.attr}")
    return found


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in modules().values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_no_private_name_is_used_across_modules():
    """Neither the package nor its tests and benchmarks reach into a module's private names."""
    known = modules()
    found = [u for name, p in known.items() for u in private_uses(p.read_text(), name, p, known)]
    users = [*sorted((ROOT.parent / "tests").glob("*.py")), *sorted((ROOT.parent / "benchmarks").rglob("*.py"))]
    found += [f"{p.parent.name}/{u}" for p in users for u in private_uses(p.read_text(), f"{p.parent.name}.{p.stem}", p, known)]
    assert not found, found


def test_the_private_name_check_finds_both_forms():
    known = {"tokensteer.a": ROOT / "tokensteer/a.py", "tokensteer.b": ROOT / "tokensteer/b.py"}
    source = "from tokensteer.a import _x, y\nimport tokensteer.a as a\nfrom tokensteer import b\na._z()\nb._w\nb.__name__\n"
    found = private_uses(source, "tokensteer.c", ROOT / "tokensteer/c.py", known)
    assert sorted(f.split(": ", 1)[1] for f in found) == ["from tokensteer.a import _x", "tokensteer.a._z", "tokensteer.b._w"]


def test_no_compiler_or_subprocess_runs_at_run_time():
    """Native kernels are built at install (setup.py); the package never starts a compiler or a process."""
    banned = {"subprocess", "distutils", "setuptools", "cffi"}
    found = []
    for p in modules().values():
        for node in ast.walk(ast.parse(p.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{p.relative_to(ROOT)}:{node.lineno}: {n}" for n in names if n.split(".")[0] in banned]
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os" and node.attr in ("system", "popen", "execv", "execvp", "spawnv"):
                found.append(f"{p.relative_to(ROOT)}:{node.lineno}: os.{node.attr}")
    assert not found, found


def test_sub_commands_do_not_import_the_command_line_root():
    """Shared CLI helpers live in tokensteer.cli_common, so nothing imports tokensteer.cli (no import cycle)."""
    found = []
    for name, p in modules().items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and (absolute(name, p, node) == "tokensteer.cli" or
                                                     (absolute(name, p, node) == "tokensteer" and any(a.name == "cli" for a in node.names))):
                found.append(f"{name}:{node.lineno}")
            if isinstance(node, ast.Import) and any(a.name == "tokensteer.cli" for a in node.names):
                found.append(f"{name}:{node.lineno}")
    assert not found, found


def prose(source: str) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring line of ``source``."""
    out = [(t.start[0], t.string) for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            doc = ast.get_docstring(node, clean=False)
            out += [(node.body[0].lineno + i, line) for i, line in enumerate((doc or "").splitlines())]
    return out


def test_comments_and_docstrings_quote_no_measured_figures():
    found = [f"{p.relative_to(ROOT)}:{n}: {t.strip()}" for p in modules().values() for n, t in prose(p.read_text()) if FIGURE.search(t)]
    assert not found, found


def test_the_figure_check_tells_figures_from_shapes():
    src = ('"""Doc: a 262,144 x 640 matrix."""\n# 4 rows cost 1.8x one row\nx = 1  # 45 tok/s\ndef f():\n    """Takes 20 ms."""\n'
           '# byte <0xE2>; a 4xx reply; 3 ×\n')
    assert sorted(n for n, t in prose(src) if FIGURE.search(t)) == [2, 3, 5, 6]
    assert [t for n, t in prose(src) if n == 6 and FIGURE.search(t.replace("3 ×", ""))] == []
