"""A small Qwen3-style decoder-only transformer and the Muon/AdamW parameter split.

Pre-norm blocks with grouped-query attention, per-head RMSNorm on q and k before
RoPE (QK-norm), a SwiGLU MLP and no biases; a KV cache for generation. The
training scripts import GPT, ModelConfig and split_params from here.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import model_fast


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int | None = None  # None: 8/3 * hidden rounded up to a multiple of 64
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    norm_weights: bool = True  # False: RMSNorms without a learned gain (x / rms(x)), a faster backward
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                             f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = hidden_size / num_attention_heads = {self.head_dim} must be even "
                             "(RoPE rotates pairs of channels)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.intermediate_size is None:
            # SwiGLU has three matrices instead of two, so 8/3 * hidden keeps the MLP
            # at the parameter count of a 4 * hidden GELU MLP; 64 keeps matmuls tile-friendly.
            self.intermediate_size = 64 * math.ceil(8 * self.hidden_size / 3 / 64)
        elif self.intermediate_size < 1:
            raise ValueError(f"intermediate_size must be a positive integer or None, got {self.intermediate_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 whatever the input dtype, with a learned gain (Qwen3's) or
    without one (weight None: x / rms(x), as nanochat and modded-nanogpt have it). The gain's
    gradient is a sum over every token, a second reduction in each norm's backward."""

    def __init__(self, dim: int, eps: float, weight: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if weight else None

    def forward(self, x):
        # A mean of squares in bf16 loses precision; upcast, then hand back the caller's dtype.
        weight = self.weight.float() if self.weight is not None else None
        return F.rms_norm(x.float(), (x.size(-1),), weight, self.eps).to(x.dtype)


def rope_tables(head_dim: int, max_seq_len: int, theta: float):
    """cos and sin of position * frequency, each (max_seq_len, head_dim // 2), float32."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate x (B, T, heads, head_dim) by position; cos/sin are (T, head_dim // 2).

    Channel i is paired with channel i + head_dim/2 (the "rotate half" layout of
    Llama/Qwen), so the halves can be sliced instead of interleaved.
    """
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def norm_rope(norm: RMSNorm, x, cos, sin):
    """apply_rope(norm(x)) on q or k (B, T, heads, head_dim); with a gain on CUDA, model_fast's
    kernels compute the same."""
    if norm.weight is not None and model_fast.enabled(x):
        return model_fast.norm_rope(x, norm.weight, norm.eps, cos, sin)
    return apply_rope(norm(x), cos, sin)


class KVCache:
    """Keys and values of every token seen so far: one (k, v) pair per layer,
    each (B, num_key_value_heads, seq_len, head_dim). Grows by concatenation,
    which is simple and cheap enough at the context lengths this repo trains.
    seq_len counts the tokens fed so far; GPT.forward advances it after all layers."""

    def __init__(self, num_layers: int):
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.seq_len = 0

    def update(self, layer: int, k, v):
        """Append this step's k, v for one layer and return all of them."""
        if self.layers[layer] is not None:
            past_k, past_v = self.layers[layer]
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        self.layers[layer] = (k, v)
        return k, v


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)
        # QK-norm: normalising each head's q and k bounds the attention logits, so they
        # cannot blow up however large q_proj/k_proj grow (Muon updates are not small).
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, config.norm_weights)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, config.norm_weights)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, layer: int, kv_cache: KVCache | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        # Norm before RoPE: RoPE is a rotation, so it keeps the unit RMS the norm produced.
        q = norm_rope(self.q_norm, q, cos, sin).transpose(1, 2)  # (B, heads, T, head_dim)
        k = norm_rope(self.k_norm, k, cos, sin).transpose(1, 2)
        v = v.transpose(1, 2)
        past = 0
        if kv_cache is not None:
            past = kv_cache.seq_len
            k, v = kv_cache.update(layer, k, v)
        # Three cases: a fresh sequence is plain causal; one new token sees everything
        # cached; a chunk after a cache needs the causal mask shifted by `past`.
        mask, causal = None, past == 0 and T > 1
        if past > 0 and T > 1:
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.resid_dropout(self.o_proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_weights)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_weights)
        self.mlp = MLP(config)

    def forward(self, x, branch, cos, sin, layer: int, kv_cache: KVCache | None):
        """(residual stream, the previous block's MLP output or None) -> the same pair after this block. Its own
        MLP output is added by whatever runs next: with each block compiled alone (--fsdp) that add then fuses
        with the next norm, as in one whole-model graph, instead of running as a kernel of its own."""
        if branch is not None:
            x = x + branch
        x = x + self.attn(self.attn_norm(x), cos, sin, layer, kv_cache)
        return x, self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_weights)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Derived from the config, so kept out of the state_dict (non-persistent).
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.checkpoint_blocks = False  # training scripts: --activation_checkpointing
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        # - Embedding (and the head, tied or not): normal(0, 0.02), GPT-2's and Qwen's
        #   initializer_range. Tied, with identity blocks, the model starts out predicting
        #   its input token (that logit is about 0.02 * hidden, 5 at hidden 256). In a quick
        #   bigram test at hidden 256 with AdamW, std 0.1 stalled and 1/hidden learned slower.
        # - q, k, v, gate, up: normal(0, 1/sqrt(fan_in)), so each output channel has about
        #   the RMS of the (normalised, RMS 1) input.
        # - o_proj and down_proj: zero, so every block starts as the identity and the
        #   network starts as a bigram model; gradients still reach them (their input is
        #   not zero), and Muon's orthogonalised update moves a zero matrix just fine.
        # - Norm gains (if any): one.
        nn.init.normal_(self.embed_tokens.weight, mean=0.0, std=0.02)
        if not self.config.tie_word_embeddings:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.02)
        for block in self.layers:
            attn, mlp = block.attn, block.mlp
            for linear in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                nn.init.normal_(linear.weight, mean=0.0, std=linear.in_features ** -0.5)
            nn.init.zeros_(attn.o_proj.weight)
            nn.init.zeros_(mlp.down_proj.weight)
        for module in self.modules():
            if isinstance(module, RMSNorm) and module.weight is not None:
                nn.init.ones_(module.weight)

    def forward(self, idx, targets=None, loss_mask=None, kv_cache: KVCache | None = None):
        """idx (B, T) token ids -> (logits (B, T, vocab) float32, None) without targets,
        (None, loss) with them.

        loss is the mean cross-entropy over positions where loss_mask is 1 (all
        positions when loss_mask is None) and targets != -1; 0 if none is left.
        Training needs only the loss: not returning the logits lets a compiled model
        skip writing a float32 copy of (B, T, vocab), the largest tensor of the step.
        With a kv_cache, idx continues the cached tokens (positions start at
        kv_cache.seq_len) and the cache is extended in place.
        """
        B, T = idx.shape
        start = kv_cache.seq_len if kv_cache is not None else 0
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens ({start} cached + {T} new) exceeds "
                             f"max_seq_len={self.config.max_seq_len}; crop the input or raise max_seq_len")
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        x = self.embed_tokens(idx)
        if torch.is_autocast_enabled(x.device.type):
            # the residual stream in the autocast dtype (bf16), as the matmuls produce it: every
            # elementwise op on it (norms, adds, RoPE) and every saved activation moves half the bytes
            x = x.to(torch.get_autocast_dtype(x.device.type))
        branch = None  # the last block's MLP output, not yet added to x
        for i, block in enumerate(self.layers):
            if self.checkpoint_blocks and self.training and torch.is_grad_enabled():
                # activation checkpointing: keep only the block's input, one tensor (the stream with every
                # branch added), and recompute the rest in the backward
                x = x if branch is None else x + branch
                x, branch = torch.utils.checkpoint.checkpoint(block, x, None, cos, sin, i, kv_cache,
                                                              use_reentrant=False)
            else:
                x, branch = block(x, branch, cos, sin, i, kv_cache)
        if kv_cache is not None:
            kv_cache.seq_len += T
        return self.output(x, branch, targets, loss_mask)

    def output(self, x, branch=None, targets=None, loss_mask=None):
        """The last hidden states (x plus the last block's MLP output) -> forward's (logits, None) or (None, loss):
        the final norm, the head and the masked mean cross-entropy (one function, so it compiles into one graph
        on its own)."""
        if branch is not None:
            x = x + branch
        logits = self.lm_head(self.norm(x)).float()  # float32 even under autocast: softmax over V
        if targets is None:
            return logits, None
        per_token = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                                    ignore_index=-1, reduction="none")
        keep = targets.reshape(-1) != -1
        if loss_mask is not None:
            keep = keep & (loss_mask.reshape(-1) == 1)
        keep = keep.float()
        # clamp: a batch with nothing to learn from gives loss 0 (still attached to the
        # graph, so backward works) instead of 0/0 = NaN.
        loss = (per_token * keep).sum() / keep.sum().clamp(min=1.0)
        return None, loss

    @torch.no_grad()
    def stream(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
               eos_id: int | None = None, use_cache: bool = True):
        """Yield the next token of every row, a (B,) tensor, for up to max_new_tokens steps.

        temperature 0 is greedy. Once a row has produced eos_id it keeps yielding
        eos_id, and the stream stops when every row has. At the context limit:
        with use_cache=True the prompt plus max_new_tokens must fit in max_seq_len
        (ValueError up front otherwise); with use_cache=False the model sees only
        the last max_seq_len tokens, so generation can run on indefinitely.
        Dropout follows the module's mode: call model.eval() first.
        """
        B, T = idx.shape
        if temperature < 0 or (top_k is not None and top_k < 1):
            raise ValueError(f"need temperature >= 0 and top_k >= 1 (or None), got {temperature}, {top_k}")
        if use_cache and T + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"max_seq_len={self.config.max_seq_len} with use_cache=True; "
                             "ask for fewer tokens or pass use_cache=False (crops the context)")
        cache = KVCache(self.config.num_hidden_layers) if use_cache else None
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        tokens, unseen = idx, idx  # unseen: tokens the cache has not been fed yet
        for _ in range(max_new_tokens):
            # eager: the shapes change every token, so blocks compiled for training (under FSDP) would recompile
            with torch.compiler.set_stance("force_eager"):
                if use_cache:
                    logits, _ = self(unseen, kv_cache=cache)
                else:
                    logits, _ = self(tokens[:, -self.config.max_seq_len:])
            next_token = sample_next(logits[:, -1, :], temperature, top_k)
            if eos_id is not None:
                next_token = torch.where(finished, torch.full_like(next_token, eos_id), next_token)
                finished |= next_token == eos_id
            yield next_token
            if eos_id is not None and bool(finished.all()):
                return
            unseen = next_token[:, None]
            if not use_cache:
                tokens = torch.cat([tokens, unseen], dim=1)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 eos_id: int | None = None, use_cache: bool = True):
        """The prompt followed by the streamed tokens: (B, T + n), n <= max_new_tokens."""
        new = [t[:, None] for t in self.stream(idx, max_new_tokens, temperature, top_k, eos_id, use_cache)]
        return torch.cat([idx, *new], dim=1)

    def num_params(self) -> int:
        """Trainable parameters; parameters() yields a tied weight once."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def flops_per_token(self) -> int:
        """Training FLOPs (forward + backward) per token, for MFU.

        The PaLM / nanoGPT convention: 6 per weight of every matmul (2 forward,
        4 backward) over the block matrices and the LM head (a tied head counted
        once, the embedding lookup not at all, norms not at all), plus
        12 * layers * hidden * max_seq_len for the attention scores and the
        weighted sum of values, at the full context and ignoring the causal mask.
        """
        c = self.config
        matmul_weights = sum(p.numel() for p in self.layers.parameters() if p.dim() >= 2)
        matmul_weights += self.lm_head.weight.numel()
        return 6 * matmul_weights + 12 * c.num_hidden_layers * c.hidden_size * c.max_seq_len


def sample_next(logits, temperature: float, top_k: int | None):
    """Pick one token per row from logits (B, vocab); temperature 0 is argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1).squeeze(-1)


def split_params(model: nn.Module):
    """(muon_params, adamw_params): Muon takes every >=2-D weight inside a transformer
    block; AdamW takes the rest (embedding, head once if tied, all norm gains).

    Blocks are found by type, so this works on a torch.compile'd or wrapped model too.
    """
    in_block = {id(p) for m in model.modules() if isinstance(m, Block) for p in m.parameters()}
    muon_params, adamw_params = [], []
    for p in model.parameters():  # yields shared (tied) tensors once
        if not p.requires_grad:
            continue
        (muon_params if id(p) in in_block and p.dim() >= 2 else adamw_params).append(p)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    muon_ids, adamw_ids = {id(p) for p in muon_params}, {id(p) for p in adamw_params}
    assert not muon_ids & adamw_ids and muon_ids | adamw_ids == trainable, \
        "every trainable parameter must be in exactly one optimizer"
    return muon_params, adamw_params


def split_summary(model: nn.Module, muon_params, adamw_params) -> str:
    """A few lines saying how many tensors and parameters each optimizer gets."""
    counts = {"Muon": (len(muon_params), sum(p.numel() for p in muon_params)),
              "AdamW": (len(adamw_params), sum(p.numel() for p in adamw_params))}
    total = sum(n for _, n in counts.values()) or 1
    lines = [f"parameter split of {type(model).__name__} ({total:,} trainable parameters):"]
    for name, (tensors, n) in counts.items():
        lines.append(f"  {name:<5} {tensors:4d} tensors {n:>13,} parameters {100 * n / total:5.1f}%")
    return "\n".join(lines)
