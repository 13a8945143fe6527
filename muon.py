"""Muon: MomentUm Orthogonalized by Newton-Schulz, for the 2-D weight matrices of a network.

`Muon` runs on one device; `DistMuon` runs the same math under torchrun with each rank
owning a slice of every same-shape group. Everything that is not a matrix (embeddings,
the LM head, norms, biases) belongs in AdamW: see `split_params` in model.py.

Sources: Keller Jordan's Muon (kellerjordan.github.io/posts/muon, github.com/KellerJordan/Muon),
Moonlight's RMS-matching scale (arXiv 2502.16982), Polar Express (arXiv 2505.16932), NorMuon
(arXiv 2510.05491), cautious weight decay (arXiv 2510.12402), nanochat's distributed step.

The update for a weight W with gradient G (momentum beta, learning rate lr, weight decay wd):

    M  <- beta * M + (1 - beta) * G             momentum (lerp form)
    U  <- (1 - beta) * G + beta * M             Nesterov look-ahead
    O  <- NewtonSchulz(U)                       ~ U V^T of the SVD U S V^T: every singular value -> ~1
    O  <- O / sqrt(V), V <- beta2 V + ...       optional (normuon=True): see normuon below
    W  <- W * (1 - lr * wd)                     decoupled weight decay (cautious_wd=True: only
                                                where O and W have the same sign)
    W  <- W - lr * scale(W) * O                 scale: "original"        max(1, rows/cols) ** 0.5
                                                       "match_rms_adamw" 0.2 * max(rows, cols) ** 0.5

Newton-Schulz coefficients: "quintic" repeats (3.4445, -4.7750, 2.0315) every iteration;
"polar_express" uses a different, optimised polynomial per iteration and lands closer to 1.

Shapes: a 2-D parameter is one matrix. A 3-D parameter is a *stack* of matrices (e.g. MoE
experts, [E, rows, cols]) and each matrix is orthogonalised on its own. A parameter with 4 or
more dims is conv-like and is flattened to (shape[0], -1) for the update.

State format (shared by Muon and DistMuon; the momentum part is also torch.optim.Muon's): one
entry per parameter, {"momentum_buffer": tensor of the parameter's shape} plus, with normuon,
{"second_moment": the matrix view's shape with the averaged dim set to 1}. DistMuon gathers the
slices its ranks own before saving and keeps only its own slice after loading, so a state dict
moves freely between Muon, DistMuon and any world size.

Speed: same-shape parameters form one stack, so each shape is one batched Newton-Schulz; their
weights and buffers live in stacked tensors that the parameters and state entries view. Each
iteration's two symmetric products (X X^T and a*I + b*A + c*A A^T) run on CUDA in a Triton kernel
that computes only the upper tiles (`gram`). On
CUDA the whole step of a stack (momentum -> orthogonalise -> normalise -> decay -> update) is
one torch.compile'd graph whose hyperparameters enter as 0-D tensors: a learning-rate or
momentum schedule changes their values, never the graph, so it never recompiles.
"""
import math

import torch
import torch.distributed as dist
from torch import Tensor

try:  # ships with CUDA builds of torch; without it the symmetric products run as plain matmuls
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# torch 2.13 renamed the flat collectives; 2.11 only has the old names.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

# Every iteration maps each singular value s of X to a*s + b*s^3 + c*s^5.
# Quintic (Keller Jordan): the steepest slope at s = 0 that still keeps s <= ~1.2, so tiny singular
# values grow fast; it never converges to 1 and after 5 iterations leaves s in about [0.68, 1.13].
QUINTIC = (3.4445, -4.7750, 2.0315)
# Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv 2505.16932): the minimax-optimal odd
# quintic for each iteration, computed for a spectrum in [1e-3, 1]; this is the 5-iteration table
# with the 2% safety margin that modded-nanogpt ships. In exact arithmetic singular values in
# [1e-3, 1] (after the 2% margin below) end in [0.84, 1.15].
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def newton_schulz_coefficients(name: str, steps: int) -> tuple:
    """The (a, b, c) of every iteration: a tuple of `steps` triples."""
    if name == "quintic":
        return (QUINTIC,) * steps
    if name == "polar_express":
        if not 1 <= steps <= len(POLAR_EXPRESS):
            raise ValueError(f"polar_express has a table for 1 to {len(POLAR_EXPRESS)} steps, got ns_steps={steps}")
        return POLAR_EXPRESS[:steps]
    raise ValueError(f"ns_coefficients must be 'quintic' or 'polar_express', got {name!r}")


def newton_schulz(G: Tensor, steps: int, coefficients: str = "quintic") -> Tensor:
    """`steps` Newton-Schulz iterations on the last two dims of G, in bf16.

    Normalising by the Frobenius norm puts every singular value in (0, 1], where the
    polynomials are fitted (Polar Express adds a 2% margin: bf16 rounding can push the top one
    a little past 1); the division is folded into the first iteration's coefficients. The
    result's singular values are ~1, which trains as well as the exact polar factor U V^T and
    costs a handful of matmuls.
    """
    X = G.bfloat16().reshape(-1, *G.shape[-2:])  # one batch dim for bmm
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix X X^T is then the small one
        X = X.mT
    margin = 1.02 if coefficients == "polar_express" else 1.0
    A = gram(X)  # X X^T of the X not yet normalised
    # The norm n without a pass over X: n^2 = trace(X X^T). Iteration 1 on X/n, where A becomes
    # A/n^2, is a*X/n + b*A X/n^3 + c*A^2 X/n^5: its coefficients divided by n, n^3, n^5 (each
    # per matrix). On one H200 this saved ~0.2 of 3.8 ms at 768x12. fp32 bounds n to ~[1e-7, 1e9].
    n = A.diagonal(dim1=-2, dim2=-1).float().sum(-1).sqrt() * margin + 1e-7
    for i, (a, b, c) in enumerate(newton_schulz_coefficients(coefficients, steps)):
        if i == 0:
            a, b, c = a / n, b / n / n / n, c / n / n / n / n / n  # no n^5: it overflows from n = 6e7
        else:
            A = gram(X)
        B = gram(A, alpha=c, beta=b, C=A, shift=a)  # a*I + b*A + c*A@A (A is symmetric: A@A = A A^T)
        # B is symmetric too, so B @ X = (X^T @ B)^T: a tall stack is multiplied in its own layout
        # and the update leaves contiguous (read transposed, the elementwise update ran 3x slower)
        X = (X.mT @ B).mT if tall else B @ X
    if tall:
        X = X.mT
    return X.reshape(G.shape)


def gram(X: Tensor, alpha=1.0, beta=0.0, C: Tensor | None = None, shift=0.0) -> Tensor:
    """shift * I + beta * C + alpha * X @ X^T for a stack X [n, m, k] (C: [n, m, m], symmetric).

    alpha, beta and shift are numbers or [n] tensors (one value per matrix). The result is
    symmetric, so on CUDA a Triton kernel computes only the tiles on and above the diagonal and
    mirrors them: X X^T and A A^T each cost about half a matmul, which saves a third of the
    Newton-Schulz FLOPs for square matrices. It sums in float32 and rounds once. Elsewhere X X^T
    is a bmm rounded to X's dtype, and the sum is taken in float32 and rounded again.
    """
    if X.is_cuda and GRAM_TRITON:
        return _gram_triton(X, alpha, beta, C, shift)
    alpha, beta, shift = (v.view(-1, 1, 1) if isinstance(v, Tensor) else v for v in (alpha, beta, shift))
    out = alpha * (X @ X.mT).float()
    if C is not None:
        out = out + beta * C.float()
    if isinstance(shift, Tensor) or shift:  # plain X X^T (half the calls) needs no identity
        out = out + shift * torch.eye(X.size(-2), device=X.device)
    return out.to(X.dtype)


def zeropower_via_newtonschulz5(G: Tensor, steps: int = 5, coefficients: str = "quintic") -> Tensor:
    """Orthogonalise G (..., rows, cols) per matrix; compiled on CUDA, eager elsewhere."""
    if G.ndim < 2:
        raise ValueError(f"Newton-Schulz needs a matrix or a stack of matrices, got shape {tuple(G.shape)}")
    newton_schulz_coefficients(coefficients, steps)  # validates
    return maybe_compiled(newton_schulz, G.is_cuda)(G, steps, coefficients)


def normuon_normalise(O: Tensor, second_moment: Tensor, beta2: Tensor) -> Tensor:
    """NorMuon: even out the size of O's rows (or columns) with an Adam-like second moment.

    Orthogonalisation makes O's vectors along its *smaller* dim unit-norm, but leaves the other
    dim's vectors (the rows of a tall O, the columns of a wide one) of uneven size. Keep a running
    mean of their squared entries (second_moment, one number per such row or column) and divide
    by its square root; then restore O's Frobenius norm, so lr and adjust_lr mean what they mean
    without normuon. The paper fixes the RMS instead (0.2, as match_rms_adamw does).
    """
    O = O.float()
    dim = -1 if O.size(-2) >= O.size(-1) else -2
    sq = O.square().mean(dim=dim, keepdim=True)  # the only pass over O before the update itself
    second_moment.lerp_(sq, 1 - beta2)
    inv = second_moment.clamp_min(1e-10).rsqrt()
    # ||O||^2 and ||O * inv||^2 are sums over the row (column) means sq, times the row length,
    # which cancels in their ratio: no second and third pass over O for the two norms
    ratio = sq.sum(dim=(-2, -1), keepdim=True) / (sq * inv.square()).sum(dim=(-2, -1), keepdim=True).clamp_min(1e-20)
    return (O * (inv * ratio.sqrt())).bfloat16()


def muon_update(G: Tensor, bufs: Tensor, second: Tensor | None, hp: dict, nesterov: bool,
                ns_steps: int, coefficients: str) -> Tensor:
    """Momentum, Nesterov, Newton-Schulz (and NorMuon) for a stack G [n, rows, cols] of gradients.

    bufs (the stacked momentum buffers [n, rows, cols]) and second (NorMuon's stacked second
    moments, or None) are updated in place. Returns the bf16 update stack. hp holds 0-D tensors:
    momentum, beta2, grad_scale (the training scripts clip with it).
    """
    G = G * hp["grad_scale"]
    bufs.lerp_(G, 1 - hp["momentum"])
    U = G.lerp(bufs, hp["momentum"]) if nesterov else bufs
    O = newton_schulz(U, ns_steps, coefficients)
    return normuon_normalise(O, second, hp["beta2"]) if second is not None else O


def apply_update(P: Tensor, update: Tensor, hp: dict, scale: float, cautious_wd: bool) -> None:
    """Decoupled weight decay, then the scaled step, in place on the stacked weights P:
    P <- P - lr*wd*P [only where update and P agree in sign, if cautious_wd] - lr*scale*update."""
    lr, wd = hp["lr"], hp["weight_decay"]
    if cautious_wd:  # decay only the weights this step already moves towards zero
        P.sub_(P * (update * P >= 0) * (lr * wd))
    else:
        P.mul_(1 - lr * wd)
    P.sub_(update * (lr * scale))  # a bf16 update promotes to the weight's dtype inside the kernel


def muon_step(P: Tensor, G: Tensor, bufs: Tensor, second: Tensor | None, hp: dict, nesterov: bool,
              ns_steps: int, coefficients: str, scale: float, cautious_wd: bool) -> None:
    """The whole single-device step of one same-shape stack: what Muon compiles as one graph."""
    update = muon_update(G, bufs, second, hp, nesterov, ns_steps, coefficients)
    apply_update(P, update, hp, scale, cautious_wd)


# The symmetric product as a Triton kernel (CUDA only; tests run it on CPU through Triton's
# interpreter). Program (i, j, b) computes tile (i, j) of matrix b for j >= i only, from row
# blocks i and j of X, and writes it twice: at (i, j) and, transposed, at (j, i).
if triton is not None:
    @triton.jit
    def _gram_kernel(X, C, Out, Coef, alpha, beta, shift, sxb, sxm, sxk, scb, scm, scn, sob, som, son,
                     M: tl.constexpr, K: tl.constexpr, HAS_C: tl.constexpr, PER_MATRIX: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        i, j, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        if j < i:  # the lower triangle is written by its mirror tile
            return
        if PER_MATRIX:  # alpha, beta, shift of matrix b: row b of Coef [n, 3]
            alpha, beta, shift = tl.load(Coef + 3 * b), tl.load(Coef + 3 * b + 1), tl.load(Coef + 3 * b + 2)
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

# Set False to run the symmetric products as cuBLAS matmuls on CUDA too (bench/muon_step.py does).
GRAM_TRITON = triton is not None
# Tile shape and pipelining of the kernel (measured on an H200: bench/gram_kernel.py).
GRAM_CONFIG = dict(BLOCK_M=128, BLOCK_K=64, num_warps=8, num_stages=3)


def _gram_triton(X: Tensor, alpha, beta, C: Tensor | None, shift=0.0, config: dict | None = None) -> Tensor:
    n, M, K = X.shape  # any strides: a transposed (tall) stack is read as it lies, without a copy
    out = X.new_empty((n, M, M))
    C_ = out if C is None else C  # never read when HAS_C is False
    per_matrix = any(isinstance(v, Tensor) for v in (alpha, beta, shift))
    coef = out  # never read unless per_matrix
    if per_matrix:
        coef = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=X.device).expand(n)
                            for v in (alpha, beta, shift)], dim=1).contiguous()
        alpha = beta = shift = 0.0
    cfg = config or GRAM_CONFIG
    tiles = triton.cdiv(M, cfg["BLOCK_M"])
    _gram_kernel[(tiles, tiles, n)](X, C_, out, coef, alpha, beta, shift, *X.stride(), *C_.stride(), *out.stride(),
                                    M=M, K=K, HAS_C=C is not None, PER_MATRIX=per_matrix, **cfg)
    return out


# torch.compile backend; tests swap in a counting backend to check that nothing recompiles
COMPILE_BACKEND = "inductor"
_compiled = {}  # compiled on first use: importing the compiler costs every process ~2 s


def maybe_compiled(fn, compile: bool):
    """fn compiled (once per function and backend) when `compile`, else fn itself."""
    if not compile:
        return fn
    key = (fn, id(COMPILE_BACKEND))
    if key not in _compiled:
        # one graph per stack shape (and option set): a model can have more than dynamo's default
        # of 8, and past the limit it would silently run eager
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _compiled[key] = torch.compile(fn, dynamic=False, backend=COMPILE_BACKEND)
    return _compiled[key]


def matrix_view(x: Tensor) -> Tensor:
    """The view Muon orthogonalises: 2-D and 3-D (stack) as they are, >=4-D conv-like as (shape[0], -1)."""
    return x if x.ndim <= 3 else x.view(x.size(0), -1)


def second_moment_shape(p: Tensor) -> tuple:
    """NorMuon's factored second moment: the matrix view's shape with the averaged dim set to 1."""
    *batch, rows, cols = matrix_view(p).shape
    return (*batch, rows, 1) if rows >= cols else (*batch, 1, cols)


def update_scale(shape, adjust_lr: str) -> float:
    """Per-matrix factor on the learning rate; `shape` is the matrix view's shape."""
    rows, cols = shape[-2], shape[-1]
    if adjust_lr == "original":
        return max(1.0, rows / cols) ** 0.5
    if adjust_lr == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"adjust_lr must be 'original' or 'match_rms_adamw', got {adjust_lr!r}")


def hyperparameters(group: dict, grad_scale, cache: dict) -> dict:
    """The group's schedulable values (and grad_scale) as 0-D float32 CPU tensors.

    Compiled code sees tensors, not Python floats, so new values do not recompile it; CPU
    scalars reach a CUDA kernel as launch arguments, with no host-device copy. A tensor is
    refilled only when its value changed: the host does this before the step's first kernel.
    """
    tensors, last = cache.setdefault(id(group), ({}, {}))
    out = {}
    for k in ("lr", "momentum", "weight_decay", "beta2", "grad_scale"):
        value = grad_scale if k == "grad_scale" else group[k]
        if isinstance(value, Tensor):
            out[k] = value
            continue
        if last.get(k) != value:  # a schedule changes lr every step: no new tensor for it
            if k not in tensors:
                tensors[k] = torch.zeros(())
            tensors[k].fill_(value)
            last[k] = value
        out[k] = tensors[k]
    return out


def _state_shapes(p: Tensor, key: str) -> tuple:
    """(shape in the stack, shape in state[p]) of the buffer `key` of parameter p."""
    if key == "momentum_buffer":  # stored in the parameter's shape, as torch.optim.Muon does
        return matrix_view(p).shape, p.shape
    return second_moment_shape(p), second_moment_shape(p)


def _state_keys(group: dict) -> tuple:
    return ("momentum_buffer", "second_moment") if group["normuon"] else ("momentum_buffer",)


def _views_of(stack: Tensor, tensors) -> bool:
    """True while tensors[i] still starts where stack[i] does, for every i."""
    step, start = stack.stride(0) * stack.element_size(), stack.data_ptr()
    return [t.data_ptr() for t in tensors] == list(range(start, start + len(tensors) * step, step))


def stacked_params(stacks: dict, params) -> Tensor:
    """A bucket's weights as one stacked tensor [n, *matrix view], each parameter's .data a view into it.

    The update then reaches all the bucket's weights in one kernel, where a loop over parameters
    launched one per parameter (GPT-2-small's matrices, every option on, one H100: 7.40 and 6.99
    -> 6.69 and 6.67 ms, bench/results/muon_step_stacked_weights.md).
    Nothing else changes for the model: a parameter keeps its shape, grad and identity. If
    something later replaces a parameter's data (load_state_dict(assign=True), .to()), the
    bucket is stacked again at the next step.
    """
    key = ("params", *(id(p) for p in params))
    stack = stacks.get(key)
    if stack is None or not _views_of(stack, params):  # a parameter's data_ptr is its .data's
        for k in [k for k in stacks if k[0] == "params" and set(k[1:]) & set(key[1:])]:
            del stacks[k]  # an older stack of some of these weights (the set of params with grads changed)
        stack = torch.stack([matrix_view(p.data) for p in params])
        for i, p in enumerate(params):
            p.data = stack[i].view(p.shape)
        stacks[key] = stack
    return stack


def stacked_state(state, stacks: dict, params, key: str) -> Tensor:
    """The `key` buffers of a bucket as one stacked tensor, updated in place by the step.

    Each parameter's state[key] is a view into the stack, so the step neither stacks nor
    unstacks them. A buffer the stack did not make (a fresh optimizer, a state dict just loaded,
    a buffer set by hand) is copied into a new stack on first use. Momentum has the parameter's dtype,
    NorMuon's second moment is float32.
    """
    cache_key = (key, *(id(p) for p in params))
    cached = stacks.get(cache_key)
    # the check runs on the host before the step's first kernel: identity tests of the entries
    # the stack was made for, not a lookup of every parameter in `state` (~40 us per bucket)
    if cached is not None and cached[1] is state and all(e.get(key) is b for e, b in zip(cached[2], cached[3])):
        return cached[0]
    bufs = [state[p].get(key) for p in params]
    dtype = None if key == "momentum_buffer" else torch.float32
    stack = torch.stack([b.reshape(_state_shapes(p, key)[0]).to(dtype or p.dtype) if b is not None
                         else p.new_zeros(_state_shapes(p, key)[0], dtype=dtype) for p, b in zip(params, bufs)])
    for i, p in enumerate(params):
        state[p][key] = stack[i].view(_state_shapes(p, key)[1])
    stacks[cache_key] = (stack, state, [state[p] for p in params], [state[p][key] for p in params])
    return stack


def _defaults(**kw):
    update_scale((1, 1), kw["adjust_lr"])  # validate the names early, not at the first step
    newton_schulz_coefficients(kw["ns_coefficients"], kw["ns_steps"])
    return kw


def _check_params(param_groups):
    for group in param_groups:
        for p in group["params"]:
            if p.ndim < 2:
                raise ValueError(
                    f"Muon only updates matrices (>=2-D parameters); got a {p.ndim}-D parameter of shape "
                    f"{tuple(p.shape)}. Put biases, norm weights and other vectors/scalars in AdamW "
                    f"(model.split_params does this).")


def same_shape_buckets(params, cache: dict, slot) -> list:
    """Group parameters by (shape, dtype, device) so each bucket is one batched Newton-Schulz call.

    Grouping costs the host ~40 us before the step's first kernel (72 matrices, one H200 host),
    so it is kept in cache[slot] and reused while the same parameters have the same data (new
    data, as from .to(), may bring a new dtype).
    """
    key = (*map(id, params), *(p.data_ptr() for p in params))
    if cache.get(slot, (None,))[0] != key:
        buckets = {}
        for p in params:
            buckets.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
        cache[slot] = (key, list(buckets.values()))
    return cache[slot][1]


class Muon(torch.optim.Optimizer):
    """Single-device Muon. Same-shape parameters are stacked so Newton-Schulz runs once per shape.

    ns_coefficients: "quintic" or "polar_express"; normuon: NorMuon's row/column normalisation
    with second-moment decay beta2; cautious_wd: weight decay only where update and weight agree
    in sign; compile: torch.compile each stack's step (default: on CUDA; never needed for
    correctness).
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0,
                 adjust_lr="original", ns_coefficients="quintic", normuon=False, beta2=0.95, cautious_wd=False,
                 compile=None):
        super().__init__(params, _defaults(
            lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay,
            adjust_lr=adjust_lr, ns_coefficients=ns_coefficients, normuon=normuon, beta2=beta2,
            cautious_wd=cautious_wd))
        _check_params(self.param_groups)
        self.compile = compile
        self._stacks = {}  # see stacked_params and stacked_state
        self._hp = {}  # see hyperparameters
        self._buckets = {}  # see same_shape_buckets

    @torch.no_grad()
    def step(self, closure=None, grad_scale: float | Tensor = 1.0):
        """One Muon step; grad_scale (a float or a 0-D tensor) multiplies the gradients first:
        the training scripts clip with it."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            hp = hyperparameters(group, grad_scale, self._hp)
            params = [p for p in group["params"] if p.grad is not None]
            for bucket in same_shape_buckets(params, self._buckets, id(group)):
                # one copy kernel, outside the graph, launched first: the GPU works on it while
                # the host checks the stacks below
                grads = torch.stack([matrix_view(p.grad) for p in bucket])
                bufs = stacked_state(self.state, self._stacks, bucket, "momentum_buffer")
                second = stacked_state(self.state, self._stacks, bucket, "second_moment") if group["normuon"] else None
                weights = stacked_params(self._stacks, bucket)
                step = maybe_compiled(muon_step, bucket[0].is_cuda if self.compile is None else self.compile)
                step(weights, grads, bufs, second, hp, group["nesterov"], group["ns_steps"], group["ns_coefficients"],
                     update_scale(matrix_view(bucket[0]).shape, group["adjust_lr"]), group["cautious_wd"])
        return loss


class DistMuon(torch.optim.Optimizer):
    """Muon spread over the ranks of the default process group (NCCL or gloo); same options as Muon.

    Every rank holds all weights and computes its own local gradients (no DDP wrapper: this
    optimizer is what averages the Muon gradients). For each same-shape group of n matrices,
    padded with zeros to a multiple of the world size W, rank r owns the slice
    [r*n_pad/W, (r+1)*n_pad/W). One step is three phases:

      1. launch an async reduce-scatter (average) of every group's stacked gradients;
      2. per group: wait for its gradients, then the owner does momentum, Nesterov and
         Newton-Schulz (and NorMuon) on its slice and launches an async all-gather of the bf16
         updates (this compute overlaps the other groups' collectives);
      3. per group: wait for its updates; every rank applies decay and the update to all its
         weights. Identical inputs and identical elementwise math keep the replicas identical,
         and gathering bf16 updates moves half the bytes of gathering fp32 weights.

    Optimizer state exists only for owned parameters: ~1/W of Muon's state per rank.

    Gradient clipping: the norm to clip by is that of the *averaged* gradient, which for these
    parameters exists only as the owners' slices after phase 1. `reduce_grads()` runs phase 1
    early and `grad_sq_sum()` returns the global sum of squares of the averaged gradient (each
    rank sums its slice, then one scalar all-reduce); `step(grad_scale=...)` then scales the
    averaged slices. See clip_grads in common.py.

    state_dict() and load_state_dict() are collective: call them on every rank.
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0,
                 adjust_lr="original", ns_coefficients="quintic", normuon=False, beta2=0.95, cautious_wd=False,
                 compile=None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DistMuon needs an initialised process group (run under torchrun and call "
                               "torch.distributed.init_process_group first); use Muon on a single process.")
        super().__init__(params, _defaults(
            lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay,
            adjust_lr=adjust_lr, ns_coefficients=ns_coefficients, normuon=normuon, beta2=beta2,
            cautious_wd=cautious_wd))
        _check_params(self.param_groups)
        self.compile = compile
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self._stacks = {}  # see stacked_params and stacked_state
        self._hp = {}  # see hyperparameters
        self._buckets = {}  # see same_shape_buckets
        self._pending = None  # phase-1 work in flight: [(work, averaged grad slice)]

    def _groups(self):
        """(param group, same-shape bucket, slice size, owned indices) in an order all ranks share."""
        out = []
        for group in self.param_groups:
            for bucket in same_shape_buckets(group["params"], self._buckets, id(group)):
                per_rank = math.ceil(len(bucket) / self.world_size)
                start = self.rank * per_rank
                out.append((group, bucket, per_rank, range(start, min(start + per_rank, len(bucket)))))
        return out

    def _padded_stack(self, tensors, per_rank):
        """[n, rows, cols] -> [per_rank * W, rows, cols], zero padded."""
        mats = [matrix_view(t) for t in tensors]
        full = mats[0].new_zeros((per_rank * self.world_size, *mats[0].shape))
        torch._foreach_copy_(list(full[:len(mats)].unbind(0)), mats)
        return full

    def _compiled(self, fn, p):
        return maybe_compiled(fn, p.is_cuda if self.compile is None else self.compile)

    @torch.no_grad()
    def reduce_grads(self):
        """Phase 1: launch the reduce-scatters; each rank will receive the average of its slice."""
        if self._pending is not None:
            return
        self._pending = []
        for _, bucket, per_rank, _ in self._groups():
            for p in bucket:
                if p.grad is None:
                    raise RuntimeError(f"DistMuon: a parameter of shape {tuple(p.shape)} has no gradient; "
                                       "every rank needs a gradient for every Muon parameter at each step.")
            full = self._padded_stack([p.grad for p in bucket], per_rank)
            mine = full.new_empty((per_rank, *full.shape[1:]))
            self._pending.append((_reduce_scatter(mine, full, op=dist.ReduceOp.AVG, async_op=True), mine))

    def zero_grad(self, set_to_none: bool = True):
        """Also drops a launched but unused phase 1 (a step skipped for an inf/nan gradient)."""
        if self._pending is not None:
            for work, _ in self._pending:
                work.wait()
            self._pending = None
        super().zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def grad_sq_sum(self) -> Tensor:
        """Sum of squares of the averaged gradients of all Muon parameters (collective)."""
        self.reduce_grads()
        total = torch.zeros((), device=self.param_groups[0]["params"][0].device)
        for work, mine in self._pending:
            work.wait()
            total += mine.float().square().sum()  # padding rows are zero
        dist.all_reduce(total)
        return total

    @torch.no_grad()
    def step(self, closure=None, grad_scale: float | Tensor = 1.0):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.reduce_grads()
        pending, self._pending = self._pending, None
        hps = {id(g): hyperparameters(g, grad_scale, self._hp) for g in self.param_groups}

        # 2. the owner turns its averaged slice into updates, then shares them
        gathers = []
        for (group, bucket, per_rank, owned), (work, grads) in zip(self._groups(), pending):
            work.wait()
            update = grads.new_zeros(grads.shape, dtype=torch.bfloat16)
            if len(owned):
                n, mine = len(owned), [bucket[i] for i in owned]
                bufs = stacked_state(self.state, self._stacks, mine, "momentum_buffer")
                second = stacked_state(self.state, self._stacks, mine, "second_moment") if group["normuon"] else None
                update[:n] = self._compiled(muon_update, grads)(grads[:n], bufs, second, hps[id(group)],
                                                                group["nesterov"], group["ns_steps"],
                                                                group["ns_coefficients"])
            full = update.new_empty((per_rank * self.world_size, *update.shape[1:]))
            gathers.append((_all_gather(full, update, async_op=True), full, group, bucket))

        # 3. every rank applies every update to its replica of the weights
        for work, full, group, bucket in gathers:
            work.wait()
            weights = stacked_params(self._stacks, bucket)
            self._compiled(apply_update, full)(weights, full[:len(bucket)], hps[id(group)],
                                               update_scale(full.shape, group["adjust_lr"]), group["cautious_wd"])
        return loss

    @torch.no_grad()
    def state_dict(self):
        """The full (gathered) state in Muon's format; collective, identical on every rank."""
        for group, bucket, per_rank, owned in self._groups():
            for key in _state_keys(group):
                have = all(key in self.state[bucket[i]] for i in owned)
                have = torch.tensor(float(have), device=bucket[0].device)  # NCCL takes no CPU tensors
                dist.all_reduce(have, op=dist.ReduceOp.MIN)  # saved only once every owner has stepped
                if have.item() == 0:
                    continue
                stack_shape, stored_shape = _state_shapes(bucket[0], key)
                mats = [self.state[bucket[i]][key].reshape(stack_shape) for i in owned]
                dtype = None if key == "momentum_buffer" else torch.float32
                mine = self._padded_stack(mats or [bucket[0].new_zeros(stack_shape, dtype=dtype)], per_rank)[:per_rank]
                if not mats:
                    mine.zero_()
                full = mine.new_empty((per_rank * self.world_size, *mine.shape[1:]))
                _all_gather(full, mine.contiguous())
                for i, p in enumerate(bucket):
                    self.state[p][key] = full[i].view(stored_shape).clone()
        sd = super().state_dict()
        self._drop_unowned_state()
        return sd

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._drop_unowned_state()

    def _drop_unowned_state(self):
        for _, bucket, _, owned in self._groups():
            for i, p in enumerate(bucket):
                if i not in owned:
                    self.state.pop(p, None)
