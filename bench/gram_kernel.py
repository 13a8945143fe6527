"""The symmetric product X X^T of Newton-Schulz: our Triton kernel (upper tiles only, mirrored)
against cuBLAS, on the stacks of three GPTs' Muon matrices. Checks the kernel against a float32
reference first, then times one product, one A A^T + A product and a whole 5-step Newton-Schulz.

    python bench/gram_kernel.py          # CUDA only; writes bench/results/gram_kernel.{md,json}
"""
import argparse
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import muon  # noqa: E402
import muon_fast  # noqa: E402
from bench.muon_step import get_device_name, write_table  # noqa: E402

CONFIGS = {
    "128x64 w8 s3": dict(BLOCK_M=128, BLOCK_K=64, num_warps=8, num_stages=3),
    "128x64 w4 s4": dict(BLOCK_M=128, BLOCK_K=64, num_warps=4, num_stages=4),
    "64x64 w4 s4": dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=4),
}


DEFAULT = next(name for name, cfg in CONFIGS.items() if cfg == muon_fast.GRAM_CONFIG)


def stacks(width, layers):
    """The Newton-Schulz inputs of a width x layers GPT in Muon's wide orientation: [n, m, k]."""
    return [(4 * layers, width, width), (layers, width, 4 * width), (layers, width, 4 * width)]


def rel_err(x, ref):
    return ((x.float() - ref).norm() / ref.norm()).item()


def ms(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def newton_schulz_time(shapes, use_triton):
    """A whole compiled 5-step Newton-Schulz over every stack of one set."""
    muon_fast.ENABLED = use_triton
    torch._dynamo.reset()
    xs = [torch.randn(s, device="cuda", dtype=torch.bfloat16) for s in shapes]
    fn = torch.compile(muon.zeropower_via_newtonschulz5, dynamic=False)
    t = ms(lambda: [fn(x, 5) for x in xs])
    muon_fast.ENABLED = True
    return t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="768x12,1024x24,2048x24")
    ap.add_argument("--out_dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for spec in args.sets.split(","):
        width, layers = map(int, spec.split("x"))
        shapes = stacks(width, layers)
        for n, m, k in sorted(set(shapes)):
            X = torch.randn(n, m, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
            ref = X.float() @ X.float().mT
            A = (ref / ref.norm(dim=(-2, -1), keepdim=True)).bfloat16()
            refB = 3.4445 * torch.eye(m, device="cuda") - 4.775 * A.float() + 2.0315 * A.float() @ A.float()
            row = {"set": spec, "stack": f"{n}x{m}x{k}",
                   "cuBLAS X X^T / bA+cA A^T ms": f"{ms(lambda: X @ X.mT):.3f} / "
                                                 f"{ms(lambda: torch.baddbmm(A, A, A, beta=-4.775, alpha=2.0315)):.3f}"}
            for name, cfg in CONFIGS.items():
                err = max(rel_err(muon_fast.gram(X, config=cfg), ref),
                          rel_err(muon_fast.gram(A, 2.0315, -4.775, A, 3.4445, cfg), refB))
                row[f"Triton {name} ms (rel err)"] = (
                    f"{ms(lambda: muon_fast.gram(X, config=cfg)):.3f} / "
                    f"{ms(lambda: muon_fast.gram(A, 2.0315, -4.775, A, 3.4445, cfg)):.3f} ({err:.0e})")
            rows.append(row)
            print(row, flush=True)
        rows.append({"set": spec, "stack": "5-step Newton-Schulz, all stacks (compiled)",
                     "cuBLAS X X^T / bA+cA A^T ms": f"{newton_schulz_time(shapes, False):.3f}",
                     f"Triton {DEFAULT} ms (rel err)": f"{newton_schulz_time(shapes, True):.3f}"})
        print(rows[-1], flush=True)
    meta = {"device": get_device_name(torch.device("cuda")), "torch": torch.__version__,
            "triton": triton.__version__, "command": "python " + " ".join(sys.argv)}
    write_table(args.out_dir, "gram_kernel", meta, rows)


if __name__ == "__main__":
    main()
