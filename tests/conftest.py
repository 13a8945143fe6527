"""Shared pytest setup: import the project from the repo root and keep CPU threads few."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(min(2, os.cpu_count() or 1))

import subprocess  # noqa: E402

GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


def script_env(**extra):
    """The environment of a script run as a subprocess: one thread, unbuffered output, plus extra."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)


def randomize(model):
    """Random weights everywhere, in place; returns the model. At init o_proj/down_proj are zero and every
    block is the identity, which would let a wrong attention or MLP convention pass unnoticed. A small
    embedding lets the blocks, not the tied head's echo of the input token, decide the next token."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.05 if "embed" in name else 1.5 * p.size(-1) ** -0.5)
            else:
                p.uniform_(0.5, 1.5)
    return model


def run_finished_script(cmd, **kwargs):
    """subprocess.run, once more if a torchrun job finished its work ("done:" printed) and then
    a rank died in gloo's own teardown with the abort above: a rare race inside torch's gloo
    backend at process exit (pytorch/pytorch#190489 and #179291), not in our code. Any other
    failure, or the same abort before the run finished, is returned as it is."""
    r = subprocess.run(cmd, **kwargs)
    if r.returncode != 0 and GLOO_TEARDOWN_ABORT in (r.stderr or "") + (r.stdout or "") and "done:" in (r.stdout or ""):
        r = subprocess.run(cmd, **kwargs)
    return r


def run_main(script, *args, stdin=""):
    """`python SCRIPT ARGS...` from the repo root, run inside this process: the script module's main()
    with sys.argv set, stdout and stderr captured, and a subprocess.CompletedProcess back. sys.exit's
    status is the returncode; an uncaught exception is printed as Python prints it (a Traceback) with
    returncode 1. One intra-op thread, as OMP_NUM_THREADS=1 gives the subprocesses; the working
    directory, signal handlers, torch's RNG and thread count are restored afterwards.

    It saves the 1.5-3.5 s that a fresh interpreter spends importing torch (and torch._dynamo, which
    torch.optim imports at the first optimizer). Only for one-process runs that need nothing of a
    process of their own: signals, torchrun, --compile and a killed process stay subprocesses."""
    import contextlib
    import gc
    import importlib
    import io
    import signal
    import traceback
    import warnings

    module = importlib.import_module(script[:-len(".py")].replace("/", "."))
    out, err = io.StringIO(), io.StringIO()
    saved = (list(sys.argv), sys.stdin, os.getcwd(), torch.get_num_threads(), torch.get_rng_state(),
             {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)})
    sys.argv, sys.stdin = [script, *args], io.StringIO(stdin)
    os.chdir(ROOT)
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            # Python's default filters, shown on (the redirected) stderr, as a fresh interpreter would
            warnings.resetwarnings()
            warnings.simplefilter("default")
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.filterwarnings("ignore", category=category)
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: \
                sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
            try:
                module.main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                if not isinstance(e.code, (int, type(None))):
                    print(e.code, file=sys.stderr)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        sys.argv, sys.stdin = saved[0], saved[1]
        os.chdir(saved[2])
        torch.set_num_threads(saved[3])
        torch.set_rng_state(saved[4])
        for s, handler in saved[5].items():
            signal.signal(s, handler)
        gc.collect()  # the run's open files (its out_dir lock) close now, not at some later collection
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def one_error(r) -> str:
    """The command stopped with exactly one `error:` line and no Traceback; returns that line."""
    assert r.returncode != 0, r.stdout[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    return errors[0]
