"""entropy_core.allocator: glibc accepts the settings; elsewhere the call is a no-op that says so."""
import ctypes
import platform

import pytest

from entropy_core import allocator


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_accepts_the_thresholds():
    assert allocator.keep_freed_memory() is True


def test_without_glibc_nothing_changes(monkeypatch):
    def no_libc(name):
        raise OSError(f"{name}: cannot open shared object file")
    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert allocator.keep_freed_memory() is False
