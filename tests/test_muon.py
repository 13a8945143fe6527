"""Specification of muon.py: Newton-Schulz, Muon against the math and torch.optim.Muon, DistMuon on gloo."""
import math
import multiprocessing
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import FORKSERVER_PRELOAD
import muon
import muon_fast
from muon import POLAR_EXPRESS, DistMuon, FSDPMuon, Muon, zeropower_via_newtonschulz5

# A mixed set whose same-shape groups (5, 3, 1, 2, 1) do not divide world sizes 2, 3 or 4:
# wide and tall matrices, a square one, a 3-D stack of matrices and a 4-D conv-like weight.
SHAPES = [(16, 32)] * 5 + [(32, 16)] * 3 + [(24, 24)] + [(2, 8, 12)] * 2 + [(4, 3, 2, 2)]
STEPS = 4
# the Muon matrices of a small GPT: 4 layers of q, k, v, o (GQA: k, v narrower), gate, up, down
GPT_SHAPES = [(64, 64), (32, 64), (32, 64), (64, 64), (192, 64), (192, 64), (64, 192)] * 4


def make_params(seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in shapes]


def global_grads(step):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=g) for s in SHAPES]


def local_grads(step, rank, world_size):
    """Per-rank gradients whose average over ranks is global_grads(step)."""
    g = torch.Generator().manual_seed(5000 + step)
    out = []
    for grad in global_grads(step):
        noise = torch.randn(grad.shape, generator=g)
        out.append(grad + (rank - (world_size - 1) / 2) * noise)
    return out


def param_groups(params):
    # two groups with their own hyperparameters, as a schedule would set them
    return [dict(params=params[:7], lr=0.05, weight_decay=0.1),
            dict(params=params[7:], lr=0.02, weight_decay=0.0, momentum=0.9)]


# the options from recent work, each alone and all together
OPTIONS = {"plain": {}, "polar_express": dict(ns_coefficients="polar_express"), "normuon": dict(normuon=True),
           "cautious_wd": dict(cautious_wd=True)}
OPTIONS["all"] = dict(ns_coefficients="polar_express", normuon=True, cautious_wd=True)
OPTIONS["compiled"] = dict(OPTIONS["all"], compile="aot_eager")  # the graphs Muon compiles on CUDA, traced on CPU


def run_muon(steps, start=0, params=None, state=None, options=None):
    params = params or make_params()
    opt = Muon(param_groups(params), **(options or {}))
    if state is not None:
        opt.load_state_dict(state)
    for step in range(start, start + steps):
        for p, g in zip(params, global_grads(step)):
            p.grad = g
        opt.step()
    return params, opt


def step_on(opt, params, steps):
    """More steps of a running optimizer on the global gradients (in each parameter's dtype)."""
    for step in steps:
        for p, g in zip(params, global_grads(step)):
            p.grad = g.to(p.dtype)
        opt.step()


def spectral_input(shape, lo, seed):
    """A matrix (stack) with singular values uniform in [lo, 1]: known spectrum, random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    *batch, m, n = shape
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(*batch, m, k, generator=g))[0]
    V = torch.linalg.qr(torch.randn(*batch, n, k, generator=g))[0]
    s = torch.rand(*batch, k, generator=g) * (1 - lo) + lo
    return U @ torch.diag_embed(s) @ V.mT


# ---------------------------------------------------------------- Newton-Schulz

@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32), (4, 48, 48)])
def test_newton_schulz_singular_values_lie_in_band_around_one(shape):
    # Quintic NS with (3.4445, -4.7750, 2.0315) is tuned for a steep slope at 0, not for convergence:
    # after 5 steps singular values oscillate in about [0.68, 1.15] (measured 0.67-1.15 on these
    # inputs). We assert [0.6, 1.25] for inputs whose singular values span a 10x range; a far
    # smaller singular value would need more steps to grow into the band.
    G = spectral_input(shape, lo=0.1, seed=1)
    S = torch.linalg.svdvals(zeropower_via_newtonschulz5(G, 5).float())
    assert S.min() > 0.6 and S.max() < 1.25, (S.min().item(), S.max().item())


@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32), (4, 48, 48)])
def test_polar_express_singular_values_lie_in_a_tighter_band(shape):
    # Polar Express's per-iteration polynomials map singular values in [1e-3, 1] into [0.84, 1.15]
    # in exact arithmetic (checked in float64 below); bf16 rounding widens that a little, so we
    # assert [0.8, 1.2], tighter than quintic's [0.6, 1.25] on the same inputs.
    G = spectral_input(shape, lo=0.1, seed=1)
    S = torch.linalg.svdvals(zeropower_via_newtonschulz5(G, 5, coefficients="polar_express").float())
    assert S.min() > 0.8 and S.max() < 1.2, (S.min().item(), S.max().item())
    s = torch.logspace(-3, 0, 1000, dtype=torch.float64) / 1.02  # the 2% margin of the normalisation
    for a, b, c in POLAR_EXPRESS:
        s = a * s + b * s ** 3 + c * s ** 5
    assert s.min() > 0.84 and s.max() < 1.15, (s.min().item(), s.max().item())


def test_polar_express_table_has_no_more_steps_than_it_was_computed_for():
    with pytest.raises(ValueError, match="polar_express"):
        Muon([torch.nn.Parameter(torch.zeros(8, 8))], ns_coefficients="polar_express", ns_steps=6)
    with pytest.raises(ValueError, match="ns_coefficients"):
        Muon([torch.nn.Parameter(torch.zeros(8, 8))], ns_coefficients="cubic")


def test_newton_schulz_orthogonalises_each_matrix_of_a_stack_separately():
    G = torch.randn(3, 16, 24)
    G[1] *= 1000.0  # one matrix far larger than the others must not shrink them
    stacked = zeropower_via_newtonschulz5(G, 5)
    for i in range(3):
        torch.testing.assert_close(stacked[i], zeropower_via_newtonschulz5(G[i], 5), atol=0, rtol=0)
    assert stacked.dtype == muon.ns_dtype(G.device)  # float32 on a CPU, bf16 on a GPU


@pytest.mark.parametrize("coefficients", ["quintic", "polar_express"])
def test_newton_schulz_does_not_depend_on_the_scale_of_its_input(coefficients):
    # Newton-Schulz divides by the Frobenius norm first: the output must not depend on the input's
    # scale, over norms from ~1e-5 to ~1e12 (fp32 gradients of any size a run survives).
    G = spectral_input((2, 48, 80), lo=0.1, seed=2)
    ref = zeropower_via_newtonschulz5(G, 5, coefficients).float()
    # bf16 rounds G and G * scale differently, and Polar Express's large first coefficients amplify
    # that to ~5% of the output; a wrong power of the norm would be off by orders of magnitude
    for scale in (1e-5, 1e-2, 1e3, 1e7, 1e12):
        O = zeropower_via_newtonschulz5(G * scale, 5, coefficients).float()
        assert (O - ref).norm() <= BF16_REL * ref.norm(), (scale, ((O - ref).norm() / ref.norm()).item())


def test_newton_schulz_rejects_vectors():
    with pytest.raises(ValueError, match="matrix"):
        zeropower_via_newtonschulz5(torch.randn(8), 5)


# ---------------------------------------------------------------- Muon against the math

def reference_ns(X):
    """Per-matrix quintic Newton-Schulz written straight from its definition, in float64."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = X.double()
    if X.shape[0] > X.shape[1]:
        return reference_ns(X.T).T
    X = X / X.norm()
    for _ in range(5):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X


def reference_muon_step(p, grad, buf, lr, momentum, wd, adjust_lr):
    """Returns (decayed weight, update direction lr*scale*O, new momentum buffer)."""
    buf = momentum * buf + (1 - momentum) * grad
    nesterov = (1 - momentum) * grad + momentum * buf
    rows, cols = p.shape
    scale = max(1, rows / cols) ** 0.5 if adjust_lr == "original" else 0.2 * math.sqrt(max(rows, cols))
    return p.double() * (1 - lr * wd), lr * scale * reference_ns(nesterov), buf


# Our Newton-Schulz runs in bf16, the reference in float64: they differ by ~3% of the update's norm
# (bf16 has 8 mantissa bits). A wrong sign, scale (>= 1.2x here) or decay shows up as >= 20%.
BF16_REL = 0.06


@pytest.mark.parametrize("adjust_lr", ["original", "match_rms_adamw"])
def test_muon_steps_equal_the_reference_math(adjust_lr):
    torch.manual_seed(0)
    shapes = [(16, 48), (48, 16), (32, 32), (32, 32)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    bufs = [torch.zeros(s) for s in shapes]
    lr, momentum, wd = 0.03, 0.9, 1.0
    opt = Muon(params, lr=lr, momentum=momentum, weight_decay=wd, adjust_lr=adjust_lr)
    for _ in range(3):
        grads = [torch.randn(s) for s in shapes]
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for i, g in enumerate(grads):
            decayed, update, bufs[i] = reference_muon_step(before[i], g, bufs[i], lr, momentum, wd, adjust_lr)
            err = (params[i].detach().double() - (decayed - update)).norm() / update.norm()
            assert err < BF16_REL, (i, err.item())
            torch.testing.assert_close(opt.state[params[i]]["momentum_buffer"], bufs[i], atol=1e-6, rtol=1e-5)


def test_muon_without_nesterov_uses_the_plain_momentum():
    p = torch.nn.Parameter(torch.zeros(8, 8))
    opt = Muon([p], lr=1.0, momentum=0.5, nesterov=False)
    g = torch.randn(8, 8)
    p.grad = g
    opt.step()
    expected = -reference_ns(0.5 * g)  # buffer = (1 - 0.5) * g, no look-ahead
    assert (p.detach().double() - expected).norm() / expected.norm() < BF16_REL


def reference_normuon(O, v, beta2):
    """NorMuon from its definition: per row of a tall (or square) O, per column of a wide one."""
    O = O.double()
    rows, cols = O.shape
    mean_sq = (O ** 2).mean(dim=1, keepdim=True) if rows >= cols else (O ** 2).mean(dim=0, keepdim=True)
    v = beta2 * v + (1 - beta2) * mean_sq
    N = O / v.sqrt()
    return N * O.norm() / N.norm(), v


def test_normuon_and_cautious_weight_decay_equal_the_reference_math():
    # Orthogonalisation is taken from our own bf16 Newton-Schulz (checked against the math above),
    # so this isolates the NorMuon normalisation, its state, and the cautious decay mask.
    torch.manual_seed(0)
    shapes = [(16, 48), (48, 16), (32, 32)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    bufs = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    vs = [torch.zeros((r, 1) if r >= c else (1, c), dtype=torch.float64) for r, c in shapes]
    lr, momentum, wd, beta2 = 0.03, 0.9, 1.0, 0.8
    opt = Muon(params, lr=lr, momentum=momentum, weight_decay=wd, normuon=True, beta2=beta2, cautious_wd=True)
    decayed_somewhere = kept_somewhere = False
    for _ in range(3):
        grads = [torch.randn(s) for s in shapes]
        before = [p.detach().double() for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for i, (g, W) in enumerate(zip(grads, before)):
            bufs[i] = momentum * bufs[i] + (1 - momentum) * g
            O = zeropower_via_newtonschulz5(((1 - momentum) * g + momentum * bufs[i]).float(), 5)
            N, vs[i] = reference_normuon(O, vs[i], beta2)
            mask = (N * W >= 0).double()  # decay only where the step already shrinks |W|
            decayed_somewhere |= bool(mask.any())
            kept_somewhere |= bool((mask == 0).any())
            scale = max(1, shapes[i][0] / shapes[i][1]) ** 0.5
            update = lr * scale * N
            expected = W - lr * wd * W * mask - update
            # bf16 Newton-Schulz output moves by up to ~2% of its largest entry when one input
            # element rounds the other way (fp32 vs float64 momentum here), which can flip the sign
            # of an entry near zero and with it the mask; compare where the sign is unambiguous
            sure = N.abs() > 0.05 * N.abs().max()
            err = ((params[i].detach().double() - expected) * sure).norm() / (update * sure).norm()
            assert err < 0.03, (i, err.item())
            # bf16 rounding of O moves single rows' mean squares by a few %; a wrong beta2 or axis by far more
            torch.testing.assert_close(opt.state[params[i]]["second_moment"].double(), vs[i], rtol=0.1, atol=0)
    assert decayed_somewhere and kept_somewhere


def test_cautious_weight_decay_differs_from_plain_decay():
    a, b = make_params(), make_params()
    opt_a, opt_b = Muon(param_groups(a), cautious_wd=True), Muon(param_groups(b))
    for p, q, g in zip(a, b, global_grads(0)):
        p.grad, q.grad = g, g.clone()
    opt_a.step()
    opt_b.step()
    assert (a[0] - b[0]).abs().max() > 1e-4  # group 0 decays (wd 0.1): only where signs agree
    torch.testing.assert_close(a[-1], b[-1], atol=0, rtol=0)  # group 1 has wd 0: nothing to mask


def test_compiled_step_never_recompiles_when_hyperparameters_change():
    # The compiled path, forced on CPU with a counting backend passed as Muon's compile= (aot_eager: traced and compiled by
    # dynamo/AOTAutograd, run without inductor codegen, so it is exact); on a CUDA machine the real
    # thing (inductor on the GPU). Dynamo compiles one graph per same-shape stack on the first step;
    # 50 steps of changing lr, momentum, weight decay and grad_scale must not add any: they enter
    # as 0-D tensors, not constants baked into the graph.
    from torch._dynamo.testing import CompileCounterWithBackend
    cuda = torch.cuda.is_available()
    counter = CompileCounterWithBackend("inductor" if cuda else "aot_eager")
    device = "cuda" if cuda else "cpu"
    start = [p.to(device) for p in make_params()]
    compiled, eager = [torch.nn.Parameter(p.clone()) for p in start], [torch.nn.Parameter(p.clone()) for p in start]
    opts = [Muon(param_groups(ps), compile=c, **OPTIONS["all"]) for ps, c in ((compiled, counter), (eager, False))]
    n_stacks = len({(tuple(p.shape), i < 7) for i, p in enumerate(compiled)})
    for step in range(50):
        for pc, pe, g in zip(compiled, eager, global_grads(step)):
            pc.grad, pe.grad = g.to(device), g.to(device)
        for opt in opts:
            for group in opt.param_groups:
                group["lr"] = 0.05 * (1 - step / 50)
                group["momentum"] = 0.85 + 0.1 * min(step / 20, 1)
                group["weight_decay"] = 0.1 * (step % 3)
            opt.step(grad_scale=torch.tensor(1.0 / (1 + step % 4), device=device))
        if step == 0:
            assert counter.frame_count == n_stacks
    assert counter.frame_count == n_stacks, "a hyperparameter change recompiled the step"
    for pc, pe, p0 in zip(compiled, eager, start):
        # exact on CPU; inductor's fused bf16 math rounds differently, by a few % of the path
        assert (pc - pe).norm() <= (0.1 if cuda else 1e-6) * (pe - p0).norm()


@pytest.mark.parametrize("adjust_lr", ["original", "match_rms_adamw"])
def test_muon_agrees_with_torch_optim_muon(adjust_lr):
    if not hasattr(torch.optim, "Muon"):
        pytest.fail("torch.optim.Muon is missing; this suite needs torch >= 2.9")
    torch.manual_seed(0)
    shapes = [(24, 40), (40, 24), (32, 32)]
    ours = [torch.nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kw = dict(lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.1)
    opt_ours = Muon(ours, adjust_lr=adjust_lr, **kw)
    opt_theirs = torch.optim.Muon(theirs, adjust_lr_fn=adjust_lr, **kw)
    for _ in range(5):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape)
            b.grad = a.grad.clone()
        opt_ours.step()
        opt_theirs.step()
    for a, b in zip(ours, theirs):
        # both run NS in bf16; ours normalises with +eps where torch clamps, so allow bf16 rounding
        torch.testing.assert_close(a.detach(), b.detach(), atol=2e-3, rtol=2e-2)
        assert (a - b).abs().max() < 0.05 * (a.detach() - 0).abs().max()


@pytest.mark.parametrize("options", ["plain", "all"])
def test_muon_state_dict_round_trip_continues_the_same_trajectory(options, tmp_path):
    full, _ = run_muon(STEPS + 2, options=OPTIONS[options])
    params, opt = run_muon(STEPS, options=OPTIONS[options])
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    state = torch.load(tmp_path / "opt.pt", weights_only=True)
    if options == "all":
        assert all("second_moment" in s for s in state["state"].values())
    resumed, _ = run_muon(2, start=STEPS, params=[torch.nn.Parameter(p.detach().clone()) for p in params],
                          state=state, options=OPTIONS[options])
    for a, b in zip(full, resumed):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_muon_keeps_each_groups_weights_in_one_stack_the_parameters_view():
    params = make_params()
    ids, shapes = [id(p) for p in params], [p.shape for p in params]
    _, opt = run_muon(1, params=params)
    assert [id(p) for p in params] == ids and [p.shape for p in params] == shapes
    group = params[:5]  # the five (16, 32) matrices of the first param group
    start = group[0].data_ptr()
    assert [p.data_ptr() for p in group] == [start + i * 16 * 32 * 4 for i in range(5)]
    bufs = [opt.state[p]["momentum_buffer"] for p in group]
    assert [b.data_ptr() for b in bufs] == [bufs[0].data_ptr() + i * 16 * 32 * 4 for i in range(5)]


def test_muon_updates_weights_whose_data_was_replaced():
    # load_state_dict(assign=True) or .to() give a parameter new storage: the next step must
    # update the parameter the model holds
    full, _ = run_muon(STEPS)
    params, opt = run_muon(2)
    for p in params[::2]:
        p.data = p.data.clone()
    step_on(opt, params, range(2, STEPS))
    for a, b in zip(full, params):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_muon_regroups_a_parameter_whose_dtype_changed():
    # a parameter moved to float64 must leave its float32 group, not be stacked with it (which
    # would silently promote its neighbours)
    full, _ = run_muon(STEPS)
    params, opt = run_muon(2)
    params[0].data = params[0].data.double()
    step_on(opt, params, range(2, STEPS))
    assert params[0].dtype == torch.float64 and all(p.dtype == torch.float32 for p in params[1:])
    for a, b in zip(full, params):
        torch.testing.assert_close(a, b.float(), atol=1e-5, rtol=0)


def test_muon_steps_from_state_loaded_into_the_same_optimizer():
    # a state dict loaded into the running optimizer, or a buffer set by hand, must be what the
    # next step reads
    full, _ = run_muon(STEPS, options=OPTIONS["all"])
    params, opt = run_muon(2, options=OPTIONS["all"])
    sd = opt.state_dict()  # its tensors are the live buffers: clone them
    saved_state = {"state": {i: {k: t.clone() for k, t in s.items()} for i, s in sd["state"].items()},
                   "param_groups": sd["param_groups"]}
    saved_params = [p.detach().clone() for p in params]
    for p in params:  # two steps that must leave no trace
        p.grad = torch.randn(p.shape)
    opt.step()
    opt.step()
    first = params[0]
    opt.state[first]["momentum_buffer"] = opt.state[first]["momentum_buffer"] * 0 + 7.0  # replaced by hand
    for p, saved in zip(params, saved_params):
        p.data.copy_(saved)
    opt.load_state_dict(saved_state)
    step_on(opt, params, range(2, STEPS))
    for a, b in zip(full, params):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_muon_reads_a_momentum_buffer_set_by_hand():
    params, opt = run_muon(1)
    twin, twin_opt = run_muon(1)
    buf = torch.randn(params[0].shape)
    opt.state[params[0]]["momentum_buffer"] = buf.clone()
    twin_opt.state[twin[0]]["momentum_buffer"].copy_(buf)  # in place: the reference
    for ps, o in ((params, opt), (twin, twin_opt)):
        for p, g in zip(ps, global_grads(1)):
            p.grad = g
        o.step()
    for a, b in zip(params, twin):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(opt.state[params[0]]["momentum_buffer"], twin_opt.state[twin[0]]["momentum_buffer"])


def test_muon_refuses_vectors_and_points_to_adamw():
    with pytest.raises(ValueError, match="AdamW"):
        Muon([torch.nn.Parameter(torch.zeros(8))])


def test_muon_rejects_unknown_adjust_lr():
    with pytest.raises(ValueError, match="adjust_lr"):
        Muon([torch.nn.Parameter(torch.zeros(8, 8))], adjust_lr="bogus")


def test_dist_muon_without_process_group_says_so():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="process group"):
        DistMuon([torch.nn.Parameter(torch.zeros(8, 8))])


# ---------------------------------------------------------------- DistMuon on gloo

def _dist_worker(rank, world_size, tmp, init_file, plan, options):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        _dist_body(rank, world_size, tmp, plan, options)
    finally:
        dist.barrier()  # no rank tears its connections down while a peer still talks to it
        dist.destroy_process_group()
    # Skip interpreter finalization: gloo's worker threads can still hold finished async work
    # (with tensors) then, and freeing it there aborts the process now and then
    # ("terminate called without an active exception"; pytorch/pytorch#179291). Reached only
    # when the body succeeded; an exception above still reaches mp.start_processes as a failure.
    os._exit(0)


def _dist_body(rank, world_size, tmp, plan, options=None):
    """plan: ("train", steps), ("fsdp", steps), ("adamw", steps), ("memory",), ("clip",) or
    ("resume", steps_before, state_file, steps_after); options: Muon's keyword options (OPTIONS)."""
    options = options or {}
    if plan[0] in ("fsdp", "adamw"):  # parameters and gradients sharded on dim 0 as FSDP2 holds them
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor
        mesh = init_device_mesh("cpu", (world_size,))
        params = [torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])) for p in make_params()]
        opt = (FSDPMuon(param_groups(params), **options) if plan[0] == "fsdp"  # else the scripts' AdamW under --fsdp
               else torch.optim.AdamW(params, lr=0.01, weight_decay=0.1, fused=True))
        for step in range(plan[1]):
            for p, g in zip(params, global_grads(step)):
                p.grad = distribute_tensor(g, mesh, [Shard(0)])
            opt.step()
        result = {"params": [p.detach().full_tensor() for p in params]}
        if plan[0] == "fsdp":
            result["state_numel"] = sum(s["momentum_buffer"].numel() for s in opt.state.values())
            result.update(opt=opt.state_dict(), sq=opt.grad_sq_sum())
        torch.save(result, os.path.join(tmp, f"rank{rank}.pt"))
        return
    if plan[0] == "memory":
        params = make_params(shapes=GPT_SHAPES)
        opt = DistMuon(params)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        state_numel = sum(s["momentum_buffer"].numel() for s in opt.state.values())
        torch.save({"state_numel": state_numel}, os.path.join(tmp, f"rank{rank}.pt"))
        return
    if plan[0] == "clip":
        params = make_params()
        opt = DistMuon(param_groups(params))
        for p, g in zip(params, local_grads(0, rank, world_size)):
            p.grad = g
        opt.reduce_grads()
        opt.zero_grad()  # a skipped step: the launched reduce-scatter is dropped, nothing applied
        assert opt._pending is None and all(p.grad is None for p in params)
        for p, g in zip(params, local_grads(0, rank, world_size)):
            p.grad = g
        sq = opt.grad_sq_sum()
        opt.step(grad_scale=0.5)
        torch.save({"params": [p.detach() for p in params], "sq": sq}, os.path.join(tmp, f"rank{rank}.pt"))
        return
    params = make_params()
    opt = DistMuon(param_groups(params), **options)
    start = 0
    if plan[0] == "resume":
        start = plan[1]
        saved = torch.load(plan[2], weights_only=True)
        with torch.no_grad():
            for p, w in zip(params, saved["params"]):
                p.copy_(w)
        opt.load_state_dict(saved["opt"])
    steps = plan[1] if plan[0] == "train" else plan[3]
    for step in range(start, start + steps):
        for p, g in zip(params, local_grads(step, rank, world_size)):
            p.grad = g
        opt.step()
    state_numel = sum(s["momentum_buffer"].numel() for s in opt.state.values())
    sd = opt.state_dict()  # collective: every rank gathers
    torch.save({"params": [p.detach() for p in params], "opt": sd, "state_numel": state_numel},
               os.path.join(tmp, f"rank{rank}.pt"))


# Ranks start from conftest's preloaded fork server, which imports this module too
multiprocessing.set_forkserver_preload(FORKSERVER_PRELOAD + [__name__])


def run_dist(world_size, tmp_path, plan, options=None):
    tmp = str(tmp_path / f"w{world_size}_{plan[0]}")
    os.makedirs(tmp)
    files = [os.path.join(tmp, f"rank{r}.pt") for r in range(world_size)]
    try:
        mp.start_processes(_dist_worker, args=(world_size, tmp, os.path.join(tmp, "init"), plan, options),
                           nprocs=world_size, start_method="forkserver")
    except mp.ProcessExitedException as e:
        # Every rank wrote its result, then one aborted tearing gloo down (see _dist_worker): the
        # work under test finished, and the assertions below check its results. Anything else fails.
        if e.signal_name != "SIGABRT" or not all(os.path.exists(f) for f in files):
            raise
    return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(world_size)]


# Averaging the per-rank gradients rounds differently from using the average directly, and bf16
# Newton-Schulz amplifies that into differences of a few 1e-4 in the weights over a few steps.
TOL = dict(atol=1e-3, rtol=1e-2)


@pytest.mark.parametrize("world_size,options", [(w, o) for w in (1, 2, 3, 4) for o in ("plain", "all")]
                         + [(3, o) for o in ("polar_express", "normuon", "cautious_wd")])
def test_dist_muon_matches_muon_at_every_world_size(world_size, options, tmp_path):
    expected, muon_opt = run_muon(STEPS, options=OPTIONS[options])
    results = run_dist(world_size, tmp_path, ("train", STEPS), OPTIONS[options])
    for r in results:
        for got, want in zip(r["params"], expected):
            torch.testing.assert_close(got, want.detach(), **TOL)
    # every rank returns the same gathered state, in Muon's own format
    ref_state = muon_opt.state_dict()["state"]
    for r in results:
        assert sorted(r["opt"]["state"]) == sorted(ref_state)
        for k in ref_state:
            assert sorted(r["opt"]["state"][k]) == sorted(ref_state[k])
            for name in ref_state[k]:
                torch.testing.assert_close(r["opt"]["state"][k][name], ref_state[k][name], **TOL)
    # momentum lives only with the owner: each rank holds ceil(n/W) of every same-shape group
    total = sum(math.prod(s) for s in SHAPES)
    assert sum(r["state_numel"] for r in results) == total
    bound = 0
    for group in param_groups(SHAPES):
        for s in set(group["params"]):
            bound += math.ceil(group["params"].count(s) / world_size) * math.prod(s)
    assert max(r["state_numel"] for r in results) <= bound


@pytest.mark.parametrize("world_size,options", [(2, "plain"), (3, "all"), (4, "all"), (2, "compiled")])
def test_fsdp_muon_on_sharded_parameters_matches_muon(world_size, options, tmp_path):
    """Row-sharded (DTensor) parameters and gradients, as FSDP2 leaves them: whole matrices meet on their
    owners and the updates go back as shards, so the weights and the gathered state are Muon's; uneven
    groups and dim-0 sizes (2 rows over 3 or 4 ranks) included."""
    expected, muon_opt = run_muon(STEPS, options=OPTIONS[options])
    results = run_dist(world_size, tmp_path, ("fsdp", STEPS), OPTIONS[options])
    ref_state = muon_opt.state_dict()["state"]
    want_sq = sum(g.square().sum() for g in global_grads(STEPS - 1))
    for r in results:
        for got, want in zip(r["params"], expected):
            torch.testing.assert_close(got, want.detach(), **TOL)
        assert sorted(r["opt"]["state"]) == sorted(ref_state)
        for k in ref_state:
            for name in ref_state[k]:
                torch.testing.assert_close(r["opt"]["state"][k][name], ref_state[k][name], **TOL)
        torch.testing.assert_close(r["sq"], want_sq, rtol=1e-5, atol=0)
    assert sum(r["state_numel"] for r in results) == sum(math.prod(s) for s in SHAPES)


def test_fused_adamw_on_row_shards_matches_adamw_on_whole_tensors(tmp_path):
    """--fsdp keeps the stage scripts' fused AdamW: PyTorch's fused kernel steps DTensor shards as it steps
    whole tensors (uneven dim-0 splits included)."""
    params = make_params()
    opt = torch.optim.AdamW(params, lr=0.01, weight_decay=0.1, foreach=False)
    for step in range(STEPS):
        for p, g in zip(params, global_grads(step)):
            p.grad = g
        opt.step()
    for r in run_dist(3, tmp_path, ("adamw", STEPS)):
        for got, want in zip(r["params"], params):
            torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=1e-5)


def test_dist_muon_momentum_memory_per_rank_is_a_world_size_share(tmp_path):
    world_size = 4
    results = run_dist(world_size, tmp_path, ("memory", 1))
    total = sum(math.prod(s) for s in GPT_SHAPES)
    for r in results:
        assert r["state_numel"] <= 1.3 * total / world_size, (r["state_numel"], total)


def test_dist_muon_clips_by_the_norm_of_the_averaged_gradient(tmp_path):
    # grad_sq_sum is the squared norm of the average over ranks (not of any rank's own gradient),
    # and step(grad_scale=s) equals Muon stepping on s times the averaged gradient.
    want_sq = sum(g.square().sum() for g in global_grads(0))
    params = make_params()
    opt = Muon(param_groups(params))
    for p, g in zip(params, global_grads(0)):
        p.grad = g
    opt.step(grad_scale=0.5)
    for r in run_dist(3, tmp_path, ("clip",)):
        torch.testing.assert_close(r["sq"], want_sq, rtol=1e-5, atol=0)
        for got, want in zip(r["params"], params):
            torch.testing.assert_close(got, want.detach(), **TOL)


def test_muon_grad_scale_equals_scaling_the_gradients():
    a, b = make_params(), make_params()
    opt_a, opt_b = Muon(param_groups(a)), Muon(param_groups(b))
    for step in range(2):
        for pa, pb, g in zip(a, b, global_grads(step)):
            pa.grad, pb.grad = g.clone(), 0.25 * g
        opt_a.step(grad_scale=0.25)
        opt_b.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, atol=0, rtol=0)


@pytest.mark.parametrize("options", ["plain", "all"])
def test_dist_muon_state_moves_between_world_sizes_and_into_muon(options, tmp_path):
    before, after = 3, 2
    uninterrupted, _ = run_muon(before + after, options=OPTIONS[options])
    saved = run_dist(2, tmp_path, ("train", before), OPTIONS[options])[0]
    state_file = str(tmp_path / "w2.pt")
    torch.save(saved, state_file)

    # world size 2 -> 3
    for r in run_dist(3, tmp_path, ("resume", before, state_file, after), OPTIONS[options]):
        for got, want in zip(r["params"], uninterrupted):
            torch.testing.assert_close(got, want.detach(), **TOL)

    # world size 2 -> single-process Muon
    params = [torch.nn.Parameter(w.clone()) for w in saved["params"]]
    resumed, _ = run_muon(after, start=before, params=params, state=saved["opt"], options=OPTIONS[options])
    for got, want in zip(resumed, uninterrupted):
        torch.testing.assert_close(got.detach(), want.detach(), **TOL)


def test_muon_state_loads_into_dist_muon(tmp_path):
    before, after = 3, 2
    uninterrupted, _ = run_muon(before + after)
    params, opt = run_muon(before)
    state_file = str(tmp_path / "muon.pt")
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, state_file)
    for r in run_dist(2, tmp_path, ("resume", before, state_file, after)):
        for got, want in zip(r["params"], uninterrupted):
            torch.testing.assert_close(got, want.detach(), **TOL)


FAST_PATH_CHECK = """
import torch, muon, muon_fast
assert muon_fast.triton is not None and muon_fast.triton.__version__, "triton is missing"
torch.manual_seed(0)
# fp32 inputs: Triton's CPU interpreter mishandles bf16 (bench/gram_kernel.py checks bf16 on a GPU)
cfg = dict(BLOCK_M=32, BLOCK_K=16, num_warps=4, num_stages=1)
for n, m, k in [(2, 64, 48), (3, 40, 70), (1, 33, 16)]:  # whole tiles, ragged tiles, one tile past the edge
    X = torch.randn(n, m, k)
    A = muon_fast.gram(X.mT.contiguous().mT, config=cfg)  # any strides
    assert torch.allclose(A, X @ X.mT, rtol=1e-4, atol=1e-4), (n, m, k, (A - X @ X.mT).abs().max())
    B = muon_fast.gram(A, 0.5, -2.0, A, 3.0, config=cfg)
    ref = 3.0 * torch.eye(m) - 2.0 * A + 0.5 * A @ A.mT
    assert torch.allclose(B, ref, rtol=1e-4, atol=1e-3), (n, m, k, (B - ref).abs().max())
    tile = torch.arange(m) // cfg["BLOCK_M"]
    mirrored = tile[:, None] != tile[None, :]  # written by the transposed store of the tile across the diagonal
    assert torch.equal(B[:, mirrored], B.mT[:, mirrored])
muon_fast.GRAM_CONFIG = cfg
for coefficients in (muon.QUINTIC,) * 5, muon.POLAR_EXPRESS:
    for shape in [(3, 40, 72), (2, 72, 40)]:  # wide, and tall (iterated as its transposed view)
        G = torch.randn(shape)
        X = G.mT if shape[1] > shape[2] else G
        X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02)
        fast = muon_fast.newton_schulz(X, coefficients)
        plain, ref = X, X.double()
        for a, b, c in coefficients:
            A = plain @ plain.mT
            plain = a * plain + (b * A + c * A @ A) @ plain
            R = ref @ ref.mT
            ref = a * ref + (b * R + c * R @ R) @ ref
        assert (fast - plain).norm() < 1e-4 * plain.norm(), (shape, ((fast - plain).norm() / plain.norm()).item())
        assert (fast.double() - ref).norm() < 1e-4 * ref.norm(), (shape, ((fast.double() - ref).norm() / ref.norm()).item())
print("ok")
"""


def test_fast_path_computes_the_same_newton_schulz_as_the_plain_path():
    """muon_fast on CUDA: its Triton kernel (upper tiles only, mirrored, a*I + b*C + c*X X^T) and the
    iterations built on it, run through Triton's CPU interpreter in fp32, against the plain
    iterations and a float64 reference, wide and tall, quintic and Polar Express."""
    import subprocess
    import sys
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", FAST_PATH_CHECK], cwd=os.path.dirname(os.path.dirname(__file__)),
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


def test_plain_newton_schulz_equals_the_float64_reference():
    """The bf16 path every device without the fast path takes, against the same iterations in float64."""
    for shape in [(40, 72), (72, 40), (3, 32, 32)]:
        G = torch.randn(shape)
        got = zeropower_via_newtonschulz5(G, 5).double()
        want = torch.stack([reference_ns(g) for g in G.reshape(-1, *shape[-2:])]).reshape(shape)
        assert (got - want).norm() < BF16_REL * want.norm(), (shape, ((got - want).norm() / want.norm()).item())


def test_gram_kernel_takes_its_coefficients_as_compile_time_constants():
    """Compiled, a run-time float argument reaches a Triton kernel as float64, and the epilogue that scales
    and shifts each tile would run in float64; as constants the tile stays in the kernel's float32."""
    if muon_fast.triton is None:
        pytest.fail("triton is missing: it ships with torch's CPU and CUDA wheels")
    constants = [p.name for p in muon_fast._gram_kernel.params if p.is_constexpr]
    assert {"alpha", "beta", "shift"} <= set(constants)


def _two_optimizers(seed=0):
    torch.manual_seed(seed)
    muon_params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    adamw_params = [torch.nn.Parameter(torch.randn(4)) for _ in range(2)] + [torch.nn.Parameter(torch.randn(2))]
    for p in muon_params + adamw_params[:2]:  # the last AdamW parameter has no gradient
        p.grad = torch.randn_like(p) * 3
    return muon_params, adamw_params, Muon(muon_params, lr=0.1), torch.optim.AdamW(adamw_params, lr=0.1)


def test_step_optimizers_clips_both_optimizers_by_one_global_norm_then_steps_and_zeroes():
    muon_params, adamw_params, muon_opt, adamw_opt = _two_optimizers()
    grads = [p.grad.clone() for p in muon_params + adamw_params[:2]]
    want = torch.cat([g.flatten() for g in grads]).norm()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    norm, stepped = muon.step_optimizers(muon_opt, adamw_opt, 1.0, scaler)
    assert stepped and norm.item() == pytest.approx(want.item(), rel=1e-6)
    assert all(p.grad is None for p in muon_params + adamw_params)
    # the same step by hand: every gradient scaled to norm 1, then both steps
    ref_muon, ref_adamw, ref_muon_opt, ref_adamw_opt = _two_optimizers()
    for p in ref_muon + ref_adamw[:2]:
        p.grad /= want
    ref_muon_opt.step()
    ref_adamw_opt.step()
    for p, q in zip(muon_params + adamw_params, ref_muon + ref_adamw):
        torch.testing.assert_close(p.detach(), q.detach())


def test_step_optimizers_does_not_clip_under_the_limit_and_times_the_muon_step():
    muon_params, adamw_params, muon_opt, adamw_opt = _two_optimizers()
    ref_muon, ref_adamw, ref_muon_opt, ref_adamw_opt = _two_optimizers()
    muon.step_optimizers(muon_opt, adamw_opt, 1e6, torch.amp.GradScaler("cpu", enabled=False))
    ref_muon_opt.step()
    ref_adamw_opt.step()
    for p, q in zip(muon_params + adamw_params, ref_muon + ref_adamw):
        torch.testing.assert_close(p.detach(), q.detach())
    ms = muon.last_step_ms(muon_opt)
    assert ms is not None and ms > 0
    assert muon.last_step_ms(muon_opt) is None  # read once: no Muon step ran since


def test_step_optimizers_skips_an_overflowed_fp16_step_on_both_optimizers():
    muon_params, adamw_params, muon_opt, adamw_opt = _two_optimizers()
    before = [p.detach().clone() for p in muon_params + adamw_params]
    muon_params[0].grad[0, 0] = float("inf")
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(torch.ones(()))  # as the backward of a scaled loss would
    norm, stepped = muon.step_optimizers(muon_opt, adamw_opt, 1.0, scaler)
    assert not stepped and not torch.isfinite(norm)
    assert all(torch.equal(p, b) for p, b in zip(muon_params + adamw_params, before))
    assert scaler.get_scale() == 2.0 and muon.last_step_ms(muon_opt) is None


WITHOUT_FAST = """
import sys
sys.modules["muon_fast"] = None  # as if muon_fast.py were deleted: importing it raises ImportError
import torch, muon
assert muon.muon_fast is None
exec(open(sys.argv[1]).read())
torch.save(run(muon), sys.argv[2])
"""

TRAIN_A_FEW_STEPS = """
def run(muon):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(8, 4), (8, 4), (4, 8), (2, 6, 6), (3, 2, 2, 2)]]
    opt = muon.Muon(params, lr=0.1, weight_decay=0.1, normuon=True, cautious_wd=True)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step(grad_scale=0.5)
    return [p.detach().clone() for p in params] + [opt.state[p]["momentum_buffer"] for p in params]
"""


def test_muon_without_its_speed_file_computes_the_same_steps(tmp_path):
    import subprocess
    import sys
    (tmp_path / "train.py").write_text(TRAIN_A_FEW_STEPS)
    r = subprocess.run([sys.executable, "-c", WITHOUT_FAST, str(tmp_path / "train.py"), str(tmp_path / "plain.pt")],
                       cwd=os.path.dirname(os.path.dirname(__file__)), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    namespace = {"torch": torch}
    exec(TRAIN_A_FEW_STEPS, namespace)
    with_fast = namespace["run"](muon)
    assert muon.muon_fast is not None
    for a, b in zip(torch.load(tmp_path / "plain.pt", weights_only=True), with_fast):
        torch.testing.assert_close(a, b)  # float and 0-D tensor hyperparameters round alike to ~1e-7
