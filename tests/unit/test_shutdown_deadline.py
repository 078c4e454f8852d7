"""cdp_common.service.exit_after: a service whose worker failed exits even if its shutdown hangs."""

from __future__ import annotations

import subprocess
import sys
import time

# A process that starts the deadline, then hangs (as a shutdown stuck on a dead connection would).
HANGS = """
import time
from cdp_common.service import exit_after
exit_after(0.5)
time.sleep(60)
"""


def test_a_hanging_shutdown_ends_with_exit_code_1_at_the_deadline() -> None:
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-c", HANGS], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert time.monotonic() - began < 20  # the deadline, not the 60 s sleep
    assert "shutdown_timed_out" in done.stdout + done.stderr  # logged first


def test_a_shutdown_that_finishes_first_is_not_cut_short() -> None:
    done = subprocess.run([sys.executable, "-c", HANGS.replace("time.sleep(60)", "print('finished')")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "finished" in done.stdout
