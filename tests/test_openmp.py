"""``tokensteer.openmp``: bounded spinning set before torch loads libgomp, and a thread's idle
OpenMP workers released when it hands work over. Each case runs in a fresh interpreter, since the
runtime reads its settings once, when it loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif("OpenMP" not in torch.__config__.parallel_info() or not os.path.isdir("/proc/self/task"),
                                reason="needs torch on OpenMP (libgomp) and Linux /proc")

RELEASE = textwrap.dedent(
    """
    import ctypes, json, os, threading, time
    import tokensteer.openmp as omp
    import torch

    NAME = b"ts-omp-test"

    def threads():  # the test thread and the OpenMP workers it made (they inherit its name)
        n = 0
        for tid in os.listdir("/proc/self/task"):
            try:
                n += open(f"/proc/self/task/{tid}/comm", "rb").read().strip() == NAME
            except OSError:
                pass
        return n

    seen = {}

    def work():
        ctypes.CDLL(None).prctl(15, ctypes.c_char_p(NAME), 0, 0, 0)  # PR_SET_NAME
        torch.set_num_threads(2)  # then parallel work makes a pool of one more thread, even on one CPU
        seen["before"] = threads()
        x = torch.randn(256, 65536)
        expect = torch.log_softmax(x, -1)
        seen["with pool"] = threads()
        omp.release_pool()
        for _ in range(100):
            if threads() <= seen["before"]:
                break
            time.sleep(0.05)
        seen["released"] = threads()
        seen["same result"] = bool(torch.equal(torch.log_softmax(x, -1), expect))  # a new pool when needed

    th = threading.Thread(target=work)
    th.start()
    th.join()
    seen["bounded"] = omp.spinning_bounded()
    print(json.dumps(seen))
    """
)


def run(code: str, env: dict | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")} | (env or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout.strip()


def test_release_pool_ends_the_calling_threads_workers_and_parallel_work_still_runs():
    seen = json.loads(run(RELEASE).splitlines()[-1])
    assert seen["bounded"]
    assert seen["with pool"] > seen["before"]
    assert seen["released"] == seen["before"]
    assert seen["same result"]


def test_spinning_is_bounded_before_torch_loads_and_a_users_setting_is_kept():
    show = "import os, tokensteer.openmp as o; print(os.environ.get('GOMP_SPINCOUNT'), o.spinning_bounded())"
    assert run(show) == "1000 True"
    assert run("import torch; " + show) == "None False"  # too late to set: pools are left alone
    assert run(show, {"GOMP_SPINCOUNT": "5"}) == "5 True"


def test_release_pool_does_nothing_where_spinning_was_not_bounded():
    seen = json.loads(run("import torch\n" + RELEASE).splitlines()[-1])
    assert not seen["bounded"]
    assert seen["released"] == seen["with pool"] > seen["before"]
