"""DistMuon under torchrun gives the weights single-device Muon gives, after a few steps.

    torchrun --nproc_per_node 8 bench/dist_check.py      # NCCL on GPUs, gloo on CPU

Each rank draws its own gradients; their average is what Muon on rank 0 sees. With the defaults and
with every option on (Polar Express, NorMuon, cautious weight decay), prints the largest
weight difference; exits non-zero beyond bf16 tolerance.
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from muon import DistMuon, Muon  # noqa: E402

# a GPT-like mix whose group sizes (13, 5, 3, 1) divide no world size above 1
SHAPES = [(256, 256)] * 13 + [(1024, 256)] * 5 + [(256, 1024)] * 3 + [(4, 64, 128)]
STEPS, TOL = 5, 2e-2
OPTIONS = {"defaults": {}, "every option": dict(ns_coefficients="polar_express", normuon=True, cautious_wd=True)}


def check(label, options, rank, world, device):
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g) * 0.02 for s in SHAPES]
    ours = [torch.nn.Parameter(w.clone().to(device)) for w in init]
    opt = DistMuon(ours, lr=0.02, weight_decay=0.1, **options)
    ref = [torch.nn.Parameter(w.clone().to(device)) for w in init]
    ref_opt = Muon(ref, lr=0.02, weight_decay=0.1, **options)
    for step in range(STEPS):
        grads = [[torch.randn(s, generator=torch.Generator().manual_seed(1000 * step + r)) for s in SHAPES]
                 for r in range(world)]
        for p, gr in zip(ours, grads[rank]):
            p.grad = gr.to(device)
        opt.step()
        for i, p in enumerate(ref):
            p.grad = (sum(grads[r][i] for r in range(world)) / world).to(device)
        ref_opt.step()
    diff = max((a - b).abs().max().item() for a, b in zip(ours, ref))
    scale = max(b.abs().max().item() for b in ref)
    ok = diff <= TOL * scale
    if rank == 0:
        print(f"{label}, world {world}: max |DistMuon - Muon| = {diff:.2e} (weights up to {scale:.2e}; "
              f"tolerance {TOL:.0e} relative): {'OK' if ok else 'MISMATCH'}", flush=True)
    return ok


def main():
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    ok = True
    for label, options in OPTIONS.items():
        ok &= check(label, options, rank, world, device)
    dist.barrier()
    dist.destroy_process_group()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
