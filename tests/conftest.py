"""Shared pytest setup: import the project from the repo root and keep CPU threads few."""
import os
import signal
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(min(2, os.cpu_count() or 1))

# A shell starts a background job (`pytest ... &`) with SIGINT ignored, and an ignored signal stays ignored
# in every process started from it: the scripts rightly leave it so, and the tests that press Ctrl-C on
# them would wait for nothing. A handler set here is reset to the default in each child it starts.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
# `nohup` does the same to SIGHUP. A handler that does nothing keeps pytest alive through a hangup, as nohup
# asked, while the scripts the tests start and hang up on get the default back.
if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
    signal.signal(signal.SIGHUP, lambda signum, frame: None)

import multiprocessing  # noqa: E402
import subprocess  # noqa: E402

# Processes the tests start as ranks fork from one server that imported these once: a fresh interpreter
# spends ~2 s of CPU importing torch, most of a tiny run's time. The server itself is a clean single-threaded
# process, so forking it is safe where forking pytest would not be. A test module adds its own name.
FORKSERVER_PRELOAD = ["torch", "torch._dynamo", "common", "model", "muon", "train_pretrain_muon",
                      "train_full_sft_muon", "train_dpo_muon", "conftest"]
multiprocessing.set_forkserver_preload(FORKSERVER_PRELOAD)

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
    return subprocess.run(cmd, **kwargs) if died_in_teardown(r) else r


def died_in_teardown(r) -> bool:
    """A run that finished its work ("done:" printed) and then failed with gloo's teardown abort."""
    out = (r.stdout or "") + (r.stderr or "")
    return r.returncode != 0 and GLOO_TEARDOWN_ABORT in out and "done:" in (r.stdout or "")


def run_main(script, *args, stdin=""):
    """`python SCRIPT ARGS...` from the repo root, run inside this process: the script module's main()
    with sys.argv set, stdout and stderr captured, and a subprocess.CompletedProcess back. sys.exit's
    status is the returncode; an uncaught exception is printed as Python prints it (a Traceback) with
    returncode 1. One intra-op thread, as OMP_NUM_THREADS=1 gives the subprocesses; the working
    directory, signal handlers, torch's RNG and thread count are restored afterwards.

    It saves the 1.5-3.5 s that a fresh interpreter spends importing torch (and torch._dynamo, which
    torch.optim imports at the first optimizer). Only for one-process runs that need nothing of a
    process of their own: signals, --compile and a killed process stay subprocesses; ranks: run_ranks."""
    import contextlib
    import gc
    import io
    import signal
    import warnings

    module = script_module(script)
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
            code = exit_status(module.main)
    finally:
        sys.argv, sys.stdin = saved[0], saved[1]
        os.chdir(saved[2])
        torch.set_num_threads(saved[3])
        torch.set_rng_state(saved[4])
        for s, handler in saved[5].items():
            signal.signal(s, handler)
        gc.collect()  # the run's open files (its out_dir lock) close now, not at some later collection
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def script_module(script):
    """The module of a script path relative to the repo root: "bench/x.py" -> bench.x."""
    import importlib
    return importlib.import_module(script[:-len(".py")].replace("/", "."))


def exit_status(main) -> int:
    """Calls main() and returns the status `python SCRIPT` would exit with: sys.exit's, 0 on return, 1 after
    printing an uncaught exception as Python prints it (a Traceback)."""
    import traceback
    try:
        main()
        return 0
    except SystemExit as e:
        if isinstance(e.code, (int, type(None))):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except Exception:
        traceback.print_exc()
        return 1


def run_ranks(nproc, script, *args, timeout=300):
    """`torchrun --nproc_per_node NPROC SCRIPT ARGS...` from the repo root without torchrun's ~5 s of
    interpreters: NPROC processes forked from the preloaded server, each given the environment torchrun
    gives a rank (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT) and running the script's main(). Returns
    a subprocess.CompletedProcess: every rank's stdout and stderr in rank order, and the first non-zero
    exit status (a signal as its negative number). A rank that finished its work ("done:") and then died
    in gloo's teardown is run again, as run_finished_script does. The launcher itself stays tested with
    torchrun in tests/test_pretrain.py."""
    import socket
    import tempfile

    def launch():
        with socket.socket() as s:  # a free port for the rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with tempfile.TemporaryDirectory() as tmp:
            ctx = multiprocessing.get_context("forkserver")
            procs = [ctx.Process(target=_rank_main, args=(rank, nproc, port, tmp, script, args)) for rank in range(nproc)]
            for p in procs:
                p.start()
            for p in procs:
                p.join(timeout)
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
            read = lambda rank, stream: open(os.path.join(tmp, f"{rank}.{stream}")).read()  # noqa: E731
            out = "".join(read(rank, "out") for rank in range(nproc))
            err = "".join(read(rank, "err") for rank in range(nproc))
        code = next((p.exitcode for p in procs if p.exitcode), 0)
        return subprocess.CompletedProcess(["torchrun", "--nproc_per_node", str(nproc), script, *args], code, out, err)

    r = launch()
    return launch() if died_in_teardown(r) else r


def _rank_main(rank, nproc, port, tmp, script, args):
    """One rank of run_ranks, in a forked process: its output to files, its status as the exit code."""
    for fd, stream in ((1, "out"), (2, "err")):
        os.dup2(os.open(os.path.join(tmp, f"{rank}.{stream}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                      GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    os.chdir(ROOT)
    torch.set_num_threads(1)
    sys.argv = [script, *args]
    code = exit_status(script_module(script).main)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown: the process group was destroyed by the script


def one_error(r) -> str:
    """The command stopped with exactly one `error:` line and no Traceback; returns that line."""
    assert r.returncode != 0, r.stdout[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    return errors[0]


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected
def pytest_collection_modifyitems(config, items):
    """Start the end-to-end pipeline's stages as soon as one of its tests is selected: they take a core for
    about two minutes, and run beside the tests before theirs (test_pipeline.start_stages)."""
    module = next((item.module for item in items if item.module.__name__ == "test_pipeline"), None)
    if module is not None:
        module.start_stages(config)
