"""The fast path of QK-norm + RoPE on CUDA: model.apply_rope(RMSNorm(x)) on q or k with a learned
gain, as one Triton kernel forward and one backward. Left to the compiler, the gain's gradient (a sum
over every token and head) splits the backward into a rotation pass, a norm pass per tensor and a
final sum. model.norm_rope calls `norm_rope` here when `enabled(x)`; set `model_fast.ENABLED = False`
to run the plain path on CUDA too. Speed only: tests hold it equal to the plain path (which rounds to
x's dtype between the norm and RoPE; the kernels keep float32 until the output).
"""
import torch
from torch import Tensor

try:  # ships with CUDA builds of torch; CPU tests run the kernels through Triton's interpreter
    import triton
    import triton.language as tl
except ImportError:
    triton = None

ENABLED = True
BLOCK_ROWS = 32  # rows (one token's head each) per program


def enabled(x: Tensor) -> bool:
    return ENABLED and triton is not None and x.is_cuda and x.numel() < 2 ** 31  # the kernels index in int32


def norm_rope(x: Tensor, weight: Tensor, eps: float, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE(weight * x / rms(x)) for x (B, T, heads, head_dim); cos, sin (T, head_dim // 2)."""
    return NormRoPE.apply(x, weight, eps, cos, sin)


def _launch(x: Tensor):
    """The grid (one program per BLOCK_ROWS rows) and the kernels' shape arguments for x (B, T, H, D)."""
    B, T, H, D = x.shape
    rows = B * T * H
    grid = (triton.cdiv(rows, BLOCK_ROWS),)
    return grid, dict(n_rows=rows, T=T, H=H, HALF=D // 2, BLOCK_H=triton.next_power_of_2(D // 2), BLOCK_R=BLOCK_ROWS)


class NormRoPE(torch.autograd.Function):
    """The forward saves x alone; the backward recomputes the norm and writes each program's share
    of the gain's gradient, summed at the end."""

    @staticmethod
    def forward(ctx, x, weight, eps, cos, sin):
        grid, meta = _launch(x)
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        _forward_kernel[grid](x, weight, cos, sin, y, eps, *x.stride(), cos.stride(0), **meta)
        ctx.save_for_backward(x, weight, cos, sin)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, cos, sin = ctx.saved_tensors
        grid, meta = _launch(x)
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        dw = torch.empty((grid[0], x.size(-1)), dtype=torch.float32, device=x.device)
        _backward_kernel[grid](grad, x, weight, cos, sin, dx, dw, ctx.eps, *grad.stride(), *x.stride(),
                               cos.stride(0), **meta)
        return dx, dw.sum(0).to(weight.dtype), None, None, None


if triton is not None:
    # eps is a compile-time constant in every kernel: passed as a run-time argument, torch.compile hands
    # it over as float64, and the norm and everything downstream of it would run in float64.
    @triton.jit
    def _row_offsets(rows, T, H, sb, st, sh):
        # row r is head r % H of token (r // H) % T of sequence r // (T * H)
        t = (rows // H) % T
        return (rows // (T * H)) * sb + t * st + (rows % H) * sh, t

    @triton.jit
    def _load_halves(P, at, half, mask):
        # channels c and c + HALF as float32: `at` points at the first, `half` is the distance to the second
        return (tl.load(P + at, mask=mask, other=0.0).to(tl.float32),
                tl.load(P + at + half, mask=mask, other=0.0).to(tl.float32))

    @triton.jit
    def _normed_rows(X, Cos, Sin, rows, cols, mask, eps: tl.constexpr, sxb, sxt, sxh, sxd, sct, T, H,
                     HALF: tl.constexpr):
        # x / rms(x) of each row in halves, 1 / rms(x), and the cos and sin of each row's position
        off, t = _row_offsets(rows, T, H, sxb, sxt, sxh)
        x1, x2 = _load_halves(X, off[:, None] + cols[None, :] * sxd, HALF * sxd, mask)
        rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
        cs_at = t[:, None] * sct + cols[None, :]
        cos = tl.load(Cos + cs_at, mask=mask, other=0.0).to(tl.float32)
        sin = tl.load(Sin + cs_at, mask=mask, other=0.0).to(tl.float32)
        return x1 * rstd, x2 * rstd, rstd, cos, sin

    @triton.jit
    def _forward_kernel(X, W, Cos, Sin, Y, eps: tl.constexpr, sxb, sxt, sxh, sxd, sct, n_rows, T, H,
                        HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_H)  # one half of head_dim; channel c pairs with c + HALF
        mask = (rows[:, None] < n_rows) & (cols[None, :] < HALF)
        x1, x2, _, cos, sin = _normed_rows(X, Cos, Sin, rows, cols, mask, eps, sxb, sxt, sxh, sxd, sct, T, H, HALF)
        w1, w2 = _load_halves(W, cols, HALF, cols < HALF)
        a, b = x1 * w1[None, :], x2 * w2[None, :]
        y_at = Y + rows[:, None] * (2 * HALF) + cols[None, :]
        tl.store(y_at, (a * cos - b * sin).to(Y.dtype.element_ty), mask=mask)
        tl.store(y_at + HALF, (a * sin + b * cos).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _backward_kernel(G, X, W, Cos, Sin, DX, DW, eps: tl.constexpr, sgb, sgt, sgh, sgd, sxb, sxt, sxh, sxd, sct,
                         n_rows, T, H, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_H)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < HALF)
        x1, x2, rstd, cos, sin = _normed_rows(X, Cos, Sin, rows, cols, mask, eps, sxb, sxt, sxh, sxd, sct, T, H, HALF)
        goff, _ = _row_offsets(rows, T, H, sgb, sgt, sgh)
        g1, g2 = _load_halves(G, goff[:, None] + cols[None, :] * sgd, HALF * sgd, mask)
        r1, r2 = g1 * cos + g2 * sin, g2 * cos - g1 * sin  # the inverse rotation: the gradient before RoPE
        tl.store(DW + pid * (2 * HALF) + cols, tl.sum(r1 * x1, 0), mask=cols < HALF)
        tl.store(DW + pid * (2 * HALF) + HALF + cols, tl.sum(r2 * x2, 0), mask=cols < HALF)
        w1, w2 = _load_halves(W, cols, HALF, cols < HALF)
        r1, r2 = r1 * w1[None, :], r2 * w2[None, :]
        mean = ((tl.sum(r1 * x1, 1) + tl.sum(r2 * x2, 1)) / (2 * HALF))[:, None]
        dx_at = DX + rows[:, None] * (2 * HALF) + cols[None, :]
        tl.store(dx_at, (rstd * (r1 - x1 * mean)).to(DX.dtype.element_ty), mask=mask)
        tl.store(dx_at + HALF, (rstd * (r2 - x2 * mean)).to(DX.dtype.element_ty), mask=mask)
