"""Joining a Ray cluster, or starting a private local one, for the length of one command; and the
set-up every worker process (replica or eval actor) does before loading the model."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any, Iterator

from tokensteer.errors import UserError

#: object store of a local cluster: only texts and configs travel through it
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20
#: the Ray namespace of tokensteer's named actors and Serve apps
NAMESPACE = "tokensteer"
#: Ray starts its workers at a low priority (nice 15), so any other work on the machine slows the
#: replicas and eval workers; in a cluster this command starts, they are the work and run at 0
LOCAL_SYSTEM_CONFIG = {"worker_niceness": 0}


def require_ray() -> Any:
    """The ``ray`` module, or a one-line UserError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray: pip install 'tokensteer[ray]' (ray[serve])") from None
    return ray


@contextmanager
def connected(address: str | None = None, log_to_driver: bool = True) -> Iterator[bool]:
    """Be connected to Ray inside the block: an existing connection of this process is reused;
    else join ``address`` (or $RAY_ADDRESS; ``auto``: the cluster `ray start` made on this machine),
    else start a local cluster that ends with the block. Yields whether this block started it."""
    ray = require_ray()
    if ray.is_initialized():
        yield False
        return
    addr = address or os.environ.get("RAY_ADDRESS") or None
    kw: dict[str, Any] = {"namespace": NAMESPACE, "log_to_driver": log_to_driver, "logging_level": logging.WARNING}
    try:
        if addr:
            ray.init(address=addr, **kw)
        else:
            ray.init(address="local", include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                     _system_config=LOCAL_SYSTEM_CONFIG, **kw)
    except (ConnectionError, ValueError, RuntimeError, TimeoutError) as e:
        where = f"the Ray cluster at {addr}" if addr else "a local Ray cluster"
        raise UserError(f"cannot join {where}: {first_line(e)}") from None
    try:
        yield True
    finally:
        ray.shutdown()


def cluster_cpus() -> int:
    """Logical CPUs of the cluster this process is connected to (at least 1)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def worker_setup(threads: int, cwd: str | None) -> None:
    """In a worker process, before the model loads: use ``threads`` CPU threads (torch and
    llama.cpp), and the driver's working directory where this node has it, so relative paths in
    method specs and options mean what they meant to the user."""
    import torch

    threads = max(1, int(threads))
    torch.set_num_threads(threads)
    os.environ["TOKENSTEER_THREADS"] = str(threads)  # not the driver's value, which Ray passed on
    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)


def first_line(e: BaseException) -> str:
    """An exception's message in one line (Ray's errors carry whole remote tracebacks)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    errs = [ln for ln in lines if ln.split(":", 1)[0].endswith(("Error", "Exception"))]
    return errs[-1] if errs else lines[0]
