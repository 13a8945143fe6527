"""Muon: MomentUm Orthogonalized by Newton-Schulz, for the 2-D weight matrices of a network.

`Muon` runs on one device; `DistMuon` runs the same math under torchrun with each rank
owning a slice of every same-shape group. Everything that is not a matrix (embeddings,
the LM head, norms, biases) belongs in AdamW: see `split_params` in model.py.

Sources: Keller Jordan's Muon (kellerjordan.github.io/posts/muon, github.com/KellerJordan/Muon),
Moonlight's RMS-matching scale (arXiv 2502.16982), nanochat's distributed step.

The update for a weight W with gradient G (momentum beta, learning rate lr, weight decay wd):

    M  <- beta * M + (1 - beta) * G             momentum (lerp form)
    U  <- (1 - beta) * G + beta * M             Nesterov look-ahead
    O  <- NewtonSchulz5(U)                      ~ U V^T of the SVD U S V^T: every singular value -> ~1
    W  <- W * (1 - lr * wd)                     decoupled weight decay
    W  <- W - lr * scale(W) * O                 scale: "original"        max(1, rows/cols) ** 0.5
                                                       "match_rms_adamw" 0.2 * max(rows, cols) ** 0.5

Shapes: a 2-D parameter is one matrix. A 3-D parameter is a *stack* of matrices (e.g. MoE
experts, [E, rows, cols]) and each matrix is orthogonalised on its own. A parameter with 4 or
more dims is conv-like and is flattened to (shape[0], -1) for the update.

State format (shared by Muon and DistMuon, and by torch.optim.Muon): one entry per parameter,
{"momentum_buffer": tensor of the parameter's shape}. DistMuon gathers the slices its ranks own
before saving and keeps only its own slice after loading, so a state dict moves freely between
Muon, DistMuon and any world size.
"""
import math

import torch
import torch.distributed as dist
from torch import Tensor

# torch 2.13 renamed the flat collectives; 2.11 only has the old names.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _newton_schulz5(G: Tensor, steps: int) -> Tensor:
    """Quintic Newton-Schulz iteration on the last two dims of G, in bf16.

    Each step maps every singular value s of X to a*s + b*s^3 + c*s^5. The coefficients
    (3.4445, -4.7750, 2.0315) maximise the slope at s = 0, so tiny singular values grow fast,
    at the price of not converging to exactly 1: after 5 steps the singular values land
    roughly in [0.7, 1.2], which trains as well as the exact polar factor U V^T and costs
    a handful of matmuls. Dividing by the Frobenius norm first puts every singular value
    in (0, 1], where the iteration is well behaved.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16().reshape(-1, *G.shape[-2:])  # one batch dim for baddbmm
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix X X^T is then the small one
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b*A + c*A@A in one matmul with fused epilogue
        X = torch.baddbmm(X, B, X, beta=a)  # a*X + B@X
    if tall:
        X = X.mT
    return X.reshape(G.shape)


_compiled = {}  # compiled on first CUDA use: importing the compiler costs every process ~2 s


def zeropower_via_newtonschulz5(G: Tensor, steps: int = 5) -> Tensor:
    """Orthogonalise G (..., rows, cols) per matrix; compiled on CUDA, eager elsewhere."""
    if G.ndim < 2:
        raise ValueError(f"Newton-Schulz needs a matrix or a stack of matrices, got shape {tuple(G.shape)}")
    if G.is_cuda:
        if "ns" not in _compiled:
            _compiled["ns"] = torch.compile(_newton_schulz5, dynamic=False)
        return _compiled["ns"](G, steps)
    return _newton_schulz5(G, steps)


def muon_update(grads: Tensor, bufs: Tensor, momentum: float, nesterov: bool, ns_steps: int) -> Tensor:
    """Momentum, Nesterov and Newton-Schulz for a stack [n, rows, cols] of same-shape gradients.

    bufs (the momentum buffers, same shape) is updated in place; returns the bf16 update.
    Only Newton-Schulz is compiled: compiling the two lerps with it measured no faster on an
    H100, and keeping `momentum` out of compiled code means a momentum schedule never recompiles.
    """
    bufs.lerp_(grads, 1 - momentum)
    update = grads.lerp(bufs, momentum) if nesterov else bufs
    return zeropower_via_newtonschulz5(update, ns_steps)


def matrix_view(x: Tensor) -> Tensor:
    """The view Muon orthogonalises: 2-D and 3-D (stack) as they are, >=4-D conv-like as (shape[0], -1)."""
    return x if x.ndim <= 3 else x.view(x.size(0), -1)


def update_scale(shape, adjust_lr: str) -> float:
    """Per-matrix factor on the learning rate; `shape` is the matrix view's shape."""
    rows, cols = shape[-2], shape[-1]
    if adjust_lr == "original":
        return max(1.0, rows / cols) ** 0.5
    if adjust_lr == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"adjust_lr must be 'original' or 'match_rms_adamw', got {adjust_lr!r}")


def apply_update(params: list, update: Tensor, lr: float, weight_decay: float, scale: float) -> None:
    """Decoupled weight decay, then the scaled step: p <- p * (1 - lr*wd) - lr*scale*update, in place."""
    views = [matrix_view(p) for p in params]
    if weight_decay:
        torch._foreach_mul_(views, 1 - lr * weight_decay)
    # a bf16 update added to fp32 weights promotes inside the add kernel: no separate cast pass
    torch._foreach_add_(views, list(update.unbind(0)), alpha=-lr * scale)


def _check_params(param_groups):
    for group in param_groups:
        for p in group["params"]:
            if p.ndim < 2:
                raise ValueError(
                    f"Muon only updates matrices (>=2-D parameters); got a {p.ndim}-D parameter of shape "
                    f"{tuple(p.shape)}. Put biases, norm weights and other vectors/scalars in AdamW "
                    f"(model.split_params does this).")


def _same_shape_buckets(params):
    """Group parameters by (shape, dtype, device) so each bucket is one batched Newton-Schulz call."""
    buckets = {}
    for p in params:
        buckets.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
    return list(buckets.values())


def stacked_momentum(state, stacks: dict, params) -> Tensor:
    """The momentum buffers of a bucket as one stacked tensor, updated in place by the step.

    Each parameter's state["momentum_buffer"] is a view into the stack, so the step neither
    stacks nor unstacks them. A buffer that is not such a view (a fresh optimizer, or one just
    loaded from a state dict) is copied into a new stack on first use.
    """
    key = tuple(id(p) for p in params)
    stack = stacks.get(key)
    bufs = [state[p].get("momentum_buffer") for p in params]
    if stack is None or any(b is None or b.data_ptr() != stack[i].data_ptr() for i, b in enumerate(bufs)):
        stack = torch.stack([matrix_view(b) if b is not None else torch.zeros_like(matrix_view(p))
                             for p, b in zip(params, bufs)])
        for i, p in enumerate(params):
            state[p]["momentum_buffer"] = stack[i].view_as(p)
        stacks[key] = stack
    return stack


class Muon(torch.optim.Optimizer):
    """Single-device Muon. Same-shape parameters are stacked so Newton-Schulz runs once per shape."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0,
                 adjust_lr="original"):
        update_scale((1, 1), adjust_lr)  # validates the name early
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        weight_decay=weight_decay, adjust_lr=adjust_lr)
        super().__init__(params, defaults)
        _check_params(self.param_groups)
        self._stacks = {}  # see stacked_momentum

    @torch.no_grad()
    def step(self, closure=None, grad_scale: float | Tensor = 1.0):
        """One Muon step; grad_scale (a float or a 0-D tensor) multiplies the gradients first:
        the training scripts clip with it."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for bucket in _same_shape_buckets(params):
                grads = torch.stack([matrix_view(p.grad) for p in bucket])
                if isinstance(grad_scale, Tensor) or grad_scale != 1.0:
                    grads.mul_(grad_scale)
                bufs = stacked_momentum(self.state, self._stacks, bucket)
                update = muon_update(grads, bufs, group["momentum"], group["nesterov"], group["ns_steps"])
                apply_update(bucket, update, group["lr"], group["weight_decay"],
                             update_scale(grads.shape, group["adjust_lr"]))
        return loss


class DistMuon(torch.optim.Optimizer):
    """Muon spread over the ranks of the default process group (NCCL or gloo).

    Every rank holds all weights and computes its own local gradients (no DDP wrapper: this
    optimizer is what averages the Muon gradients). For each same-shape group of n matrices,
    padded with zeros to a multiple of the world size W, rank r owns the slice
    [r*n_pad/W, (r+1)*n_pad/W). One step is three phases:

      1. launch an async reduce-scatter (average) of every group's stacked gradients;
      2. per group: wait for its gradients, then the owner does momentum, Nesterov and
         Newton-Schulz on its slice and launches an async all-gather of the bf16 updates
         (this compute overlaps the other groups' collectives);
      3. per group: wait for its updates; every rank applies decay and the update to all its
         weights. Identical inputs and identical elementwise math keep the replicas identical,
         and gathering bf16 updates moves half the bytes of gathering fp32 weights.

    Momentum buffers exist only for owned parameters: ~1/W of Muon's state per rank.

    Gradient clipping: the norm to clip by is that of the *averaged* gradient, which for these
    parameters exists only as the owners' slices after phase 1. `reduce_grads()` runs phase 1
    early and `grad_sq_sum()` returns the global sum of squares of the averaged gradient (each
    rank sums its slice, then one scalar all-reduce); `step(grad_scale=...)` then scales the
    averaged slices. See clip_grads in common.py.

    state_dict() and load_state_dict() are collective: call them on every rank.
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0,
                 adjust_lr="original"):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DistMuon needs an initialised process group (run under torchrun and call "
                               "torch.distributed.init_process_group first); use Muon on a single process.")
        update_scale((1, 1), adjust_lr)
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        weight_decay=weight_decay, adjust_lr=adjust_lr)
        super().__init__(params, defaults)
        _check_params(self.param_groups)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self._stacks = {}  # see stacked_momentum
        self._pending = None  # phase-1 work in flight: [(work, averaged grad slice)]

    def _groups(self):
        """(param group, same-shape bucket, slice size, owned indices) in an order all ranks share."""
        out = []
        for group in self.param_groups:
            for bucket in _same_shape_buckets(group["params"]):
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
        total = torch.zeros((), device=self._pending[0][1].device if self._pending else "cpu")
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

        # 2. the owner turns its averaged slice into updates, then shares them
        gathers = []
        for (group, bucket, per_rank, owned), (work, grads) in zip(self._groups(), pending):
            work.wait()
            update = grads.new_zeros(grads.shape, dtype=torch.bfloat16)
            if len(owned):
                n = len(owned)
                if isinstance(grad_scale, Tensor) or grad_scale != 1.0:
                    grads.mul_(grad_scale)
                bufs = stacked_momentum(self.state, self._stacks, [bucket[i] for i in owned])
                update[:n] = muon_update(grads[:n], bufs, group["momentum"], group["nesterov"], group["ns_steps"])
            full = update.new_empty((per_rank * self.world_size, *update.shape[1:]))
            gathers.append((_all_gather(full, update, async_op=True), full, group, bucket))

        # 3. every rank applies every update to its replica of the weights
        for work, full, group, bucket in gathers:
            work.wait()
            apply_update(bucket, full[:len(bucket)], group["lr"], group["weight_decay"],
                         update_scale(full.shape, group["adjust_lr"]))
        return loss

    @torch.no_grad()
    def state_dict(self):
        """The full (gathered) state in Muon's format; collective, identical on every rank."""
        for group, bucket, per_rank, owned in self._groups():
            have = torch.tensor(float(all("momentum_buffer" in self.state[bucket[i]] for i in owned)))
            dist.all_reduce(have, op=dist.ReduceOp.MIN)  # a group is saved only once every owner has stepped
            if have.item() == 0:
                continue
            mine = self._padded_stack([self.state[bucket[i]]["momentum_buffer"] for i in owned] or [bucket[0]],
                                      per_rank)[:per_rank] * (1 if len(owned) else 0)
            full = mine.new_empty((per_rank * self.world_size, *mine.shape[1:]))
            _all_gather(full, mine.contiguous())
            for i, p in enumerate(bucket):
                self.state[p]["momentum_buffer"] = full[i].view_as(p).clone()
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
