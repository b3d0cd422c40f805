"""tokensteer keeps freed megabyte blocks for reuse (glibc's thresholds), so a step does not fault
its tensors' pages in again; a user's own MALLOC_* setting wins."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tokensteer.allocator import keep_freed_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")

LOOP = """
import resource, threading
import tokensteer, torch
def steps():
    x = torch.randn(1, 262144)
    for _ in range(200):
        y = torch.log_softmax(x, -1)
        z = torch.softmax(y / 0.8, -1)
        del y, z
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
t = threading.Thread(target=steps); t.start(); t.join()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(env: dict[str, str]) -> int:
    """Minor page faults of 200 steps' worth of megabyte tensors on a worker thread, in a fresh process."""
    out = subprocess.run([sys.executable, "-c", LOOP], env={**os.environ, **env}, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def test_a_decode_loops_tensors_are_reused_not_faulted_in_again():
    kept = faults({})
    default = faults({"MALLOC_ARENA_TEST_": "1"})  # any MALLOC_*_ variable: glibc's defaults stay
    assert kept * 2 < default, (kept, default)


def test_a_users_malloc_setting_is_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000")
    assert keep_freed_memory() is False
