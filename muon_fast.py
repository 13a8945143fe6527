"""What muon.py does only for speed.

- A same-shape group of parameters as one stack that the parameters are views of (`stacked`), stepped by
  one compiled graph (`compiled`) that takes its hyperparameters as tensors (`hyperparameters`), so a
  schedule never recompiles it.
- Newton-Schulz on CUDA: the same polynomial as muon.zeropower_via_newtonschulz5, with the two symmetric
  products of each iteration computed by a Triton kernel that does only the tiles on and above the
  diagonal. muon.py calls `newton_schulz` here when `enabled(G)`; set `muon_fast.ENABLED = False` to run
  the plain path on CUDA too. Tests hold it equal to the plain path.
"""
import functools

import torch
from torch import Tensor

try:  # ships with CUDA builds of torch; CPU tests run the kernel through Triton's interpreter
    import triton
    import triton.language as tl
except ImportError:
    triton = None

ENABLED = True
# Tile shape and pipelining of the kernel (bench/gram_kernel.py times the alternatives).
GRAM_CONFIG = dict(BLOCK_M=128, BLOCK_K=64, num_warps=8, num_stages=3)


def enabled(G: Tensor) -> bool:
    return ENABLED and triton is not None and G.is_cuda


def newton_schulz(X: Tensor, coefficients) -> Tensor:
    """The iterations of muon.zeropower_via_newtonschulz5 on a normalised bf16 stack X [n, rows, cols],
    rows <= cols (for a tall stack, the transposed view of it). Each is X <- B X with
    B = a*I + b*A + c*A A^T and A = X X^T. Both products are symmetric, so each costs about half a
    matmul (a third of the FLOPs saved for square matrices), and a sits on B's diagonal, added in
    float32 before B is rounded to bf16."""
    for a, b, c in coefficients:
        A = gram(X)  # reads X in any layout
        B = gram(A, alpha=c, beta=b, C=A, shift=a)
        # B X = (X^T B)^T: the transposed view of a tall stack is multiplied in its own layout, so
        # the result stays contiguous for what follows (read transposed, the update ran ~3x slower)
        X = B @ X if X.is_contiguous() else (X.mT @ B).mT
    return X


# ------------------------------------------------------------------ a same-shape group as one stack, one graph

def stacked(tensors: list, shape, rebind) -> Tensor:
    """The tensors as one stack [n, *shape] (shape: each one's matrix view) that they are views of, so a step
    reads and writes a group in single kernels. The first step moves each weight (p.data) or state buffer into
    the stack through `rebind(i, view)`; a parameter keeps its identity, shape and grad. Later steps find the
    stack from the storage; a tensor given new storage since (load_state_dict, .to()) makes the group stack
    anew."""
    first = tensors[0]
    nbytes = first.numel() * first.element_size()
    storage = first.untyped_storage()
    if all(t.is_contiguous() and t.dtype == first.dtype and t.untyped_storage().data_ptr() == storage.data_ptr()
           and t.data_ptr() == first.data_ptr() + i * nbytes for i, t in enumerate(tensors)):
        return first.new_empty(0).set_(storage, first.storage_offset(), (len(tensors), *shape))
    stack = torch.stack([t.reshape(shape) for t in tensors])
    for i, t in enumerate(tensors):
        rebind(i, stack[i].view(t.shape))
    return stack


def hyperparameters(group: dict, grad_scale) -> dict:
    """The schedulable values as 0-D float32 CPU tensors: compiled code sees tensors, not Python floats, so a
    schedule never recompiles it (a CPU scalar reaches a CUDA kernel as a launch argument, no host-device copy)."""
    hp = {k: torch.tensor(float(group[k])) for k in ("lr", "momentum", "weight_decay", "beta2")}
    hp["grad_scale"] = grad_scale if isinstance(grad_scale, Tensor) else torch.tensor(float(grad_scale))
    return hp


def compiled(fn, compile, on_cuda: bool):
    """fn, or fn under torch.compile as Muon's `compile` option says: a graph per stack shape and option set.
    Stacks past dynamo's recompile_limit (8) run eagerly, with its warning."""
    backend = on_cuda if compile is None else compile
    return _compile(fn, "inductor" if backend is True else backend) if backend else fn


@functools.cache  # one compiled function per (function, backend), shared by every optimizer
def _compile(fn, backend):
    return torch.compile(fn, dynamic=False, backend=backend)


if triton is not None:
    @triton.jit
    def _gram_kernel(X, C, Out, sxb, sxm, sxk, scb, scm, scn, sob, som, son,
                     alpha: tl.constexpr, beta: tl.constexpr, shift: tl.constexpr,
                     M: tl.constexpr, K: tl.constexpr, HAS_C: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        # Program (i, j, b) computes tile (i, j) of matrix b for j >= i only, from row blocks i and j
        # of X, and writes it twice: at (i, j) and, transposed, at (j, i). The coefficients are
        # compile-time constants: compiled, a run-time Python float reaches the kernel as float64 and
        # would pull the epilogue into float64 with it.
        i, j, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        if j < i:
            return
        ri = i * BLOCK_M + tl.arange(0, BLOCK_M)
        rj = j * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = tl.arange(0, BLOCK_K)
        xi = X + b * sxb + ri[:, None] * sxm + rk[None, :] * sxk  # [BLOCK_M, BLOCK_K] of row block i
        xj = X + b * sxb + rj[None, :] * sxm + rk[:, None] * sxk  # [BLOCK_K, BLOCK_M]: row block j, transposed
        acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            xi_tile = tl.load(xi, mask=(ri[:, None] < M) & (k + rk[None, :] < K), other=0.0)
            xj_tile = tl.load(xj, mask=(rj[None, :] < M) & (k + rk[:, None] < K), other=0.0)
            acc = tl.dot(xi_tile, xj_tile, acc)
            xi += BLOCK_K * sxk
            xj += BLOCK_K * sxk
        acc = acc * alpha
        inside = (ri[:, None] < M) & (rj[None, :] < M)
        if HAS_C:
            acc += beta * tl.load(C + b * scb + ri[:, None] * scm + rj[None, :] * scn, mask=inside).to(tl.float32)
        acc += tl.where(ri[:, None] == rj[None, :], shift, 0.0)
        out = acc.to(Out.dtype.element_ty)
        tl.store(Out + b * sob + ri[:, None] * som + rj[None, :] * son, out, mask=inside)
        if i != j:
            tl.store(Out + b * sob + rj[:, None] * som + ri[None, :] * son, tl.trans(out), mask=tl.trans(inside))


def gram(X: Tensor, alpha: float = 1.0, beta: float = 0.0, C: Tensor | None = None, shift: float = 0.0,
         config: dict | None = None) -> Tensor:
    """shift * I + beta * C + alpha * X X^T for a stack X [n, m, k] of any strides (C: [n, m, m],
    symmetric), summed in float32 and rounded once to X's dtype."""
    n, M, K = X.shape
    out = X.new_empty((n, M, M))
    cfg = config or GRAM_CONFIG
    tiles = triton.cdiv(M, cfg["BLOCK_M"])
    C_ = out if C is None else C  # never read when HAS_C is False
    _gram_kernel[(tiles, tiles, n)](X, C_, out, *X.stride(), *C_.stride(), *out.stride(), alpha=float(alpha),
                                    beta=float(beta), shift=float(shift), M=M, K=K, HAS_C=C is not None, **cfg)
    return out
