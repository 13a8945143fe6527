"""Everything multi-GPU in one command: DistMuon step time and per-rank state vs world size, the
pretraining script's tokens/s per GPU and scaling efficiency under torchrun, DistMuon == Muon on
GPU, and a checkpoint saved at N GPUs resumed at M != N.

    python bench/multi_gpu.py --data_path data/prepared/mytext        # uses every visible GPU
    python bench/multi_gpu.py --data_path ... --parts pretrain --sets 1024x24   # one part, one model

World sizes are 1, 2, 4, 8 up to the GPUs present. Writes bench/results/muon_step_distN.{md,json},
multi_gpu_pretrain_SET.{md,json} and multi_gpu_correctness.{md,json}.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.muon_step import write_table  # noqa: E402
from bench.throughput import model_flags, steady_state  # noqa: E402


def torchrun_cmd(n, *args):
    """The command and environment of a one-node torchrun job of n processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *args]
    return cmd, dict(os.environ, NCCL_NVLS_ENABLE="0")  # NVLink multicast (NVLS) off


def torchrun(n, *args):
    cmd, env = torchrun_cmd(n, *args)
    print("$", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def interrupt_after(n, step, *args):
    """Start a torchrun job, send Ctrl-C to all its processes once it has logged `step`, and return the
    step its checkpoint was saved at. torchrun itself exits non-zero on the signal; the workers save."""
    out = args[args.index("--out_dir") + 1]
    shutil.rmtree(out, ignore_errors=True)
    cmd, env = torchrun_cmd(n, *args)
    print("$", " ".join(cmd), f"  # Ctrl-C after step {step}", flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log = os.path.join(out, "pretrain_metrics.jsonl")
    while proc.poll() is None and not (os.path.exists(log) and any(r.get("step", 0) >= step for r in metrics(out))):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    text, _ = proc.communicate()
    saved = torch.load(os.path.join(out, "pretrain.pt"), map_location="cpu", weights_only=True)["step"]
    if not step <= saved < int(args[args.index("--max_steps") + 1]):
        sys.exit(f"the interrupted run did not save mid-way (step {saved}):\n{text[-3000:]}")
    return saved


def metrics(out_dir):
    with open(os.path.join(out_dir, "pretrain_metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]  # a line being written is left out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_path", required=True, help="a prepared pretraining directory")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seq_len", type=int, default=1024)
    ap.add_argument("--batch_size", type=int, default=32, help="per GPU")
    ap.add_argument("--parts", default="step,pretrain,check", help="which of step, pretrain, check to run")
    ap.add_argument("--sets", default="768x12,1024x24", help="models (hidden x layers) for the pretrain part")
    ap.add_argument("--check_set", default="768x12", help="model for the resume check")
    ap.add_argument("--max_world", type=int, default=torch.cuda.device_count() or 2,
                    help="largest world size (default: the GPUs present; 2 gloo processes on CPU)")
    ap.add_argument("--work_dir", default=os.path.join(ROOT, "out", "multi_gpu"))
    ap.add_argument("--out_dir", default=os.path.join(ROOT, "bench", "results"))
    args = ap.parse_args()
    worlds = [w for w in (1, 2, 4, 8) if w <= args.max_world]
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU processes (gloo)"
    meta = {"device": f"{args.max_world} x {name}", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python"] + sys.argv)}

    parts = args.parts.split(",")

    # 1. DistMuon step time and state memory per rank (bench/muon_step.py --dist)
    for w in worlds if "step" in parts else []:
        torchrun(w, "bench/muon_step.py", "--dist", "--out_dir", args.out_dir)

    # 2. pretraining throughput per GPU and scaling efficiency vs 1 GPU (weak scaling: batch per GPU fixed)
    for name in args.sets.split(",") if "pretrain" in parts else []:
        flags, rows, base = model_flags(name), [], None
        for w in worlds:
            out = os.path.join(args.work_dir, f"{name}_w{w}")
            torchrun(w, "train_pretrain_muon.py", "--data_path", args.data_path, *flags, "--max_seq_len",
                     str(args.seq_len), "--batch_size", str(args.batch_size), "--max_steps", str(args.steps),
                     "--log_interval", "10", "--eval_interval", "100000", "--eval_iters", "2",
                     "--sample_prompt", "", "--out_dir", out)
            row = steady_state(metrics(out), skip=2)  # medians after the step-0 eval, compile and warmup
            per_gpu = row["tok_per_s"] / w
            base = base or per_gpu
            rows.append({"model": name, "gpus": w, "tok_per_s_per_gpu": round(per_gpu),
                         "scaling_efficiency": round(per_gpu / base, 3), **row})
            write_table(args.out_dir, f"multi_gpu_pretrain_{name}",  # after each run: an interrupted benchmark keeps it
                        dict(meta, batch=f"{args.batch_size} x {args.seq_len} tokens per GPU"), rows)
    if "check" not in parts:
        return

    # 3. correctness: DistMuon on N GPUs == Muon on 1 GPU, and a run interrupted on N GPUs (Ctrl-C, as a
    #    user would) and resumed on M != N continues the uninterrupted N-GPU run's curve; the M-GPU run
    #    accumulates N/M micro-steps so the global batch stays the same
    n = worlds[-1]
    m = max(1, n // 2)
    check = torchrun(n, "bench/dist_check.py")
    flags = ["--data_path", args.data_path, *model_flags(args.check_set), "--max_seq_len", "512",
             "--batch_size", "8", "--log_interval", "10", "--eval_interval", "20", "--eval_iters", "4",
             "--sample_prompt", "", "--max_steps", "100"]

    def val_losses(out):
        return {r["step"]: round(r["val_loss"], 4) for r in metrics(out) if "val_loss" in r}
    straight, broken = os.path.join(args.work_dir, "straight"), os.path.join(args.work_dir, "broken")
    shutil.rmtree(straight, ignore_errors=True)
    torchrun(n, "train_pretrain_muon.py", *flags, "--out_dir", straight)
    stopped = interrupt_after(n, 40, "train_pretrain_muon.py", *flags, "--out_dir", broken)
    torchrun(m, "train_pretrain_muon.py", *flags, "--out_dir", broken, "--resume",
             "--accumulation_steps", str(n // m))
    check_rows = [{"check": f"DistMuon on {n} GPUs vs Muon on 1", "result": line}
                  for line in check.splitlines() if "|DistMuon - Muon|" in line]  # defaults, every option
    write_table(args.out_dir, "multi_gpu_correctness", meta, check_rows + [
        {"check": f"uninterrupted on {n} GPUs: val loss by step", "result": str(val_losses(straight))},
        {"check": f"interrupted at step {stopped} on {n} GPUs, resumed on {m}: val loss by step",
         "result": str(val_losses(broken))}])


if __name__ == "__main__":
    main()
