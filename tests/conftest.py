"""Test-session settings. Under pytest-xdist each worker takes one core: torch's own threads would
otherwise contend with the other workers' (two workers of two threads each on two cores)."""

from __future__ import annotations

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
