"""What the serving benchmarks share: their prompts, the CPU's name, and starting a server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading

PROMPTS = [
    "The history of the printing press begins in",
    "Once upon a time, in a small village by the sea,",
    "The best way to learn a new language is",
    "In the year 1969, astronauts",
    "My favourite recipe for a rainy day is",
    "The committee met on Tuesday to discuss",
    "Dear diary, today I finally",
    "Scientists have long wondered why",
]


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")


def start_server(args: list[str], env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """``tokensteer ARGS`` (a serve command with ``--port 0``) in a subprocess; its base URL once it listens."""
    proc = subprocess.Popen([sys.executable, "-m", "tokensteer.cli", *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, **(env or {})})
    seen = []
    while True:
        line = proc.stderr.readline()
        if not line:
            raise SystemExit("the server did not start:\n" + "".join(seen))
        seen.append(line)
        m = re.search(r"playground: (http://[^ ]+?)/ ", line)
        if m:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining its log
            return proc, m.group(1)
