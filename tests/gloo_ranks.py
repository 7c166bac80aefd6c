"""Start a test file as WORLD gloo processes on 127.0.0.1 and collect what each rank saved.

Shared by the tests under tests/distributed/: the pytest process runs ``script`` once per rank
as ``python script RANK PORT OUT`` (one torch thread each, loopback only) and waits for all.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(script: str | Path, world: int, out: Path, timeout_s: float) -> None:
    """Run the ranks to completion; fail the test with a rank's log if one fails or hangs."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "MASTER_ADDR": "127.0.0.1"}
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(port), str(out)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in range(world)]
    logs = []
    deadline = time.monotonic() + timeout_s
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"the ranks did not finish within {timeout_s} s")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    for rank, (proc, log) in enumerate(zip(procs, logs, strict=True)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
