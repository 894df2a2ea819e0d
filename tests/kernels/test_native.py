"""zoo.kernels.native: ZOO_NATIVE, the build cache (keyed by source and macros, atomic writes), and failures that
fall back with a warning or raise when the kernel is required."""

from __future__ import annotations

import ctypes

import pytest

from tests.helpers import needs_compiler
from zoo.kernels import native

SOURCE = 'extern "C" int zoo_answer(int x) { return x * FACTOR; }\n'


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ZOO_NATIVE", raising=False)
    monkeypatch.setattr(native, "_LOADED", {})
    monkeypatch.setattr(native, "_ERRORS", {})
    return tmp_path / "cache" / "native"


@pytest.mark.parametrize("value,want", [(None, "auto"), ("", "auto"), ("0", "off"), ("OFF", "off"), ("1", "on"),
                                        ("on", "on"), ("auto", "auto")])
def test_mode_reads_zoo_native(monkeypatch, value, want):
    if value is None:
        monkeypatch.delenv("ZOO_NATIVE", raising=False)
    else:
        monkeypatch.setenv("ZOO_NATIVE", value)
    assert native.mode() == want


def test_unknown_mode_names_the_allowed_ones(monkeypatch):
    monkeypatch.setenv("ZOO_NATIVE", "fast")
    with pytest.raises(ValueError, match=r"ZOO_NATIVE='fast' is not one of \['auto', 'off', 'on'\]"):
        native.mode()


@needs_compiler
def test_builds_once_per_source_and_macros(cache, tmp_path, monkeypatch):
    src = tmp_path / "answer.cpp"
    src.write_text(SOURCE)
    lib = native.library(src, {"FACTOR": 6})
    lib.zoo_answer.argtypes, lib.zoo_answer.restype = [ctypes.c_int], ctypes.c_int
    assert lib.zoo_answer(7) == 42
    built = sorted(p.name for p in cache.iterdir())
    assert len(built) == 1 and built[0].startswith("answer-") and built[0].endswith(".so")
    # a new process (empty in-process table) reuses the file: the compiler only reports its version
    monkeypatch.setattr(native, "_LOADED", {})
    calls = []
    real_run = native.subprocess.run
    monkeypatch.setattr(native.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or real_run(cmd, **kw))
    assert native.library(src, {"FACTOR": 6}) is not None
    assert [c[1:] for c in calls] == [["--version"]]
    # other macros or an edited source: another library beside the first
    lib3 = native.library(src, {"FACTOR": 3})
    lib3.zoo_answer.argtypes, lib3.zoo_answer.restype = [ctypes.c_int], ctypes.c_int
    assert lib3.zoo_answer(7) == 21
    src.write_text(SOURCE.replace("x * FACTOR", "x * FACTOR + 1"))
    monkeypatch.setattr(native, "_LOADED", {})
    assert native.library(src, {"FACTOR": 6}) is not None
    assert len(list(cache.iterdir())) == 3


@needs_compiler
def test_an_edited_header_builds_anew(cache, tmp_path):
    (tmp_path / "inc").mkdir()
    header = tmp_path / "inc" / "factor.h"
    header.write_text("#define FACTOR 2\n")
    src = tmp_path / "answer.cpp"
    src.write_text('#include "inc/factor.h"\n' + SOURCE)
    lib = native.library(src)
    lib.zoo_answer.argtypes, lib.zoo_answer.restype = [ctypes.c_int], ctypes.c_int
    assert lib.zoo_answer(5) == 10
    header.write_text("#define FACTOR 4\n")
    native._LOADED.clear()
    lib = native.library(src)
    lib.zoo_answer.argtypes, lib.zoo_answer.restype = [ctypes.c_int], ctypes.c_int
    assert lib.zoo_answer(5) == 20 and len(list(cache.iterdir())) == 2


@needs_compiler
def test_a_failed_build_warns_leaves_nothing_and_raises_when_required(cache, tmp_path, monkeypatch):
    src = tmp_path / "broken.cpp"
    src.write_text("this is not C++\n")
    with pytest.warns(RuntimeWarning, match=r"native kernel broken.cpp unavailable, using the torch path: .*exited"):
        assert native.library(src) is None
    assert native.library(src) is None  # remembered: no second build, no second warning
    assert not any(cache.iterdir())  # no half-written library or temporary file
    with pytest.raises(RuntimeError, match="broken.cpp cannot be built"):
        native.library(src, required=True)
    monkeypatch.setattr(native, "_LOADED", {})
    monkeypatch.setenv("ZOO_NATIVE", "on")
    with pytest.raises(RuntimeError, match="ZOO_NATIVE=on"):
        native.library(src)


def test_off_builds_nothing_and_a_missing_compiler_falls_back(cache, tmp_path, monkeypatch):
    src = tmp_path / "answer.cpp"
    src.write_text(SOURCE)
    monkeypatch.setenv("ZOO_NATIVE", "off")
    assert native.library(src, {"FACTOR": 1}) is None
    assert not cache.exists()
    monkeypatch.delenv("ZOO_NATIVE")
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.warns(RuntimeWarning, match="answer.cpp unavailable"):
        assert native.library(src, {"FACTOR": 1}) is None
