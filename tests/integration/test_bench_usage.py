"""The benches' CPU accounting (bench/identity.py `Usage`): a process that ends within the measured
window counts only the CPU it used inside it, as PostgreSQL's backends do when a rebuild renews
the service's connection pool."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[2] / "bench"

# Burns CPU until the file named by argv[1] exists, then for 0.3 s more of its own CPU, then ends.
BURN = """
import os, sys, time
go = sys.argv[1]
while not os.path.exists(go):
    pass
until = time.process_time() + 0.3
while time.process_time() < until:
    pass
"""
# Starts the burner, says its pid, reaps it, says so, and stays until its stdin closes.
PARENT = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
print(child.pid, flush=True)
child.wait()
print("reaped", flush=True)
sys.stdin.read()
"""


def _identity_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_identity_under_test", BENCH / "identity.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_a_child_ended_in_the_window_counts_only_its_cpu_inside_it(tmp_path: Path) -> None:
    idb = _identity_bench()
    go = tmp_path / "go"
    with subprocess.Popen([sys.executable, "-c", PARENT, BURN, str(go)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as parent:
        assert parent.stdout is not None and parent.stdin is not None
        child = int(parent.stdout.readline())
        time.sleep(0.6)  # its CPU before the window: about 0.6 s
        before = idb._stat(child)
        assert before is not None and before[0] >= 0.3, before
        usage = idb.Usage({"burner": lambda: [child] if idb._stat(child) is not None else []},
                          reaper={"burner": lambda: parent.pid})
        usage.start()
        go.touch()
        assert parent.stdout.readline().strip() == "reaped"
        used = usage.stop()["cpu_s"]["burner"]
        parent.stdin.close()
    # 0.3 s inside the window (clock ticks are 10 ms); with what it used before, at least 0.6 s more.
    assert 0.25 <= used <= 0.45, used
