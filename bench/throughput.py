"""Pretraining throughput, Muon vs AdamW, on one GPU: tokens/s, MFU, peak memory, the Muon step's
share of the step, and the optimizer state each keeps. It runs train_pretrain_muon.py itself (what
users run) for a few steps per model shape and optimizer, then reads its metrics jsonl and checkpoint.

    python bench/throughput.py --data_path data/prepared/NAME       # 768x12 and 1024x24, batch 32, seq 1024
    python bench/throughput.py --data_path ... --sets 768x12 --max_seq_len 2048 --batch_size 16 --accumulation_steps 16
    python bench/throughput.py --sets 64x2 --steps 4 --batch_size 2 --max_seq_len 32 --log_interval 1 --skip 1

Writes bench/results/throughput.{md,json}. A run that fails (say, out of memory) is a row saying so.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.muon_step import get_device_name, write_table  # noqa: E402
from model import GPT, ModelConfig, split_params  # noqa: E402

HEAD_DIM = 64  # GPT-2's: 768 -> 12 heads, 1024 -> 16; kv heads = heads (full attention)
COLUMNS = ["set", "optimizer", "status", "params_M", "tok_per_s", "mfu_pct", "step_ms", "muon_ms", "muon_pct",
           "peak_mem_GB", "steady_steps", "matrix_params_M", "matrix_state_MB", "opt_state_MB"]


def model_flags(spec):
    """'768x12' -> the pretraining script's model flags (full attention: kv heads = heads)."""
    hidden, layers = map(int, spec.split("x"))
    heads = str(max(1, hidden // HEAD_DIM))
    return ["--hidden_size", str(hidden), "--num_hidden_layers", str(layers),
            "--num_attention_heads", heads, "--num_key_value_heads", heads]


def run_pretrain(run_dir, flags):
    """One training run in a fresh directory; returns its status: ok, OOM, or failed (...)."""
    shutil.rmtree(run_dir, ignore_errors=True)  # never read a previous run's metrics or checkpoint
    os.makedirs(run_dir)
    log = os.path.join(run_dir, "train.log")
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "train_pretrain_muon.py", "--out_dir", run_dir, *flags], cwd=ROOT,
                           stdout=f, stderr=subprocess.STDOUT)
    with open(log) as f:
        return run_status(r.returncode, f.read())


def run_status(returncode, log_text):
    if returncode == 0:
        return "ok"
    if "out of memory" in log_text.lower():  # torch.OutOfMemoryError: CUDA out of memory. Tried to ...
        return "OOM"
    last = (log_text.strip().splitlines() or [""])[-1].replace("|", "/")  # a "|" would split the table cell
    return f"failed (exit {returncode}): {last[:200]}"


def steady_state(rows, skip):
    """Medians over the logged intervals after the first `skip`, which hold the step-0 eval,
    torch.compile and warmup. A run too short to skip anything keeps its last interval."""
    train = [r for r in rows if "tok_per_s" in r]
    kept = train[skip:] or train[-1:]
    start = len(train) - len(kept)
    first_step = train[start - 1]["step"] if start else 0  # where the kept intervals begin

    def median(key):
        values = [r[key] for r in kept if r.get(key) is not None]
        return statistics.median(values) if values else None
    mfu, step_ms, muon_ms = median("mfu"), median("step_ms"), median("muon_ms")
    return {"tok_per_s": round(median("tok_per_s")), "mfu_pct": mfu and round(100 * mfu, 1),
            "step_ms": round(step_ms, 1), "muon_ms": muon_ms and round(muon_ms, 2),
            "muon_pct": muon_ms and round(100 * muon_ms / step_ms, 1),
            # the logged memory is the peak since the process started (CUDA: max allocated; CPU: max RSS)
            "peak_mem_GB": round(max(r["mem_gb"] for r in train), 2), "steady_steps": kept[-1]["step"] - first_step}


def optimizer_state(ckpt_path):
    """Measured, not computed: bytes of the optimizer state the run saved in its checkpoint
    (Muon: momentum_buffer; AdamW: exp_avg, exp_avg_sq, step), in total and for the block matrices
    (split_params' Muon side, whichever optimizer trained them). A state entry is a matrix's while
    its shape is still unclaimed among the matrices' shapes: entries of one shape have one size,
    so which of them is claimed does not change the bytes."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)  # mmap: sizes without reading
    with torch.device("meta"):  # shapes only, no memory
        model = GPT(ModelConfig(**ckpt["model_config"]))
    matrices, _ = split_params(model)
    unclaimed = Counter(tuple(p.shape) for p in matrices)
    matrix_bytes = total_bytes = 0
    for opt in (ckpt["muon_opt"], ckpt["adamw_opt"]):
        for entry in (opt["state"].values() if opt else []):
            tensors = [t for t in entry.values() if torch.is_tensor(t)]
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
            shape = tuple(max(tensors, key=torch.Tensor.numel).shape)
            total_bytes += nbytes
            if unclaimed[shape]:
                unclaimed[shape] -= 1
                matrix_bytes += nbytes
    return {"params_M": round(model.num_params() / 1e6, 2),
            "matrix_params_M": round(sum(p.numel() for p in matrices) / 1e6, 2),
            "matrix_state_MB": round(matrix_bytes / 2 ** 20, 3), "opt_state_MB": round(total_bytes / 2 ** 20, 3)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_path", default=None,
                    help="a prepared directory or raw file, as train_pretrain_muon.py takes (default: embedded corpus)")
    ap.add_argument("--sets", default="768x12,1024x24", help=f"hidden x layers, comma separated (heads = hidden/{HEAD_DIM})")
    ap.add_argument("--optimizers", default="muon,adamw")
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--max_seq_len", type=int, default=1024)
    ap.add_argument("--accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    ap.add_argument("--log_interval", type=int, default=10, help="steps per logged interval")
    ap.add_argument("--skip", type=int, default=2, help="first logged intervals left out (step-0 eval, compile, warmup)")
    ap.add_argument("--work_dir", default=os.path.join(ROOT, "out", "bench_throughput"))
    ap.add_argument("--out_dir", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--name", default="throughput", help="file name of the table under --out_dir")
    ap.add_argument("--extra", default="", help="more flags for every run, e.g. --extra='--dtype float16'")
    args = ap.parse_args()

    common = ["--batch_size", str(args.batch_size), "--max_seq_len", str(args.max_seq_len),
              "--accumulation_steps", str(args.accumulation_steps),
              "--max_steps", str(args.steps), "--log_interval", str(args.log_interval),
              # the only evals are at step 0 (in the skipped intervals) and after the last logged
              # step, like the one checkpoint: none of them falls inside a timed interval
              "--eval_interval", str(args.steps), "--eval_iters", "1", "--save_interval", "0", "--sample_prompt", ""]
    if args.data_path:
        common += ["--data_path", os.path.abspath(args.data_path)]
    common += args.extra.split()

    rows = []
    for spec in args.sets.split(","):
        shape = model_flags(spec)
        for opt in args.optimizers.split(","):
            run_dir = os.path.join(os.path.abspath(args.work_dir), f"{spec}_{opt}")  # the runs start in ROOT
            t0 = time.time()
            row = dict.fromkeys(COLUMNS)
            row.update(set=spec, optimizer=opt, status=run_pretrain(run_dir, common + shape + ["--optimizer", opt]))
            if row["status"] == "ok":
                with open(os.path.join(run_dir, "pretrain_metrics.jsonl")) as f:
                    row.update(steady_state([json.loads(line) for line in f], args.skip))
                ckpt = os.path.join(run_dir, "pretrain.pt")
                row.update(optimizer_state(ckpt))
                os.remove(ckpt)  # up to GBs per run, and nothing resumes from it
            print(f"{spec} {opt}: {time.time() - t0:.0f}s {row} (log: {run_dir}/train.log)", flush=True)
            rows.append(row)

    meta = {"device": get_device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python"] + sys.argv),
            "batch": f"{args.batch_size} x {args.max_seq_len} tokens x {args.accumulation_steps} micro-batches "
                     f"per optimizer step, {args.steps} steps per run",
            "steady state": f"medians over the logged intervals of {args.log_interval} steps after the first "
                            f"{args.skip} (step-0 eval, compile, warmup)",
            "mfu_pct": "of the device's dense bf16 peak (common.PEAK_FLOPS); None where unknown (CPU)",
            "muon_ms": "one Muon step, synchronised before and after, on logged steps; muon_pct = muon_ms / step_ms",
            "peak_mem_GB": "torch.cuda.max_memory_allocated over the run, GiB (CPU: peak RSS)",
            "state": "measured: bytes of the optimizers' saved state (Muon: momentum; AdamW: exp_avg, exp_avg_sq, "
                     "step); matrix_state_MB = the block matrices' share, opt_state_MB = all; MiB"}
    write_table(args.out_dir, args.name, meta, rows)


if __name__ == "__main__":
    main()
