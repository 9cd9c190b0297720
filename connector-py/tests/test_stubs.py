"""`_native.pyi`, what type checkers and editors show users, matches the extension module:
every function and method it declares exists, with the same parameters and defaults, and
every public one the module has is declared."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from kvpool import _native

STUBS = Path(_native.__file__).with_name("_native.pyi")


def _declared() -> dict:
    """`{"name" or "Class.name": [(parameter, has_default), ...]}` from the stub file."""
    out = {}
    tree = ast.parse(STUBS.read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            out[node.name] = _params(node)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    name = "__new__" if item.name == "__init__" else item.name
                    out[f"{node.name}.{name}"] = _params(item)
    return out


def _params(fn: ast.FunctionDef) -> list:
    """`[(parameter, has_default), ...]` of a function, without `self`."""
    args = fn.args.posonlyargs + fn.args.args
    defaults = [False] * (len(args) - len(fn.args.defaults)) + [True] * len(fn.args.defaults)
    return [(a.arg, d) for a, d in zip(args, defaults) if a.arg != "self"]


def _actual(qualname: str) -> list:
    owner, _, name = qualname.rpartition(".")
    obj = getattr(_native, owner) if owner else _native
    target = obj if name == "__new__" else getattr(obj, name)
    text = target.__text_signature__
    assert text, f"{qualname} has no text signature"
    text = text.replace("($self, ", "(").replace("($self)", "()")
    return _params(ast.parse(f"def f{text}: pass").body[0])


DECLARED = _declared()


@pytest.mark.parametrize("qualname", sorted(DECLARED))
def test_each_declared_function_matches_the_module(qualname):
    assert _actual(qualname) == DECLARED[qualname]


def test_every_public_function_and_method_is_declared():
    missing = []
    for name, obj in vars(_native).items():
        if name.startswith("_") or not callable(obj):
            continue
        if isinstance(obj, type):
            if issubclass(obj, BaseException):
                continue
            for attr, member in vars(obj).items():
                if attr.startswith("_") or not callable(member):
                    continue
                if f"{name}.{attr}" not in DECLARED:
                    missing.append(f"{name}.{attr}")
        elif name not in DECLARED:
            missing.append(name)
    assert missing == []
