"""A real multi-process script run from a test, and the two start-up and teardown races it retries once.

Each is a race of the machine, not of the code under test, and shows only when several tests start
process groups at once (pytest-xdist workers):

- ``EADDRINUSE``: the rendezvous port Lightning chose for the ranks was taken by another test's
  processes between its choice and its use;
- ``terminate called without an active exception``: a spawned gloo worker aborted in its C++ teardown
  after its work was done (seen once in CI, in ``ddp_spawn``).

Any other failure, or one of these twice, is the test's result.
"""

from __future__ import annotations

import os
import subprocess
import sys

RACES = ("EADDRINUSE", "terminate called without an active exception")
RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")
"""What a process group's rendezvous reads from the environment."""


def run_script(script: str, *arguments: str, timeout: int) -> subprocess.CompletedProcess:
    """``python script *arguments`` with the repository importable, one torch thread per rank and no
    rendezvous settings inherited from this process; repeated once after a race of :data:`RACES`."""
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
    env.update(PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(script))), OMP_NUM_THREADS="1")
    command = [sys.executable, script, *map(str, arguments)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0 and any(race in result.stderr for race in RACES):
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    return result
