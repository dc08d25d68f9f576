"""Stateless building blocks shared by the block families: norms, RoPE, attention.

Every function takes its weights as arguments; nothing here owns a parameter.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """LayerNorm in the input's precision; weights held in a lower precision (the engine's bf16 copy)
    are cast up, exactly, since CPU autocast does not do it for layer_norm."""
    return F.layer_norm(x, (x.shape[-1],), weight.to(x.dtype), bias.to(x.dtype), eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm as Llama computes it: normalise in fp32, cast back, then scale (matches transformers)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def autocast_input(h: Tensor) -> Tensor:
    """``h`` in autocast's dtype when autocast is on (as is): the input of several matmuls cast once, not by
    each (the same values; under a saved graph, one copy kept instead of one per matmul)."""
    dev = h.device.type
    return h.to(torch.get_autocast_dtype(dev)) if torch.is_autocast_enabled(dev) else h


def rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device, scaling=None) -> tuple[Tensor, Tensor]:
    """cos and sin of shape (seq_len, head_dim), in the half-split layout transformers' Llama uses.
    ``scaling``: a ``RopeScaling`` (linear, or Llama 3.1's llama3), computed as transformers does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim))
    if scaling is not None:
        inv_freq = _scaled_inv_freq(inv_freq, scaling)
    t = torch.arange(seq_len, device=device, dtype=torch.int64).float()
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _scaled_inv_freq(inv_freq: Tensor, sc) -> Tensor:
    """RoPE frequencies after scaling. llama3: wavelengths shorter than original/high_freq_factor are
    kept, longer than original/low_freq_factor divided by ``factor``, and those between interpolated
    linearly in original/wavelength (Meta's Llama 3.1 reference, transformers' ``llama3`` rope type)."""
    if sc.type == "linear":
        return inv_freq / sc.factor
    old = sc.original_max_position_embeddings
    low_wavelen, high_wavelen = old / sc.low_freq_factor, old / sc.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / sc.factor, inv_freq)
    smooth = (old / wavelen - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor)
    smoothed = (1 - smooth) * out / sc.factor + smooth * out
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, out)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, T, D) queries or keys; cos/sin are (T, D), or (B, 1, T, D) for per-row positions."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos.to(x.dtype)) + (rotated * sin.to(x.dtype))


def causal_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Causal scaled-dot-product attention on (B, H, T, D) tensors; k/v may have fewer heads (GQA).
    ``mask``: a boolean (B, 1, T, T) mask of the pairs that may attend (``attention_mask``: packed
    documents, a sliding window), which already holds causality; None: plain causal.

    Grouped-query attention is the kernel's own (``enable_gqa``) where ``kernel_gqa`` says the kernel takes
    it: no copy of k and v per query head (``repeat_interleave`` makes one, and autograd saves it: two
    B*H*T*D tensors per block)."""
    causal = dict(is_causal=True) if mask is None else dict(attn_mask=mask)
    if k.shape[1] != q.shape[1]:
        if kernel_gqa(q.device.type, q.dtype, mask is not None):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **causal)
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, **causal)


def masked(packed: bool, window: int | None, T: int) -> bool:
    """Whether attention over ``T`` tokens takes a mask (``attention_mask``): rows that pack several documents
    (``packed``, more than one token) or a sliding window shorter than the sequence."""
    return (packed and T > 1) or (window is not None and window < T)


def attention_mask(positions: Tensor | None, T: int, window: int | None, device: torch.device) -> Tensor | None:
    """Which query/key pairs of a (B, T) batch may attend, as a boolean (B or 1, 1, T, T) mask, or None
    when plain causal attention is exact. ``positions``: each token's position in its document, 0 where
    a document starts (packed sequences: no token attends across a document boundary); None: one
    document per row. ``window``: a sliding window, keys less than ``window`` tokens back (Mistral's,
    transformers' ``kv_idx > q_idx - window``).

    The mask is built per block call from the (B, T) positions, not kept: B*T*T bytes for the duration
    of the attention. A mask costs the fastest kernels: on CUDA, SDPA takes the memory-efficient kernel
    instead of flash attention (PyTorch's flash kernel has no arbitrary mask)."""
    if not masked(positions is not None, window, T):
        return None
    idx = torch.arange(T, device=device)
    packed = positions is not None and T > 1
    allowed = idx[None, :] <= idx[:, None]
    if window is not None and window < T:
        allowed = allowed & (idx[None, :] > idx[:, None] - window)
    allowed = allowed[None, None]
    if packed:
        doc = torch.cumsum(positions == 0, dim=1)
        allowed = allowed & (doc[:, None, :, None] == doc[:, None, None, :])
    return allowed


_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def kernel_gqa(device_type: str, dtype: torch.dtype, masked: bool) -> bool:
    """Whether SDPA takes grouped-query attention itself (``enable_gqa``, torch >= 2.5) for these inputs. On
    CUDA only flash attention does (besides the math kernel), and flash takes no mask and no fp32: there the
    math kernel would keep the T x T scores in fp32 for backward (GiBs per block at long sequences), so k and
    v are expanded per query head for the memory-efficient kernel instead. The CPU's kernel takes both."""
    return _SDPA_GQA and (device_type != "cuda" or (not masked and dtype in (torch.float16, torch.bfloat16)))


LOSS_CHUNK_BYTES = 64 * 1024**2
"""fp32 logits of one slice of tokens in the chunked LM-head loss (``linear_cross_entropy``): the head
holds a few such slices, never the whole batch's logits."""


def loss_chunk_tokens(vocab_size: int, chunk_bytes: int = LOSS_CHUNK_BYTES) -> int:
    """Tokens per slice of the chunked LM-head loss: fp32 logits of ``chunk_bytes``, at least one token."""
    return max(1, chunk_bytes // (4 * vocab_size))


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``h @ w.T`` against ``targets``, a slice of tokens at a time. The gradients
    are computed in the same pass (softmax minus one-hot, back through the matmul) and kept, so neither
    forward nor backward ever holds the logits of more than one slice. Targets equal to ``ignore_index``
    count for nothing, as in ``F.cross_entropy``. The matmuls run in autocast's dtype when autocast is on,
    as ``F.linear`` would; the logits, the softmax and the loss are fp32."""

    @staticmethod
    def forward(ctx, h, w, targets, chunk, ignore_index, loss_tokens, grads=True):
        dev = h.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        with torch.autocast(dev, enabled=False):
            hc, wc = h.to(dt), w.to(dt)
            valid = targets != ignore_index
            n = valid.sum()
            scale = 1.0 / n.clamp_min(1).float() if loss_tokens is None else 1.0 / float(loss_tokens)
            grad_h = torch.empty_like(h) if grads else torch.empty(0, dtype=h.dtype, device=h.device)
            want_w = grads and w.requires_grad  # a frozen LM head (LoRA): no weight gradient, half the backward matmuls
            grad_w = torch.zeros(w.shape if want_w else (0,), dtype=torch.float32, device=w.device)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for a in range(0, h.shape[0], chunk):
                rows, t, ok = hc[a:a + chunk], targets[a:a + chunk], valid[a:a + chunk]
                logits = (rows @ wc.t()).float()
                safe = torch.where(ok, t, torch.zeros_like(t))
                picked = logits.gather(1, safe[:, None]).squeeze(1)
                # log-sum-exp and softmax in the logits' own memory: logsumexp and exp(logits - lse) each made
                # a slice-sized fp32 temporary (a LoRA run's peak memory was the head's)
                top = logits.amax(dim=-1, keepdim=True)
                sums = logits.sub_(top).exp_().sum(dim=-1, keepdim=True)
                lse = (top + sums.log()).squeeze(1)
                total += torch.where(ok, lse - picked, torch.zeros_like(lse)).sum()
                if not grads:  # (evaluation: the loss alone, neither the softmax's gradient nor its matmul)
                    del logits
                    continue
                g = logits.div_(sums)                             # softmax
                g[torch.arange(g.shape[0], device=g.device), safe] -= 1.0
                g *= (ok.float() * scale)[:, None]                # d(mean loss) / d(logits)
                g = g.to(dt)
                del logits  # (bf16: the fp32 slice, not needed by the matmuls below)
                grad_h[a:a + chunk] = (g @ wc).to(h.dtype)
                if want_w:
                    # a block of the vocabulary's rows at a time: the product and its fp32 copy, whole, were 6 B a
                    # weight beside the fp32 sum, the head's peak 10 B a weight where 6 are planned (1.5x the plan
                    # at a 128k vocabulary: a pass)
                    step = max(1, LOSS_CHUNK_BYTES // (4 * grad_w.shape[1]))  # (fp32 rows of one slice's size)
                    for v in range(0, grad_w.shape[0], step):
                        grad_w[v:v + step] += (g[:, v:v + step].t() @ rows).float()
                del g
            loss = total * scale
            if loss_tokens is None:
                loss = torch.where(n > 0, loss, torch.full_like(total, float("nan")))
        ctx.save_for_backward(grad_h, grad_w.to(w.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gw = grad_w * grad_out.to(grad_w.dtype) if ctx.needs_input_grad[1] else None
        return grad_h * grad_out.to(grad_h.dtype), gw, None, None, None, None, None


def linear_cross_entropy(h: Tensor, w: Tensor, targets: Tensor, chunk_tokens: int | None = None,
                         ignore_index: int = -100, loss_tokens: int | None = None) -> Tensor:
    """Mean cross-entropy of the LM head ``h @ w.T`` over tokens (``h``: (N, d), ``targets``: (N,)),
    computed ``chunk_tokens`` at a time (default ``loss_chunk_tokens``): the memory of the head's loss
    and gradients is a slice's fp32 logits, not the batch's (Liger's fused linear cross-entropy, here
    with the gradients computed in the forward pass). Agrees with ``F.cross_entropy(h @ w.T, targets)``
    to rounding (tests/models: 1e-6 relative in fp32). ``loss_tokens``: divide the summed loss by this
    count instead (a step's tokens with a target over all its micro-batches: each token weighs the same
    whatever micro-batch it falls in, as in transformers' ``num_items_in_batch``)."""
    chunk = chunk_tokens or loss_chunk_tokens(w.shape[0])
    # without autograd (evaluation) the gradients are not computed: the head's loss costs half, and holds no
    # softmax or input gradient (a LoRA run's peak memory was its evaluation's head)
    grads = torch.is_grad_enabled() and (h.requires_grad or w.requires_grad)
    return _LinearCrossEntropy.apply(h, w, targets, chunk, ignore_index, loss_tokens, grads)
