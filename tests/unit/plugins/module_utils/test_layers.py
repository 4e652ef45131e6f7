# -*- coding: utf-8 -*-
"""The layers of module_utils (docs/developing.md): imports run one way, none hide inside functions.

Parses every file's imports with ``ast`` (no import is executed), so a forbidden import
fails here even on a path no other test takes.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "..", "..", "plugins", "module_utils")
PREFIX = "ansible_collections.kairos.kcrypt.plugins.module_utils"

# What each layer may import from the collection's own code (besides itself).
ALLOWED = {
    "common": set(),
    "tpm": {"common"},
    "client": {"tpm", "common"},
    "node": {"client", "tpm", "common"},
    "kms": {"common"},
    "cli": {"common", "tpm", "client", "node", "kms", "cli"},
    "ansible_common": {"common"},
}


def _modules():
    """{dotted name under module_utils: path} for every .py file."""
    found = {}
    for folder, _dirs, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return found


MODULES = _modules()


def _layer(name):
    return name.split(".", 1)[0]


def _imports(path):
    """[(imported module under module_utils, line, inside a function?)] for one file."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    result = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets = []
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith(PREFIX):
                base = child.module[len(PREFIX):].lstrip(".")
                for alias in child.names:
                    full = "%s.%s" % (base, alias.name) if base else alias.name
                    targets.append(full if full in MODULES else base)
            elif isinstance(child, ast.Import):
                targets = [a.name[len(PREFIX):].lstrip(".") for a in child.names if a.name.startswith(PREFIX + ".")]
            for target in targets:
                result.append((target, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return result


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def test_every_module_is_in_a_known_layer():
    assert {_layer(name) for name in MODULES} <= set(ALLOWED) | {""}, sorted(MODULES)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_follow_the_layers(name):
    problems = []
    for target, line, in_function in GRAPH[name]:
        if target not in MODULES:
            problems.append("line %d imports %s, which does not exist" % (line, target))
            continue
        if in_function:
            problems.append("line %d imports %s inside a function" % (line, target))
        if _layer(target) != _layer(name) and _layer(target) not in ALLOWED[_layer(name)]:
            problems.append("line %d: %s may not import %s (layer %s -> %s)" % (line, name, target, _layer(name), _layer(target)))
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    edges = {name: sorted({t for t, _line, _f in GRAPH[name] if t in MODULES and t != name}) for name in MODULES}
    state, stack, cycles = {}, [], []

    def walk(node):
        state[node] = "open"
        stack.append(node)
        for nxt in edges[node]:
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            walk(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_only_ansible_common_imports_ansible():
    offenders = []
    for name, path in MODULES.items():
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        for node in ast.walk(tree):
            modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if any(m == "ansible" or m.startswith("ansible.") for m in modules) and name != "ansible_common":
                offenders.append(name)
    assert not offenders, offenders


def test_the_checker_sees_a_function_level_import(tmp_path):
    """The rule is only as good as its parser: an import hidden in a function must be found."""
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from %s.common import errors\n" % PREFIX)
    assert _imports(str(sample)) == [("common.errors", 2, True)]


def test_test_files_have_unique_names():
    """The unit tests mirror module_utils, so names repeat across folders; pytest imports test files without
    packages (rootdir-relative basenames), and two files of one name make a whole run fail to collect."""
    tests_root = os.path.join(os.path.dirname(__file__), "..", "..", "..")
    seen = {}
    for folder, dirs, files in os.walk(tests_root):
        dirs[:] = [d for d in dirs if d not in ("output", "__pycache__")]
        for name in files:
            if name.startswith("test_") and name.endswith(".py"):
                seen.setdefault(name, []).append(os.path.relpath(os.path.join(folder, name), tests_root))
    assert {name: paths for name, paths in seen.items() if len(paths) > 1} == {}
