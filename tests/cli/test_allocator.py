"""jaccli/_allocator.py: glibc's thresholds are raised for the jaccli process, never over a user's choice."""

from __future__ import annotations

import ctypes
import sys

import pytest

from jaccli.cli import allocator as _allocator


def _glibc() -> bool:
    try:
        ctypes.CDLL(None).mallopt
        return sys.platform.startswith("linux")
    except (OSError, AttributeError):
        return False


@pytest.mark.skipif(not _glibc(), reason="needs glibc")
def test_tunes_glibc(monkeypatch):
    for k in [k for k in __import__("os").environ if k.startswith("MALLOC_") or k == "LD_PRELOAD"]:
        monkeypatch.delenv(k)
    assert _allocator.tune() is True


@pytest.mark.parametrize("env", [{"MALLOC_ARENA_MAX_": "2"}, {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}])
def test_a_users_allocator_choice_is_kept(monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert _allocator.tune() is False
