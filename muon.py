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
    X = G.bfloat16()
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix X X^T is then the small one
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if tall:
        X = X.mT
    return X


_newton_schulz5_compiled = torch.compile(_newton_schulz5, dynamic=False) if hasattr(torch, "compile") else None


def zeropower_via_newtonschulz5(G: Tensor, steps: int = 5) -> Tensor:
    """Orthogonalise G (..., rows, cols) per matrix; compiled on CUDA, eager elsewhere."""
    if G.ndim < 2:
        raise ValueError(f"Newton-Schulz needs a matrix or a stack of matrices, got shape {tuple(G.shape)}")
    if G.is_cuda and _newton_schulz5_compiled is not None:
        return _newton_schulz5_compiled(G, steps)
    return _newton_schulz5(G, steps)


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


def muon_update(grads: Tensor, bufs: Tensor, momentum: float, nesterov: bool, ns_steps: int) -> Tensor:
    """Momentum, Nesterov and orthogonalisation for a stack of same-shape gradients.

    grads, bufs: [n, *matrix_shape]; bufs is updated in place. Returns the orthogonalised
    update in bf16, same shape.
    """
    bufs.lerp_(grads, 1 - momentum)
    update = grads.lerp(bufs, momentum) if nesterov else bufs
    return zeropower_via_newtonschulz5(update, ns_steps)


def apply_update(weights: Tensor, update: Tensor, lr: float, weight_decay: float, scale: float) -> None:
    """Decoupled weight decay, then the scaled step, on a stack of weights (in place)."""
    weights.mul_(1 - lr * weight_decay)
    weights.add_(update.to(weights.dtype), alpha=-lr * scale)


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


class Muon(torch.optim.Optimizer):
    """Single-device Muon. Same-shape parameters are stacked so Newton-Schulz runs once per shape."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0,
                 adjust_lr="original"):
        update_scale((1, 1), adjust_lr)  # validates the name early
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        weight_decay=weight_decay, adjust_lr=adjust_lr)
        super().__init__(params, defaults)
        _check_params(self.param_groups)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for bucket in _same_shape_buckets(params):
                for p in bucket:
                    if "momentum_buffer" not in self.state[p]:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                grads = torch.stack([matrix_view(p.grad) for p in bucket])
                bufs = torch.stack([matrix_view(self.state[p]["momentum_buffer"]) for p in bucket])
                update = muon_update(grads, bufs, group["momentum"], group["nesterov"], group["ns_steps"])
                weights = torch.stack([matrix_view(p) for p in bucket])
                apply_update(weights, update, group["lr"], group["weight_decay"],
                             update_scale(weights.shape, group["adjust_lr"]))
                # stack() copied; write the new buffers and weights back in one fused call each
                torch._foreach_copy_([matrix_view(self.state[p]["momentum_buffer"]) for p in bucket],
                                     list(bufs.unbind(0)))
                torch._foreach_copy_([matrix_view(p) for p in bucket], list(weights.unbind(0)))
        return loss


class DistMuon(torch.optim.Optimizer):
    """Muon spread over the ranks of the default process group (NCCL or gloo).

    Every rank holds all weights and computes its own local gradients (no DDP wrapper: this
    optimizer is what averages the Muon gradients). For each same-shape group of n matrices,
    padded with zeros to a multiple of the world size W, rank r owns the slice
    [r*n_pad/W, (r+1)*n_pad/W). One step is three phases:

      1. launch an async reduce-scatter (average) of every group's stacked gradients;
      2. per group: wait for its gradients, then the owner does momentum, Nesterov,
         Newton-Schulz, decay and the update on its slice, and launches an async all-gather
         of the updated weights (this compute overlaps the other groups' collectives);
      3. wait for the all-gathers and copy the weights back into the parameters.

    Momentum buffers exist only for owned parameters: ~1/W of Muon's state per rank.
    Gradient clipping: the gradient Muon should clip is the *averaged* one, which exists only
    after phase 1. The training scripts therefore clip with a norm computed from the locally
    accumulated gradients all-reduced across ranks before calling step (see clip in common.py).

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

    def _groups(self):
        """(param group, same-shape bucket, owned slice) in a fixed order every rank agrees on."""
        out = []
        for group in self.param_groups:
            for bucket in _same_shape_buckets(group["params"]):
                per_rank = math.ceil(len(bucket) / self.world_size)
                start = self.rank * per_rank
                out.append((group, bucket, per_rank, range(start, min(start + per_rank, len(bucket)))))
        return out

    def _stack_padded(self, tensors, per_rank):
        """[n, ...] -> [per_rank * W, ...] with zero padding, in the matrix view."""
        mats = [matrix_view(t) for t in tensors]
        full = mats[0].new_zeros((per_rank * self.world_size, *mats[0].shape))
        torch._foreach_copy_(list(full[:len(mats)].unbind(0)), mats)
        return full

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self._groups()
        for _, bucket, _, _ in groups:
            for p in bucket:
                if p.grad is None:
                    raise RuntimeError(f"DistMuon: a parameter of shape {tuple(p.shape)} has no gradient; every "
                                       "rank must have a gradient for every Muon parameter at each step.")

        # 1. average the gradients, each rank receiving only the slice it owns
        pending = []
        for group, bucket, per_rank, owned in groups:
            full = self._stack_padded([p.grad for p in bucket], per_rank)
            mine = full.new_empty((per_rank, *full.shape[1:]))
            work = _reduce_scatter(mine, full, op=dist.ReduceOp.AVG, async_op=True)
            pending.append((work, mine))

        # 2. the owner updates its slice, then shares the new weights
        gathers = []
        for (group, bucket, per_rank, owned), (work, grads) in zip(groups, pending):
            work.wait()
            weights = torch.stack([matrix_view(p) for p in bucket[owned.start:owned.start + per_rank]]
                                  + [matrix_view(bucket[0]).new_zeros(matrix_view(bucket[0]).shape)]
                                  * (per_rank - len(owned)))
            if len(owned):
                n = len(owned)
                for i in owned:
                    if "momentum_buffer" not in self.state[bucket[i]]:
                        self.state[bucket[i]]["momentum_buffer"] = torch.zeros_like(bucket[i])
                bufs = torch.stack([matrix_view(self.state[bucket[i]]["momentum_buffer"]) for i in owned])
                update = muon_update(grads[:n], bufs, group["momentum"], group["nesterov"], group["ns_steps"])
                apply_update(weights[:n], update, group["lr"], group["weight_decay"],
                             update_scale(weights.shape, group["adjust_lr"]))
                torch._foreach_copy_([matrix_view(self.state[bucket[i]]["momentum_buffer"]) for i in owned],
                                     list(bufs.unbind(0)))
            full = weights.new_empty((per_rank * self.world_size, *weights.shape[1:]))
            gathers.append((_all_gather(full, weights, async_op=True), full, bucket))

        # 3. everyone takes the gathered weights
        for work, full, bucket in gathers:
            work.wait()
            torch._foreach_copy_([matrix_view(p) for p in bucket], list(full[:len(bucket)].unbind(0)))
        return loss

    @torch.no_grad()
    def state_dict(self):
        """The full (gathered) state in Muon's format; collective, identical on every rank."""
        for group, bucket, per_rank, owned in self._groups():
            have = torch.tensor(float(all("momentum_buffer" in self.state[bucket[i]] for i in owned)))
            dist.all_reduce(have, op=dist.ReduceOp.MIN)  # a group is saved only once every owner has stepped
            if have.item() == 0:
                continue
            mine = torch.stack([matrix_view(self.state[bucket[i]]["momentum_buffer"]) for i in owned]
                               + [matrix_view(bucket[0]).new_zeros(matrix_view(bucket[0]).shape)]
                               * (per_rank - len(owned)))
            full = mine.new_empty((per_rank * self.world_size, *mine.shape[1:]))
            _all_gather(full, mine)
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
