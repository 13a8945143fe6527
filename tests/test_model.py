"""Specification of model.py: the QK-norm GQA transformer, its KV cache, and the Muon/AdamW split."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import randomize as randomize_weights
from model import GPT, KVCache, ModelConfig, split_params, split_summary

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, CONTEXT = 97, 32, 2, 4, 2, 32


def tiny_config(**overrides):
    kwargs = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_seq_len=CONTEXT)
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


def tiny_model(seed=0, randomize=True, **overrides):
    """A tiny model in eval mode. randomize=True replaces the zero-initialised
    o_proj/down_proj (and everything else) with random weights: at init every
    block is the identity, which would let attention bugs pass unnoticed."""
    torch.manual_seed(seed)
    model = GPT(tiny_config(**overrides)).eval()
    return randomize_weights(model) if randomize else model


def tokens(batch, length, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- config -------------------------------------------------------------------------------------

def test_intermediate_size_defaults_to_8_thirds_hidden_rounded_up_to_64():
    assert ModelConfig(hidden_size=256).intermediate_size == 704  # 682.7 -> 704
    assert tiny_config().intermediate_size == 128  # 85.3 -> 128
    assert tiny_config(intermediate_size=100).intermediate_size == 100


@pytest.mark.parametrize("overrides, message", [
    (dict(hidden_size=30), "divisible by num_attention_heads"),
    (dict(num_key_value_heads=3), "divisible by num_key_value_heads"),
    (dict(hidden_size=12, num_attention_heads=4, num_key_value_heads=2), "must be even"),
    (dict(vocab_size=0), "vocab_size"),
])
def test_bad_config_raises_value_error_that_names_the_problem(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


# ---- architecture ------------------------------------------------------------------------------

def test_changing_a_future_token_never_changes_earlier_logits():
    model = tiny_model()
    idx = tokens(2, 20)
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 1) % VOCAB
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_every_layer_has_per_head_q_norm_and_k_norm():
    model = tiny_model()
    head_dim = HIDDEN // HEADS
    for block in model.layers:
        assert block.attn.q_norm.weight.shape == (head_dim,)
        assert block.attn.k_norm.weight.shape == (head_dim,)


def test_q_norm_makes_logits_invariant_to_the_scale_of_q_proj():
    model = tiny_model()
    idx = tokens(2, 16)
    with torch.no_grad():
        before, _ = model(idx)
        for block in model.layers:
            block.attn.q_proj.weight.mul_(100.0)
        after, _ = model(idx)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_zeroing_q_norm_weight_changes_logits():
    # The counterpart of the scale test: the norm's gain is really used by attention.
    model = tiny_model()
    idx = tokens(2, 16)
    with torch.no_grad():
        before, _ = model(idx)
        for block in model.layers:
            block.attn.q_norm.weight.zero_()
        after, _ = model(idx)
    assert (after - before).abs().max() > 1e-3


def test_norms_without_weights_are_the_weighted_model_with_unit_gains():
    weightless = tiny_model(norm_weights=False)
    assert not any("norm" in name for name, _ in weightless.named_parameters())
    weighted = tiny_model(seed=1)  # random gains, so the two differ until they are set to one
    weighted.load_state_dict(weightless.state_dict(), strict=False)
    idx = tokens(2, 16)
    with torch.no_grad():
        assert (weighted(idx)[0] - weightless(idx)[0]).abs().max() > 1e-3
        for name, p in weighted.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
        assert torch.equal(weighted(idx)[0], weightless(idx)[0])


def test_gqa_projection_shapes():
    model = tiny_model(randomize=False)
    head_dim = HIDDEN // HEADS
    attn = model.layers[0].attn
    assert attn.q_proj.weight.shape == (HEADS * head_dim, HIDDEN)
    assert attn.k_proj.weight.shape == (KV_HEADS * head_dim, HIDDEN)
    assert attn.v_proj.weight.shape == (KV_HEADS * head_dim, HIDDEN)
    assert attn.o_proj.weight.shape == (HIDDEN, HEADS * head_dim)


def test_model_works_with_as_many_kv_heads_as_query_heads():
    model = tiny_model(num_key_value_heads=HEADS)
    assert model.layers[0].attn.k_proj.weight.shape == (HIDDEN, HIDDEN)
    logits, _ = model(tokens(2, 10))
    assert logits.shape == (2, 10, VOCAB)
    assert torch.isfinite(model(tokens(2, 10), targets=tokens(2, 10, seed=2))[1])


def test_no_biases_anywhere():
    model = tiny_model(randomize=False, tie_word_embeddings=False)
    assert not [name for name, _ in model.named_parameters() if name.endswith("bias")]


def test_fresh_model_starts_near_uniform_prediction():
    # Zero-initialised o_proj/down_proj and small embeddings: the loss starts near ln(V).
    model = tiny_model(randomize=False)
    _, loss = model(tokens(4, CONTEXT), targets=tokens(4, CONTEXT, seed=2))
    assert abs(loss.item() - math.log(VOCAB)) < 0.1


def test_logits_are_float32_under_bf16_autocast():
    model = tiny_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(tokens(2, 8))
        no_logits, loss = model(tokens(2, 8), targets=tokens(2, 8, seed=2))
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    assert no_logits is None  # with targets only the loss comes back (see GPT.forward)
    assert torch.isfinite(loss)


# ---- parameters, FLOPs, split ------------------------------------------------------------------

def test_tied_weights_are_one_tensor_and_counted_once():
    tied = tiny_model(randomize=False)
    untied = tiny_model(randomize=False, tie_word_embeddings=False)
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.lm_head.weight is not untied.embed_tokens.weight
    assert tied.num_params() == untied.num_params() - VOCAB * HIDDEN


def test_flops_per_token_is_6_per_matmul_weight_plus_attention_term():
    model = tiny_model(randomize=False)
    head_dim, inter = HIDDEN // HEADS, 128
    per_layer = (HIDDEN * HEADS * head_dim          # q_proj
                 + 2 * HIDDEN * KV_HEADS * head_dim  # k_proj, v_proj
                 + HEADS * head_dim * HIDDEN         # o_proj
                 + 3 * HIDDEN * inter)               # gate, up, down
    matmul_weights = LAYERS * per_layer + VOCAB * HIDDEN  # + LM head, once
    expected = 6 * matmul_weights + 12 * LAYERS * HIDDEN * CONTEXT
    assert expected == 227_520
    assert model.flops_per_token() == expected


@pytest.mark.parametrize("tied", [True, False])
def test_split_puts_every_trainable_parameter_in_exactly_one_list(tied):
    model = tiny_model(randomize=False, tie_word_embeddings=tied)
    muon, adamw = split_params(model)
    ids = [id(p) for p in muon + adamw]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert sum(p.numel() for p in muon + adamw) == model.num_params()


@pytest.mark.parametrize("tied", [True, False])
def test_split_sends_block_matrices_to_muon_and_the_rest_to_adamw(tied):
    model = tiny_model(randomize=False, tie_word_embeddings=tied)
    muon, adamw = split_params(model)
    muon_ids, adamw_ids = {id(p) for p in muon}, {id(p) for p in adamw}
    assert all(p.dim() == 2 for p in muon)
    assert len(muon) == 7 * LAYERS
    for block in model.layers:
        a, m = block.attn, block.mlp
        for linear in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
            assert id(linear.weight) in muon_ids
        for norm in (a.q_norm, a.k_norm, block.attn_norm, block.mlp_norm):
            assert id(norm.weight) in adamw_ids
    assert id(model.embed_tokens.weight) in adamw_ids
    assert id(model.lm_head.weight) in adamw_ids
    assert id(model.norm.weight) in adamw_ids


def test_split_skips_frozen_parameters():
    model = tiny_model(randomize=False)
    model.embed_tokens.weight.requires_grad_(False)
    muon, adamw = split_params(model)
    assert all(p is not model.embed_tokens.weight for p in muon + adamw)


def test_split_summary_reports_counts_and_shares():
    model = tiny_model(randomize=False)
    muon, adamw = split_params(model)
    text = split_summary(model, muon, adamw)
    muon_n = sum(p.numel() for p in muon)
    assert "Muon" in text and "AdamW" in text
    assert f"{muon_n:,}" in text
    assert f"{100 * muon_n / model.num_params():5.1f}%" in text
    assert str(len(adamw)) in text


# ---- loss --------------------------------------------------------------------------------------

def test_loss_is_the_masked_mean_of_per_token_cross_entropy():
    model = tiny_model()
    idx, targets = tokens(2, 12), tokens(2, 12, seed=2)
    targets[1, 3] = -1  # ignored like a masked position
    loss_mask = torch.zeros(2, 12, dtype=torch.long)
    loss_mask[0, 4:9] = 1
    loss_mask[1, 2:6] = 1
    logits, _ = model(idx)
    _, loss = model(idx, targets=targets, loss_mask=loss_mask)
    keep = (loss_mask == 1) & (targets != -1)
    per_token = F.cross_entropy(logits[keep], targets[keep], reduction="none")
    assert keep.sum() == 8
    torch.testing.assert_close(loss, per_token.mean())


def test_loss_without_mask_averages_every_position():
    model = tiny_model()
    idx, targets = tokens(2, 12), tokens(2, 12, seed=2)
    logits, _ = model(idx)
    _, loss = model(idx, targets=targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1)))


def test_fully_masked_batch_gives_zero_loss_not_nan_and_backward_works():
    model = tiny_model()
    _, loss = model(tokens(2, 8), targets=tokens(2, 8, seed=2), loss_mask=torch.zeros(2, 8))
    assert loss.item() == 0.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_a_few_adamw_steps_on_a_repeated_sequence_lower_the_loss():
    model = tiny_model(randomize=False).train()
    pattern = tokens(1, 8)
    seq = pattern.repeat(1, 4)[:, :CONTEXT + 1].repeat(2, 1)
    x, y = seq[:, :-1], seq[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        _, loss = model(x, targets=y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ---- KV cache and generation ------------------------------------------------------------------

def test_cached_forward_in_chunks_matches_one_full_forward():
    model = tiny_model()
    idx = tokens(2, 20)
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(LAYERS)
        parts = [model(idx[:, :9], kv_cache=cache)[0],     # prefill
                 model(idx[:, 9:10], kv_cache=cache)[0],   # one-token decode
                 model(idx[:, 10:20], kv_cache=cache)[0]]  # chunk after a cache
    assert cache.seq_len == 20
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_greedy_generation_is_the_same_with_and_without_kv_cache():
    model = tiny_model()
    prompt = tokens(2, 5)
    cached = model.generate(prompt, 20, temperature=0.0, use_cache=True)
    uncached = model.generate(prompt, 20, temperature=0.0, use_cache=False)
    assert cached.shape == (2, 25)
    assert torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, uncached)


def test_stream_yields_one_token_per_row_each_step():
    model = tiny_model()
    steps = list(model.stream(tokens(3, 4), 6, temperature=1.0, top_k=5))
    assert len(steps) == 6
    assert all(t.shape == (3,) and t.dtype == torch.long for t in steps)


def test_generation_stops_early_once_every_row_has_produced_eos():
    model = tiny_model()
    prompt = tokens(1, 5).repeat(2, 1)  # identical rows finish together
    free = model.generate(prompt, 20, temperature=0.0)[0, 5:]
    eos_id = int(free[3])
    first = int((free == eos_id).nonzero()[0])
    out = model.generate(prompt, 20, temperature=0.0, eos_id=eos_id)
    assert out.shape == (2, 5 + first + 1)
    assert (out[:, -1] == eos_id).all()


def test_rows_that_finished_keep_yielding_eos_while_others_continue():
    model = tiny_model()
    prompt = tokens(2, 5)
    free = model.generate(prompt, 20, temperature=0.0)[:, 5:]
    only_in_row_0 = [t for t in free[0].tolist() if t not in free[1].tolist()]
    assert only_in_row_0, "test setup: row 0 needs a token that row 1 never produces"
    eos_id = only_in_row_0[0]
    first = int((free[0] == eos_id).nonzero()[0])
    out = model.generate(prompt, 20, temperature=0.0, eos_id=eos_id)[:, 5:]
    assert out.shape == (2, 20)  # row 1 never finishes, so all 20 steps run
    assert (out[0, first:] == eos_id).all()
    assert torch.equal(out[1], free[1])


def test_forward_rejects_a_sequence_longer_than_the_context():
    model = tiny_model(randomize=False)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(1, CONTEXT + 1))


def test_cached_generation_past_the_context_raises_before_generating():
    model = tiny_model(randomize=False)
    with pytest.raises(ValueError, match="max_seq_len"):
        next(model.stream(tokens(1, 20), CONTEXT - 19, use_cache=True))


def test_uncached_generation_crops_the_context_and_keeps_going():
    model = tiny_model()
    out = model.generate(tokens(2, 20), CONTEXT, temperature=0.0, use_cache=False)
    assert out.shape == (2, 20 + CONTEXT)


FAST_NORM_ROPE_CHECK = """
import torch, model, model_fast
assert model_fast.triton is not None, "triton is missing"
torch.manual_seed(0)
# fp32: Triton's CPU interpreter mishandles bf16. Shapes: rows a multiple of the block and not, a half
# head_dim that is not a power of two, a gradient laid out as SDPA's (B, heads, T, head_dim) transposed.
for (B, T, H, D), transposed in [((2, 16, 2, 8), False), ((1, 7, 5, 12), True), ((3, 11, 2, 16), True)]:
    x = torch.randn(B, T, H, D, requires_grad=True)
    norm = model.RMSNorm(D, 1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    cos, sin = model.rope_tables(D, T + 3, 10000.0)
    cos, sin = cos[3:], sin[3:]  # positions after 3 cached tokens
    up = torch.randn(B, H, T, D).transpose(1, 2) if transposed else torch.randn(B, T, H, D)
    plain = model.apply_rope(norm(x), cos, sin)
    fast = model_fast.norm_rope(x, norm.weight, norm.eps, cos, sin)
    for a, b in zip((plain, *torch.autograd.grad(plain, (x, norm.weight), up)),
                    (fast, *torch.autograd.grad(fast, (x, norm.weight), up))):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), ((B, T, H, D), (a - b).abs().max().item())
# the whole model with the kernels in its attention, against the plain path
cfg = model.ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_seq_len=16)
m = model.GPT(cfg)
with torch.no_grad():
    for p in m.parameters():
        p.add_(0.1 * torch.randn_like(p))
idx = torch.randint(0, 64, (2, 16))
runs = []
for fast in (False, True):
    model_fast.enabled = lambda x: fast
    m.zero_grad()
    _, loss = m(idx, idx)
    loss.backward()
    runs.append([loss.detach()] + [p.grad.clone() for p in m.parameters()])
for a, b in zip(*runs):
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a - b).abs().max().item()
print("ok")
"""


def test_fast_qk_norm_rope_computes_the_plain_path_and_its_gradients():
    """model_fast's Triton kernels (QK-norm with a gain, then RoPE, and their backward) run through
    Triton's CPU interpreter against apply_rope(RMSNorm(x)) and autograd, alone and inside the model."""
    import os
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", FAST_NORM_ROPE_CHECK], cwd=os.path.dirname(os.path.dirname(__file__)),
                       env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


def test_fast_kernels_take_eps_as_a_compile_time_constant():
    """Compiled, a run-time float argument reaches a Triton kernel as float64 and the whole norm would
    follow it into float64; as a constant it stays in the kernels' float32."""
    import model_fast
    if model_fast.triton is None:
        pytest.fail("triton is missing: it ships with torch's CPU and CUDA wheels")
    for kernel in (model_fast._forward_kernel, model_fast._backward_kernel):
        assert "eps" in [p.name for p in kernel.params if p.is_constexpr], kernel.fn.__name__


def test_activation_checkpointing_recomputes_each_block_in_the_backward_with_the_same_gradients():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, max_seq_len=16))
    x = torch.randint(0, 64, (2, 16))
    calls, mlp_forward = [], model.layers[0].mlp.forward
    model.layers[0].mlp.forward = lambda h: calls.append(1) or mlp_forward(h)
    grads = {}
    for on in (False, True):
        model.checkpoint_blocks = on
        calls.clear()
        model.zero_grad()
        model(x, x)[1].backward()
        grads[on] = [p.grad.clone() for p in model.parameters()]
        assert len(calls) == (2 if on else 1)  # checkpointed: once forward, once again in the backward
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
