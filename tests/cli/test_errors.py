"""One exception hierarchy: every exception class fixedram defines derives from
FixedramError, and the tree drawn in errors.py is the real one."""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re

import fixedram
from fixedram import errors
from fixedram.errors import FixedramError, InputError


def _package_classes() -> list[type[BaseException]]:
    found = []
    for info in pkgutil.walk_packages(fixedram.__path__, "fixedram."):
        if info.name.endswith("__main__"):
            continue
        mod = importlib.import_module(info.name)
        for _name, obj in inspect.getmembers(mod, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == info.name:
                found.append(obj)
    return found


def test_every_exception_class_is_a_fixedram_error() -> None:
    classes = _package_classes()
    assert len(classes) > 20  # the walk found the package's classes
    # KeyboardInterrupt stands for a signal, and must stay one (cleanup relies on it).
    outside = [f"{c.__module__}.{c.__qualname__}" for c in classes
               if not issubclass(c, FixedramError) and not issubclass(c, KeyboardInterrupt)]
    assert outside == []


def test_the_drawn_tree_is_the_real_one() -> None:
    doc = errors.__doc__ or ""
    lines = [ln for ln in doc.splitlines() if re.match(r"\s+(FixedramError|[│ ]*[├└]── )", ln)]
    assert lines, doc
    by_name = {c.__name__: c for c in _package_classes()}
    stack: list[tuple[int, str]] = []
    drawn = set()
    for ln in lines:
        m = re.search(r"(\w+)", ln.split("──")[-1] if "──" in ln else ln)
        assert m is not None, ln
        name = m.group(1)
        depth = ln.find("──") if "──" in ln else -1
        while stack and stack[-1][0] >= depth:
            stack.pop()
        cls = by_name[name]
        if stack:
            parent = by_name[stack[-1][1]]
            assert parent in cls.__bases__, f"{name} is drawn under {parent.__name__}"
        stack.append((depth, name))
        drawn.add(name)
    public = set(errors.__all__)
    assert public <= drawn, public - drawn


def test_input_error_is_also_an_oserror() -> None:
    try:
        os.stat("/nonexistent/fixedram-test")
    except OSError as e:
        err = InputError("/nonexistent/fixedram-test", e)
    assert isinstance(err, OSError) and err.errno == 2
    assert err.filename == "/nonexistent/fixedram-test"
    assert str(err) == "/nonexistent/fixedram-test: No such file or directory"
    assert str(InputError("stdin", "Bad file descriptor", offset=7)) == (
        "stdin: reading at byte 7 failed: Bad file descriptor")
