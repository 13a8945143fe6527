"""Everything multi-GPU in one command: DistMuon step time and per-rank state vs world size, the
pretraining script's tokens/s per GPU and scaling efficiency under torchrun, DistMuon == Muon on
GPU, and a checkpoint saved at N GPUs resumed at M != N.

    python bench/multi_gpu.py --data_path data/prepared/mytext        # uses every visible GPU

World sizes are 1, 2, 4, 8 up to the GPUs present. Writes bench/results/multi_gpu_*.{md,json}.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.muon_step import write_table  # noqa: E402

MODELS = {"768x12": ["--hidden_size", "768", "--num_hidden_layers", "12", "--num_attention_heads", "12",
                     "--num_key_value_heads", "12"],
          "1024x24": ["--hidden_size", "1024", "--num_hidden_layers", "24", "--num_attention_heads", "16",
                      "--num_key_value_heads", "16"]}


def torchrun(n, *args, out=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *args]
    print("$", " ".join(cmd), flush=True)
    env = dict(os.environ, NCCL_NVLS_ENABLE="0")  # NVLink multicast off, as the device docs ask
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def last_train_row(out_dir):
    with open(os.path.join(out_dir, "pretrain_metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if "tok_per_s" in r][-1], rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_path", required=True, help="a prepared pretraining directory")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seq_len", type=int, default=1024)
    ap.add_argument("--batch_size", type=int, default=16, help="per GPU")
    ap.add_argument("--work_dir", default=os.path.join(ROOT, "out", "multi_gpu"))
    ap.add_argument("--out_dir", default=os.path.join(ROOT, "bench", "results"))
    args = ap.parse_args()
    n_gpus = torch.cuda.device_count()
    worlds = [w for w in (1, 2, 4, 8) if w <= n_gpus]
    meta = {"device": f"{n_gpus} x {torch.cuda.get_device_name()}", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python"] + sys.argv)}

    # 1. DistMuon step time and state memory per rank (bench/muon_step.py --dist)
    for w in worlds:
        torchrun(w, "bench/muon_step.py", "--dist", "--out_dir", args.out_dir)

    # 2. pretraining throughput per GPU and scaling efficiency vs 1 GPU (weak scaling: batch per GPU fixed)
    rows = []
    for name, flags in MODELS.items():
        base = None
        for w in worlds:
            out = os.path.join(args.work_dir, f"{name}_w{w}")
            torchrun(w, "train_pretrain_muon.py", "--data_path", args.data_path, *flags, "--max_seq_len",
                     str(args.seq_len), "--batch_size", str(args.batch_size), "--max_steps", str(args.steps),
                     "--log_interval", "10", "--eval_interval", "100000", "--eval_iters", "2",
                     "--sample_prompt", "", "--out_dir", out)
            row, _ = last_train_row(out)
            per_gpu = row["tok_per_s"] / w
            base = base or per_gpu
            rows.append({"model": name, "gpus": w, "tok_per_s": round(row["tok_per_s"]),
                         "tok_per_s_per_gpu": round(per_gpu), "scaling_efficiency": round(per_gpu / base, 3),
                         "mfu": round(row["mfu"], 3) if row["mfu"] else None,
                         "muon_ms": round(row["muon_ms"], 1) if row["muon_ms"] else None,
                         "step_ms": round(row["step_ms"], 1), "mem_gb": round(row["mem_gb"], 1)})
    write_table(args.out_dir, "multi_gpu_pretrain", meta, rows)

    # 3. correctness: DistMuon on N GPUs == Muon on 1 GPU, and resume at M != N GPUs
    n = worlds[-1]
    check = torchrun(n, "bench/dist_check.py")
    out = os.path.join(args.work_dir, "resume")
    common = ["--data_path", args.data_path, *MODELS["768x12"], "--max_seq_len", "512", "--batch_size", "8",
              "--log_interval", "10", "--eval_interval", "20", "--eval_iters", "2", "--sample_prompt", "",
              "--out_dir", out]
    torchrun(n, "train_pretrain_muon.py", *common, "--max_steps", "40")
    m = max(1, n // 2)
    torchrun(m, "train_pretrain_muon.py", *common, "--max_steps", "80", "--resume")
    _, resumed = last_train_row(out)
    vals = [(r["step"], round(r["val_loss"], 4)) for r in resumed if "val_loss" in r]
    write_table(args.out_dir, "multi_gpu_correctness", meta, [
        {"check": f"DistMuon on {n} GPUs vs Muon on 1", "result": check.strip().splitlines()[-1]},
        {"check": f"saved at {n} GPUs, resumed at {m}", "result": f"val loss by step {vals}"}])


if __name__ == "__main__":
    main()
