"""Time one Muon optimizer step on the matrix shapes of three GPTs, against torch.optim.Muon and
the ideal "Newton-Schulz FLOPs at this GPU's measured bf16 matmul rate", with our defaults and
with every option of muon.py on (Polar Express, NorMuon, cautious weight decay).

    python bench/muon_step.py                                  # one GPU (or CPU, small sets only)
    torchrun --nproc_per_node 8 bench/muon_step.py --dist      # DistMuon step time at world size 8

Per layer of a width-d GPT: four d x d (q, k, v, o), one 4d x d and one d x 4d (MLP).
Writes bench/results/muon_step[_distN].{md,json}.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import muon_fast  # noqa: E402
from muon import DistMuon, Muon  # noqa: E402

# every option on: the configuration nanochat's fused MuonAdamW step was timed in
ALL_OPTIONS = dict(ns_coefficients="polar_express", normuon=True, cautious_wd=True, weight_decay=0.1)
# nanochat's MuonAdamW with all of these on, as reported for one H100 with torch 2.11: reference
# figures for the table, not measured by this script
NANOCHAT_REPORTED_MS = {"768x12": 6.5, "1024x24": 24.1, "2048x24": 137.0}


def layer_shapes(width, layers):
    d = width
    return [(d, d)] * 4 * layers + [(4 * d, d)] * layers + [(d, 4 * d)] * layers


def ns_flops(shapes, steps=5):
    """Per m x n matrix (m <= n): X X^T is 2m^2n, A A is 2m^3, B X is 2m^2n, per step."""
    total = 0
    for r, c in shapes:
        m, n = min(r, c), max(r, c)
        total += steps * (4 * m * m * n + 2 * m ** 3)
    return total


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, warmup, repeat):
    """Median wall time of fn in ms (synchronised around every call)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_back_to_back_ms(fn, device, warmup, repeat):
    """Mean time of fn over `repeat` calls issued back to back, one sync at the end: the host
    issues the next step while the GPU runs this one, as in training, where the next forward
    pass follows the optimizer step."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3 / repeat


def matmul_tflops(device, n=8192):
    """Measured bf16 matmul rate: the roofline the NS ideal is computed at."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, device, warmup=3, repeat=10)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def make_params(shapes, device):
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="768x12,1024x24,2048x24", help="width x layers, comma separated")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--dist", action="store_true", help="time DistMuon under torchrun")
    ap.add_argument("--out_dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = 0, 1
    if args.dist:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    peak = matmul_tflops(device) if device.type == "cuda" else float("nan")

    rows = []
    for spec in args.sets.split(","):
        width, layers = map(int, spec.split("x"))
        shapes = layer_shapes(width, layers)
        flops = ns_flops(shapes)
        ideal = flops / (peak * 1e12) * 1e3
        row = {"set": f"{width}x{layers}", "matrices": len(shapes),
               "params_M": round(sum(r * c for r, c in shapes) / 1e6, 1),
               "ns_gflop": round(flops / 1e9, 1), "ideal_ms": round(ideal, 2)}
        if args.dist:
            params = make_params(shapes, device)
            opt = DistMuon(params, lr=0.02, momentum=0.95)

            def dist_step():
                opt.step()
                dist.barrier()
            row["distmuon_ms"] = round(time_ms(dist_step, device, args.warmup, args.repeat), 2)
            row["state_MB_per_rank"] = round(sum(s["momentum_buffer"].numel() * 4 for s in opt.state.values())
                                             / 2 ** 20, 1)
            del opt, params
        else:
            params = make_params(shapes, device)
            ours = Muon(params, lr=0.02, momentum=0.95)
            row["ours_ms"] = round(time_ms(ours.step, device, args.warmup, args.repeat), 2)
            row["ours_back_to_back_ms"] = round(time_back_to_back_ms(ours.step, device, args.warmup, args.repeat), 2)
            del ours, params
            if device.type == "cuda" and muon_fast.ENABLED:  # the same step on the plain path (cuBLAS)
                muon_fast.ENABLED = False
                torch._dynamo.reset()
                params = make_params(shapes, device)
                ours = Muon(params, lr=0.02, momentum=0.95)
                row["ours_cublas_gram_ms"] = round(time_ms(ours.step, device, args.warmup, args.repeat), 2)
                muon_fast.ENABLED = True
                torch._dynamo.reset()
                del ours, params
            params = make_params(shapes, device)
            ours = Muon(params, lr=0.02, momentum=0.95, **ALL_OPTIONS)
            row["all_options_ms"] = round(time_ms(ours.step, device, args.warmup, args.repeat), 2)
            row["all_options_back_to_back_ms"] = round(
                time_back_to_back_ms(ours.step, device, args.warmup, args.repeat), 2)
            row["nanochat_reported_ms"] = NANOCHAT_REPORTED_MS.get(row["set"])
            del ours, params
            if hasattr(torch.optim, "Muon"):
                params = make_params(shapes, device)
                theirs = torch.optim.Muon(params, lr=0.02, momentum=0.95, weight_decay=0.0)
                row["torch_muon_ms"] = round(time_ms(theirs.step, device, args.warmup, args.repeat), 2)
                row["speedup_vs_torch"] = round(row["torch_muon_ms"] / row["ours_ms"], 1)
                del theirs, params
            row["ours_tflops"] = round(flops / (row["ours_ms"] * 1e-3) / 1e12, 1)
            row["ours_over_ideal"] = round(row["ours_ms"] / ideal, 2) if ideal == ideal else None
            row["all_over_ideal"] = round(row["all_options_ms"] / ideal, 2) if ideal == ideal else None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        if rank == 0:
            print(row, flush=True)

    if rank == 0:
        name = get_device_name(device)
        meta = {"device": name, "world_size": world, "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d"), "bf16_matmul_tflops": round(peak, 1),
                "command": " ".join(["torchrun --nproc_per_node %d" % world if args.dist else "python"]
                                    + sys.argv)}
        write_table(args.out_dir, "muon_step" + (f"_dist{world}" if args.dist else ""), meta, rows)
    if args.dist:
        dist.destroy_process_group()


def get_device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def write_table(out_dir, name, meta, rows):
    """Print and save a markdown table plus the same data as json."""
    os.makedirs(out_dir, exist_ok=True)
    cols = list(rows[0].keys())
    lines = [f"# {name}", ""] + [f"- {k}: {v}" for k, v in meta.items()] + [""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(os.path.join(out_dir, name + ".md"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, name + ".json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
