"""``tokensteer.openmp.release_pool``: a thread's idle OpenMP workers go away when it hands work over."""

from __future__ import annotations

import ctypes
import os
import threading
import time

import pytest
import torch

from tokensteer.openmp import release_pool

pytestmark = pytest.mark.skipif("OpenMP" not in torch.__config__.parallel_info() or not os.path.isdir("/proc/self/task"),
                                reason="needs torch on OpenMP (libgomp) and Linux /proc")


NAME = b"ts-omp-test"


def threads() -> int:
    """Threads named NAME: the test thread and the OpenMP workers it made (they inherit its name)."""
    n = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm", "rb") as f:
                n += f.read().strip() == NAME
        except OSError:  # a thread that just ended
            pass
    return n


def settle(want: int) -> int:
    """The count once exiting threads are gone (at most a few seconds)."""
    for _ in range(100):
        if threads() <= want:
            break
        time.sleep(0.05)
    return threads()


def test_release_pool_ends_the_calling_threads_workers_and_parallel_work_still_runs():
    old = torch.get_num_threads()
    seen: dict[str, int] = {}

    def work() -> None:
        ctypes.CDLL(None).prctl(15, ctypes.c_char_p(NAME), 0, 0, 0)  # PR_SET_NAME: this thread's name
        torch.set_num_threads(2)  # then parallel work makes a pool of one more thread, even on one CPU
        seen["before"] = threads()
        x = torch.randn(256, 65536)
        expect = torch.log_softmax(x, -1)
        seen["with pool"] = threads()
        release_pool()
        seen["released"] = settle(seen["before"])
        seen["same result"] = int(torch.equal(torch.log_softmax(x, -1), expect))  # a new pool when needed
        release_pool()

    try:
        th = threading.Thread(target=work)
        th.start()
        th.join()
    finally:
        torch.set_num_threads(old)
    assert seen["with pool"] > seen["before"]
    assert seen["released"] == seen["before"]
    assert seen["same result"] == 1


def test_release_pool_without_a_pool_does_nothing():
    th = threading.Thread(target=release_pool)
    th.start()
    th.join()
