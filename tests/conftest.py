"""Test-session settings. Under pytest-xdist each worker takes one core: torch's own threads would
otherwise contend with the other workers' (two workers of two threads each on two cores)."""

from __future__ import annotations

import os

import pytest
import torch
from processes import RENDEZVOUS

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def no_rendezvous_left_behind():
    """An in-process ``ddp_spawn`` run leaves MASTER_PORT and its kin in this worker's environment;
    later tests would then start their process groups on that same port."""
    before = {name: os.environ.get(name) for name in RENDEZVOUS}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
