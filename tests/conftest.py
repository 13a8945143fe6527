"""Shared pytest setup: import the project from the repo root and keep CPU threads few."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(min(2, os.cpu_count() or 1))

import subprocess  # noqa: E402

GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


def run_finished_script(cmd, **kwargs):
    """subprocess.run, once more if a torchrun job finished its work ("done:" printed) and then
    a rank died in gloo's own teardown with the abort above: a rare race inside torch's gloo
    backend at process exit (pytorch/pytorch#190489 and #179291), not in our code. Any other
    failure, or the same abort before the run finished, is returned as it is."""
    r = subprocess.run(cmd, **kwargs)
    if r.returncode != 0 and GLOO_TEARDOWN_ABORT in (r.stderr or "") + (r.stdout or "") and "done:" in (r.stdout or ""):
        r = subprocess.run(cmd, **kwargs)
    return r
