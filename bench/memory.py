"""Peak GPU memory and tokens/s of each way to run pretraining: the plain path (one process, or DistMuon under
torchrun), FSDP2 (--fsdp) and activation checkpointing (--activation_checkpointing), at each model shape, on
the GPUs visible; then, from the measured bytes per parameter, the largest model each path trains on a node.

    python bench/memory.py --data_path data/prepared/NAME                      # d12 and 2048x24 on every GPU
    python bench/memory.py --data_path ... --sets 768x12 --gpus 1 --paths plain,fsdp

Each run is train_pretrain_muon.py (torchrun for DistMuon and FSDP) for a few steps; tokens/s is the median
of the logged intervals after the first (compile). Writes bench/results/<name>.{md,json}.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.multi_gpu import torchrun_cmd  # noqa: E402
from bench.muon_step import get_device_name, write_table  # noqa: E402
from bench.throughput import run_status, steady_state  # noqa: E402
from model import GPT, ModelConfig  # noqa: E402

PATHS = {"plain": [], "ac": ["--activation_checkpointing"], "fsdp": ["--fsdp"],
         "fsdp_ac": ["--fsdp", "--activation_checkpointing"]}


def shape_flags(spec):
    """'768x12' -> hidden 768, 12 layers, heads of 128 (nanochat's d12 and its wider kin)."""
    hidden, layers = map(int, spec.split("x"))
    heads = str(max(1, hidden // 128))
    return ["--hidden_size", str(hidden), "--num_hidden_layers", str(layers), "--num_attention_heads", heads,
            "--num_key_value_heads", heads]


def num_params(spec, vocab_size):
    hidden, layers = map(int, spec.split("x"))
    with torch.device("meta"):
        return GPT(ModelConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                               num_attention_heads=max(1, hidden // 128),
                               num_key_value_heads=max(1, hidden // 128))).num_params()


def run(path, gpus, flags, run_dir):
    """One run; its status and metrics rows."""
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    args = ["train_pretrain_muon.py", "--out_dir", run_dir, *flags, *PATHS[path]]
    if gpus == 1 and not path.startswith("fsdp"):
        cmd, env = [sys.executable, *args], dict(os.environ)
    else:
        cmd, env = torchrun_cmd(gpus, *args)
    print("$", " ".join(cmd), flush=True)
    with open(os.path.join(run_dir, "train.log"), "w") as f:
        r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    with open(os.path.join(run_dir, "train.log")) as f:
        status = run_status(r.returncode, f.read())
    rows = []
    if status == "ok":
        with open(os.path.join(run_dir, "pretrain_metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
    return status, rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_path", required=True, help="a prepared directory")
    ap.add_argument("--sets", default="768x12,2048x24", help="hidden x layers, comma separated")
    ap.add_argument("--paths", default="plain,ac,fsdp,fsdp_ac", help=f"of {', '.join(PATHS)}")
    ap.add_argument("--gpus", default=None, help="GPU counts, comma separated (default: 1 and all visible)")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--max_seq_len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--log_interval", type=int, default=4)
    ap.add_argument("--node_gb", type=float, default=8 * 141, help="GPU memory of the node stated on paper")
    ap.add_argument("--work_dir", default=os.path.join(ROOT, "out", "bench_memory"))
    ap.add_argument("--out_dir", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--name", default="memory")
    ap.add_argument("--extra", default="", help="more flags for every run")
    args = ap.parse_args()
    visible = torch.cuda.device_count()
    gpu_counts = [int(g) for g in args.gpus.split(",")] if args.gpus else sorted({1, max(1, visible)})
    with open(os.path.join(args.data_path, "meta.json")) as f:
        vocab_size = json.load(f)["vocab_size"]
    common = ["--data_path", os.path.abspath(args.data_path), "--batch_size", str(args.batch_size),
              "--max_seq_len", str(args.max_seq_len), "--max_steps", str(args.steps),
              "--log_interval", str(args.log_interval), "--eval_interval", str(args.steps), "--eval_iters", "1",
              "--save_interval", "0", "--sample_prompt", "", *args.extra.split()]
    # On paper: memory per GPU = a * params / gpus (what FSDP shards) + b * params (what every rank keeps whole)
    # + activations; the measured bytes per parameter at the largest set stand for all of it.
    meta = {"device": f"{visible} x {get_device_name(torch.device('cuda'))}" if visible else "cpu",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python"] + sys.argv),
            "batch": f"{args.batch_size} x {args.max_seq_len} tokens per micro-step per GPU, {args.steps} steps",
            "step_ms": "median wall time of a step; muon_ms: of its Muon step alone (CUDA events)",
            "peak_mem_GB": "torch.cuda.max_memory_allocated of rank 0, GiB; bytes_per_param = that / parameters"}
    rows = []
    for spec in args.sets.split(","):
        n = num_params(spec, vocab_size)
        for gpus in gpu_counts:
            for path in args.paths.split(","):
                t0 = time.time()
                status, logged = run(path, gpus, common + shape_flags(spec),
                                     os.path.join(os.path.abspath(args.work_dir), f"{spec}_{gpus}_{path}"))
                row = {"set": spec, "params_M": round(n / 1e6, 1), "gpus": gpus,
                       "path": path if gpus > 1 or path != "plain" else "plain (one process)", "status": status}
                if status == "ok":
                    s = steady_state(logged, 1)
                    row.update(tok_per_s=s["tok_per_s"], tok_per_s_per_gpu=round(s["tok_per_s"] / gpus),
                               step_ms=s["step_ms"], muon_ms=s["muon_ms"], peak_mem_GB=s["peak_mem_GB"],
                               bytes_per_param=round(s["peak_mem_GB"] * 2**30 / n, 1))
                print(f"{spec} x{gpus} {path}: {time.time() - t0:.0f}s {row}", flush=True)
                rows.append(row)
                write_table(args.out_dir, args.name, meta, rows)  # the table so far after each run


if __name__ == "__main__":
    main()
