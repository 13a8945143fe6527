"""Muon: MomentUm Orthogonalized by Newton-Schulz, for the 2-D weight matrices of a network.

`Muon` runs on one device; `DistMuon` runs the same math under torchrun with each rank owning a slice of
every same-shape group. Everything that is not a matrix (embeddings, the LM head, norms, biases) belongs
in AdamW: see `split_params` in model.py.

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

Shapes: a 2-D parameter is one matrix; a 3-D one a stack of matrices (MoE experts [E, rows, cols]), each
orthogonalised on its own; 4-D and up (conv-like) is flattened to (shape[0], -1).

State: per parameter {"momentum_buffer"} (torch.optim.Muon's format), plus {"second_moment"} with normuon.
A state dict moves freely between Muon, DistMuon and any world size.

Speed lives in muon_fast.py: same-shape parameters become one stack that they are views of, stepped by one
batched Newton-Schulz in one compiled graph; on CUDA Newton-Schulz takes a Triton path (the same polynomial).
"""
import math
import time

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

try:  # the speed (muon_fast.py) is a plug-in: without it the same math runs, with a copy per stack and step
    import muon_fast
except ImportError:
    muon_fast = None

# torch 2.13 renamed the flat collectives; 2.11 only has the old names.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

# Every iteration maps each singular value s of X to a*s + b*s^3 + c*s^5.
# Quintic (Keller Jordan): the steepest slope at s = 0 that still keeps s <= ~1.2, so tiny singular values
# grow fast; it does not converge to 1: after 5 iterations singular values in [1e-3, 1] end in about [0.68, 1.13].
QUINTIC = (3.4445, -4.7750, 2.0315)
# Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv 2505.16932): the minimax-optimal odd quintic for
# each iteration, fitted to a spectrum in [1e-3, 1]; the 5-iteration table with modded-nanogpt's 2% safety
# margin. After 5 iterations singular values in [1e-3, 1] end in about [0.84, 1.15] (both bands: tests).
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


def zeropower_via_newtonschulz5(G: Tensor, steps: int = 5, coefficients: str = "quintic") -> Tensor:
    """Orthogonalise each matrix of G (..., rows, cols): `steps` Newton-Schulz iterations in bf16 (float32 on
    a CPU, see ns_dtype).

    Dividing by the Frobenius norm puts every singular value in (0, 1], where the polynomials are fitted
    (Polar Express divides by 2% more: bf16 rounding can push the top one past 1). Each iteration
    X <- a X + (b A + c A^2) X with A = X X^T applies the polynomial to every singular value at once; a
    tall G is transposed first so that A is the small Gram matrix. Singular values ~1 train as well as
    the exact polar factor U V^T, for a handful of matmuls."""
    if G.ndim < 2:
        raise ValueError(f"Newton-Schulz needs a matrix or a stack of matrices, got shape {tuple(G.shape)}")
    coefficients = newton_schulz_coefficients(coefficients, steps)
    margin = 1.02 if coefficients[0] == POLAR_EXPRESS[0] else 1.0
    # normalised in G's own layout: compiled, the norm of a transposed view reads across rows and is slow
    X = G.to(ns_dtype(G.device))
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * margin + 1e-7)
    tall = G.size(-2) > G.size(-1)
    X = X.mT if tall else X
    if muon_fast is not None and muon_fast.enabled(X) and X.ndim == 3:  # the same iterations with half-cost symmetric products
        X = muon_fast.newton_schulz(X, coefficients)
    else:
        for a, b, c in coefficients:
            A = X @ X.mT
            X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


def ns_dtype(device) -> torch.dtype:
    """Newton-Schulz's precision: bf16 on a GPU (tensor cores; singular values ~1 need no more), float32 on a
    CPU, where bf16 matrix products are emulated on most chips and run several times slower than float32."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def momentum_update(G: Tensor, M: Tensor, momentum, nesterov: bool) -> Tensor:
    """M <- beta M + (1 - beta) G in place; returns the Nesterov look-ahead (1 - beta) G + beta M, or M."""
    M.lerp_(G, 1 - momentum)
    return G.lerp(M, momentum) if nesterov else M


def normuon(O: Tensor, V: Tensor, beta2) -> Tensor:
    """NorMuon: even out the size of O's rows (or columns) with an Adam-like second moment V.

    Orthogonalisation leaves the rows of a tall O (the columns of a wide one) of uneven size. Keep a running
    mean V of their squared entries (one number per row or column, in place) and divide by its square root;
    then restore O's Frobenius norm, so lr and adjust_lr mean what they mean without normuon (the paper
    fixes the RMS at 0.2 instead, as match_rms_adamw does)."""
    dim = -1 if O.size(-2) >= O.size(-1) else -2
    sq = O.float().square().mean(dim=dim, keepdim=True)  # the only pass over O before the update itself
    V.lerp_(sq, 1 - beta2)
    inv = V.clamp_min(1e-10).rsqrt()
    # ||O||^2 and ||O * inv||^2 are sums of the row (column) means sq, times the row length, which cancels
    # in their ratio: the two norms cost no pass over O
    ratio = sq.sum(dim=(-2, -1), keepdim=True) / (sq * inv.square()).sum(dim=(-2, -1), keepdim=True).clamp_min(1e-20)
    return (O.float() * (inv * ratio.sqrt())).to(O.dtype)


def weight_update(W: Tensor, O: Tensor, lr, weight_decay, scale: float, cautious_wd: bool) -> None:
    """Decoupled weight decay, then the scaled step, in place. cautious_wd decays only the weights this step
    already moves towards zero (O and W agree in sign)."""
    if cautious_wd:
        W.sub_(W * (O * W >= 0) * (lr * weight_decay))
    else:
        W.mul_(1 - lr * weight_decay)
    W.sub_(O * (lr * scale))  # a bf16 O promotes to W's dtype inside the kernel


def update_scale(shape, adjust_lr: str) -> float:
    """Per-matrix factor on the learning rate; `shape` is the matrix view's shape."""
    rows, cols = shape[-2], shape[-1]
    if adjust_lr == "original":
        return max(1.0, rows / cols) ** 0.5
    if adjust_lr == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"adjust_lr must be 'original' or 'match_rms_adamw', got {adjust_lr!r}")


# ------------------------------------------------------------------ one same-shape stack

def orthogonalised_update(G: Tensor, M: Tensor, V: Tensor | None, hp: dict, group: dict) -> Tensor:
    """Momentum, Nesterov, Newton-Schulz (and NorMuon) for a stack G [n, rows, cols] of gradients;
    M (momentum) and V (NorMuon's second moments, or None) are stacks updated in place. Returns O (ns_dtype)."""
    U = momentum_update(G * hp["grad_scale"], M, hp["momentum"], group["nesterov"])
    O = zeropower_via_newtonschulz5(U, group["ns_steps"], group["ns_coefficients"])
    return normuon(O, V, hp["beta2"]) if V is not None else O


def apply_update(W: Tensor, O: Tensor, hp: dict, group: dict, shape=None) -> None:
    """weight_update at the LR scale of matrices of this shape (default: W's; FSDP's row shards pass the whole
    matrix's)."""
    weight_update(W, O, hp["lr"], hp["weight_decay"], update_scale(shape or W.shape, group["adjust_lr"]),
                  group["cautious_wd"])


def muon_step(W: Tensor, G: Tensor, M: Tensor, V: Tensor | None, hp: dict, group: dict) -> None:
    """The whole Muon step of one same-shape stack: what Muon compiles as one graph on CUDA."""
    apply_update(W, orthogonalised_update(G, M, V, hp, group), hp, group)


# ------------------------------------------------------------------ plumbing

def stacked(tensors: list, shape, rebind) -> Tensor:
    """The tensors as one stack [n, *shape] (shape: each one's matrix view): a new stack each step, which each
    tensor is rebound to a view of (rebind(i, view)), so the step updates them all in place. muon_fast's
    version finds the stack of the step before and copies nothing."""
    stack = torch.stack([t.reshape(shape) for t in tensors])
    for i, t in enumerate(tensors):
        rebind(i, stack[i].view(t.shape))
    return stack


def hyperparameters(group: dict, grad_scale) -> dict:
    """The values a schedule may change, as the step reads them (muon_fast: as 0-D tensors, for compile)."""
    return {**{k: float(group[k]) for k in ("lr", "momentum", "weight_decay", "beta2")}, "grad_scale": grad_scale}


def compiled(fn, compile, on_cuda: bool):
    """fn itself (muon_fast: fn under torch.compile as Muon's `compile` option says)."""
    return fn


if muon_fast is not None:
    stacked, hyperparameters, compiled = muon_fast.stacked, muon_fast.hyperparameters, muon_fast.compiled


def matrix_view(x: Tensor) -> Tensor:
    """The view Muon orthogonalises: 2-D and 3-D (stack) as they are, >=4-D conv-like as (shape[0], -1)."""
    return x if x.ndim <= 3 else x.view(x.size(0), -1)


def matrix_shape(shape) -> tuple:
    """matrix_view's shape for a tensor of this shape."""
    return tuple(shape) if len(shape) <= 3 else (shape[0], math.prod(shape[1:]))


def second_moment_shape(p: Tensor) -> tuple:
    """NorMuon's factored second moment: the matrix view's shape with the averaged dim set to 1."""
    *batch, rows, cols = matrix_shape(p.shape)
    return (*batch, rows, 1) if rows >= cols else (*batch, 1, cols)


def state_stacks(state: dict, params: list, group: dict):
    """(momentum stack, NorMuon second-moment stack or None) of a group, created as zeros on first use."""
    for p in params:
        s = state[p]
        # .to: a parameter moved to another dtype since takes its buffer along
        # a full-size plain tensor even for a sharded (DTensor) parameter: FSDPMuon's owners hold whole matrices
        s["momentum_buffer"] = (s["momentum_buffer"].to(p.dtype) if "momentum_buffer" in s
                                else torch.zeros(p.shape, dtype=p.dtype, device=p.device))
        if group["normuon"] and "second_moment" not in s:
            s["second_moment"] = torch.zeros(second_moment_shape(p), dtype=torch.float32, device=p.device)

    def stack(key):
        tensors = [state[p][key] for p in params]
        return stacked(tensors, matrix_view(tensors[0]).shape,
                                 lambda i, t: state[params[i]].__setitem__(key, t))
    return stack("momentum_buffer"), stack("second_moment") if group["normuon"] else None


def weight_stack(params: list) -> Tensor:
    return stacked([p.data for p in params], matrix_view(params[0]).shape,
                             lambda i, t: setattr(params[i], "data", t))


def grad_sq_sum(params) -> Tensor:
    """Sum of squared gradient entries, accumulated in float32, as a 0-D tensor: one multi-tensor norm
    (a square and a sum per tensor would be hundreds of small kernels per step). FSDP's sharded gradients
    are summed over their shards on every rank."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())  # a 0-D CPU tensor adds to one on any device
    sharded = isinstance(grads[0], DTensor)
    sq = torch.stack([n.float() for n in torch._foreach_norm([local(g) for g in grads])]).square().sum()
    if sharded:
        dist.all_reduce(sq)
    return sq


def local(t: Tensor) -> Tensor:
    """This rank's part of a DTensor (a view: writing to it writes the parameter); any other tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def same_shape_groups(params) -> list:
    """Parameters grouped by (shape, dtype, device): each group is one batched Newton-Schulz."""
    groups = {}
    for p in params:
        groups.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
    return list(groups.values())


class Muon(torch.optim.Optimizer):
    """Single-device Muon. Same-shape parameters are stacked so Newton-Schulz runs once per shape.

    ns_coefficients: "quintic" or "polar_express"; normuon: NorMuon's row/column normalisation with
    second-moment decay beta2; cautious_wd: weight decay only where update and weight agree in sign;
    compile: torch.compile each stack's step (True, False, or a torch.compile backend; default: on CUDA).
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0,
                 adjust_lr="original", ns_coefficients="quintic", normuon=False, beta2=0.95, cautious_wd=False,
                 compile=None):
        update_scale((1, 1), adjust_lr)  # unknown names fail here, not at the first step
        newton_schulz_coefficients(ns_coefficients, ns_steps)
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      weight_decay=weight_decay, adjust_lr=adjust_lr, ns_coefficients=ns_coefficients,
                                      normuon=normuon, beta2=beta2, cautious_wd=cautious_wd))
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(f"Muon only updates matrices (>=2-D parameters); got a {p.ndim}-D parameter "
                                     f"of shape {tuple(p.shape)}. Put biases, norm weights and other "
                                     f"vectors/scalars in AdamW (model.split_params does this).")
        self.compile = compile

    def reduce_grads(self):
        """Nothing to average on one process (DistMuon launches its reduce-scatters here)."""

    @torch.no_grad()
    def grad_sq_sum(self) -> Tensor:
        """Sum of squares of the Muon gradients (DistMuon: of their average over ranks), for the global clip."""
        return grad_sq_sum(p for group in self.param_groups for p in group["params"])

    @torch.no_grad()
    def step(self, closure=None, grad_scale: float | Tensor = 1.0):
        """One Muon step; grad_scale (a float or a 0-D tensor) multiplies the gradients first: the training
        scripts clip with it."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            hp = hyperparameters(group, grad_scale)
            for params in same_shape_groups([p for p in group["params"] if p.grad is not None]):
                G = torch.stack([matrix_view(p.grad) for p in params])
                M, V = state_stacks(self.state, params, group)
                step = compiled(muon_step, self.compile, params[0].is_cuda)
                step(weight_stack(params), G, M, V, hp, group)
        return loss


class DistMuon(Muon):
    """Muon spread over the ranks of the default process group (NCCL or gloo); same options as Muon.

    Every rank holds all weights and its local gradients (no DDP wrapper: this optimizer averages the Muon
    gradients). Each same-shape group, zero padded to a multiple of the world size W, is cut into W slices;
    rank r owns slice r. A step:

      1. reduce_grads: an async reduce-scatter (average) of every group's stacked gradients;
      2. per group: the owner turns its slice into updates (orthogonalised_update) and launches an
         async all-gather, so one group's compute overlaps the other groups' collectives;
      3. per group: every rank applies all updates to its replica (identical math keeps replicas identical).

    State exists only for owned parameters (~1/W of Muon's). state_dict() gathers it into Muon's format and
    load_state_dict() keeps this rank's share: both are collective, call them on every rank.
    """

    def __init__(self, params, **options):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DistMuon needs an initialised process group (run under torchrun and call "
                               "torch.distributed.init_process_group first); use Muon on a single process.")
        super().__init__(params, **options)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self._pending = None  # phase 1 in flight: [(work, averaged gradient slice)]

    def _groups(self):
        """(param group, same-shape params, slice size, owned params) in an order all ranks share."""
        for group in self.param_groups:
            for params in same_shape_groups(group["params"]):
                per_rank = math.ceil(len(params) / self.world_size)
                yield group, params, per_rank, params[self.rank * per_rank:(self.rank + 1) * per_rank]

    @torch.no_grad()
    def reduce_grads(self):
        """Phase 1: launch the reduce-scatters; each rank will receive the average of its slice."""
        if self._pending is not None:
            return
        self._pending = []
        for _, params, per_rank, _ in self._groups():
            if any(p.grad is None for p in params):
                raise RuntimeError(f"DistMuon: a parameter of shape {tuple(params[0].shape)} has no gradient; "
                                   "every rank needs a gradient for every Muon parameter at each step.")
            full = params[0].grad.new_zeros((per_rank * self.world_size, *matrix_view(params[0]).shape))
            torch._foreach_copy_(list(full[:len(params)].unbind(0)), [matrix_view(p.grad) for p in params])
            mine = full.new_empty((per_rank, *full.shape[1:]))
            self._pending.append((_reduce_scatter(mine, full, op=dist.ReduceOp.AVG, async_op=True), mine))

    def zero_grad(self, set_to_none: bool = True):
        """Also drops a launched but unused phase 1 (a step skipped for an inf/nan gradient)."""
        for work, _ in self._pending or []:
            work.wait()
        self._pending = None
        super().zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def grad_sq_sum(self) -> Tensor:
        """Sum of squares of the averaged Muon gradients (collective), for clipping. They exist only as the
        owners' slices, so this runs phase 1 and waits: with clipping on, only the all-gathers overlap compute."""
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
        self.reduce_grads()  # 1. (already launched if the caller clipped)
        pending, self._pending = self._pending, None
        gathers = []
        for (group, params, per_rank, owned), (work, grads) in zip(self._groups(), pending):
            work.wait()  # 2. the owner turns its averaged slice into updates, then shares them
            update = grads.new_zeros(grads.shape, dtype=ns_dtype(grads.device))
            hp = hyperparameters(group, grad_scale)
            if owned:
                M, V = state_stacks(self.state, owned, group)
                run = compiled(orthogonalised_update, self.compile, grads.is_cuda)
                update[:len(owned)] = run(grads[:len(owned)], M, V, hp, group)
            full = update.new_empty((per_rank * self.world_size, *update.shape[1:]))
            gathers.append((_all_gather(full, update, async_op=True), full, hp, group, params))
        for work, full, hp, group, params in gathers:
            work.wait()  # 3. every rank applies every update to its replica of the weights
            run = compiled(apply_update, self.compile, full.is_cuda)
            run(weight_stack(params), full[:len(params)], hp, group)
        return loss

    @torch.no_grad()
    def state_dict(self):
        """The full (gathered) state in Muon's format; collective, identical on every rank."""
        for group, params, per_rank, owned in self._groups():
            p = params[0]
            layout = {"momentum_buffer": (p.shape, p.dtype)}  # each parameter's state: shape, dtype
            if group["normuon"]:
                layout["second_moment"] = (second_moment_shape(p), torch.float32)
            stacks = state_stacks(self.state, owned, group) if owned else (None, None)
            for (key, (shape, dtype)), stack in zip(layout.items(), stacks):
                part = torch.zeros((per_rank, math.prod(shape)), dtype=dtype, device=p.device)  # rows flattened
                if owned:
                    part[:len(owned)] = stack.flatten(1)
                full = part.new_empty((per_rank * self.world_size, part.size(1)))
                _all_gather(full, part)
                for i, q in enumerate(params):
                    self.state[q][key] = full[i].view(shape).clone()
        sd = super().state_dict()
        self._drop_unowned_state()
        return sd

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._drop_unowned_state()

    def _drop_unowned_state(self):
        for _, params, _, owned in self._groups():
            for p in set(params) - set(owned):
                self.state.pop(p, None)


class FSDPMuon(DistMuon):
    """Muon for a model sharded by FSDP2 (torch's fully_shard): every parameter is a DTensor of which rank r
    holds row chunk r (Shard(0)), and FSDP has averaged the gradients into the same shards during the
    backward. Newton-Schulz still sees whole matrices: each same-shape group is dealt out as in DistMuon (rank
    r owns slice r) and a step moves row chunks to and from the owners:

      1. per group: an async all-to-all sends every rank's chunks of each matrix to the matrix's owner;
      2. per group: the owner stacks the chunks into whole gradients, turns them into updates
         (orthogonalised_update: the same math as Muon) and launches a second all-to-all that sends each
         update's chunks back to the ranks that hold those rows;
      3. per group: every rank applies its chunks of the updates to its shards (decay and step, scaled by
         the whole matrix's shape).

    Chunks are zero padded to ceil(rows / W) rows, so every message has one size. State is DistMuon's:
    whole momentum buffers of the owned matrices, gathered into Muon's format by state_dict()."""

    # FSDP averaged the gradients into their shards in the backward: nothing to launch, and the global
    # norm is Muon's own sum of squares (grad_sq_sum adds the shards over ranks)
    reduce_grads, grad_sq_sum = Muon.reduce_grads, Muon.grad_sq_sum

    @torch.no_grad()
    def step(self, closure=None, grad_scale: float | Tensor = 1.0):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        W = self.world_size
        gathers = []
        for group, params, per_rank, owned in self._groups():  # 1. chunks to their owners
            rows = params[0].shape[0]
            chunk = math.ceil(rows / W)
            grads = [local(p.grad) for p in params]  # this rank's rows: as many for each matrix of the group
            send = grads[0].new_zeros((W * per_rank, chunk, *params[0].shape[1:]))
            torch._foreach_copy_(list(send[:len(params), :grads[0].size(0)].unbind(0)), grads)
            recv = torch.empty_like(send)
            gathers.append((dist.all_to_all_single(recv, send, async_op=True), recv, group, params, per_rank, owned))
        scatters = []
        for work, recv, group, params, per_rank, owned in gathers:  # 2. the owners' updates, chunks sent back
            work.wait()
            shape, chunk = params[0].shape, recv.size(1)
            hp = hyperparameters(group, grad_scale)
            # recv[k * per_rank + j]: rank k's chunk of my j-th matrix; whole matrix j: its chunks in rank order
            whole = recv.view(W, per_rank, *recv.shape[1:]).transpose(0, 1).reshape(per_rank, W * chunk, *shape[1:])
            update = whole.new_zeros(whole.shape, dtype=ns_dtype(whole.device))
            if owned:
                M, V = state_stacks(self.state, owned, group)
                run = compiled(orthogonalised_update, self.compile, whole.is_cuda)
                G = whole[:len(owned), :shape[0]]
                update[:len(owned), :shape[0]] = run(G.reshape(len(owned), *matrix_shape(shape)), M, V,
                                                      hp, group).view(G.shape)
            send = update.view(per_rank, W, chunk, *shape[1:]).transpose(0, 1).contiguous()
            back = torch.empty_like(send)
            scatters.append((dist.all_to_all_single(back, send, async_op=True), back, hp, group, params))
        for work, back, hp, group, params in scatters:  # 3. every rank updates its shards
            work.wait()
            shards = [local(p) for p in params]  # (p.data would cost a DTensor dispatch per matrix)
            # back[o * per_rank + j] is the chunk of owner o's j-th matrix, i.e. of matrix o * per_rank + j
            updates = back.view(-1, *back.shape[2:])[:len(params), :shards[0].size(0)]
            W_local = torch.stack(shards)
            run = compiled(apply_update, self.compile, W_local.is_cuda)
            run(W_local, updates, hp, group, matrix_shape(params[0].shape))
            torch._foreach_copy_(shards, list(W_local.unbind(0)))
        return loss

# ------------------------------------------------------------------ one training step of both optimizers

def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def step_optimizers(muon_opt, adamw_opt, max_norm: float, scaler) -> tuple[Tensor, bool]:
    """Everything between the backward and the next forward, in the order it runs on every rank (there is
    no DDP wrapper, and nothing is averaged twice):

      1. unscale  fp16's GradScaler takes the loss scale back out (a disabled scaler does nothing);
      2. sync     AdamW's gradients are all-reduced (averaged); DistMuon launches the reduce-scatters that
                  give each owner the average of its slice of every same-shape group;
      3. clip     one norm over every averaged gradient: AdamW's in full, Muon's from the owners' slices
                  (so with clipping on, the reduce-scatters finish here); AdamW's gradients are scaled
                  now, Muon's inside its step (grad_scale);
      4. step     Muon (the owners orthogonalise, the updates are all-gathered) and AdamW; fp16 skips a
                  step whose gradient overflowed, on every rank alike since the norm is global;
      5. zero     both optimizers' gradients.

    muon_opt may be None (--optimizer adamw). Returns the norm before clipping, a 0-D tensor the host does
    not wait for (except under fp16), and whether the step ran."""
    adamw_params = [p for group in adamw_opt.param_groups for p in group["params"] if p.grad is not None]
    scaler.unscale_(adamw_opt)
    if muon_opt is not None:
        scaler.unscale_(muon_opt)
    # (FSDP's gradients, DTensors, were averaged into their shards during the backward)
    pending = [dist.all_reduce(p.grad, op=dist.ReduceOp.AVG, async_op=True)
               for p in adamw_params if not isinstance(p.grad, DTensor)] if is_distributed() else []
    if muon_opt is not None:
        muon_opt.reduce_grads()
    for work in pending:
        work.wait()
    sq = grad_sq_sum(adamw_params)
    norm = (sq + muon_opt.grad_sq_sum() if muon_opt is not None else sq).sqrt()
    scale = torch.ones_like(norm)
    if max_norm > 0:
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        scale = torch.where(torch.isfinite(scale), scale, torch.ones_like(scale))
        if adamw_params:
            torch._foreach_mul_([local(p.grad) for p in adamw_params], scale)
    stepped = not scaler.is_enabled() or math.isfinite(norm.item())
    if stepped:
        if muon_opt is not None:
            start = _mark(norm.device)
            muon_opt.step(grad_scale=scale)
            muon_opt.last_step_span = (start, _mark(norm.device))
        adamw_opt.step()
    scaler.update()
    for opt in (muon_opt, adamw_opt):
        if opt is not None:
            opt.zero_grad(set_to_none=True)
    return norm, stepped


def _mark(device):
    """A point in the device's queue (a recorded CUDA event; the wall clock on a CPU): timing a span this
    way costs the host no wait."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def last_step_ms(muon_opt) -> float | None:
    """Milliseconds of the last Muon step that step_optimizers ran since the previous call, else None. On a
    GPU this waits for that step to finish: call it where the host waits anyway (a logged step)."""
    start, end = getattr(muon_opt, "last_step_span", None) or (None, None)
    if start is None:
        return None
    muon_opt.last_step_span = None
    if isinstance(start, float):
        return (end - start) * 1e3
    end.synchronize()
    return start.elapsed_time(end)
