"""Plain-PyTorch forwards of tiny HF models with explicit detaches, written from the weights.

They share nothing with lens_linear's hook machinery: the detaches are placed by hand,
so the Jacobians they give are an independent reference for J⁺.
"""

import math

import torch


def ln_frozen(x, ln):
    xc = x - x.mean(-1, keepdim=True)
    scale = (xc.pow(2).mean(-1, keepdim=True) + ln.eps).sqrt().detach()
    return xc / scale * ln.weight + ln.bias


def rms_frozen(x, norm):
    eps = getattr(norm, "variance_epsilon", None) or norm.eps
    scale = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt().detach()
    return x / scale * norm.weight


def attend(q, k, v):
    """q, k, v: [heads, pos, d_head]; causal softmax, pattern frozen."""
    n = q.shape[1]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    pattern = scores.masked_fill(~mask, float("-inf")).softmax(-1).detach()
    return pattern @ v  # [heads, pos, d_head]


def rotate(x, cos, sin):
    """Rotary on the first cos.shape[-1] dims (rotate-half convention); x: [heads, pos, d]."""
    r = cos.shape[-1]
    xr, xp = x[..., :r], x[..., r:]
    half = torch.cat([-xr[..., r // 2:], xr[..., : r // 2]], -1)
    return torch.cat([xr * cos + half * sin, xp], -1)


def frozen_gate(pre, post):
    return pre * (post / pre).detach()


def gpt2(hf, x):
    """x: [pos, d_model] = wte + wpe. Returns ln_f output [pos, d_model]."""
    t = hf.transformer
    H = hf.config.n_head
    for blk in t.h:
        h = ln_frozen(x, blk.ln_1)
        q, k, v = (h @ blk.attn.c_attn.weight + blk.attn.c_attn.bias).split(x.shape[-1], -1)
        heads = lambda a: a.view(a.shape[0], H, -1).transpose(0, 1)
        z = attend(heads(q), heads(k), heads(v)).transpose(0, 1).reshape(x.shape)
        x = x + z @ blk.attn.c_proj.weight + blk.attn.c_proj.bias
        pre = ln_frozen(x, blk.ln_2) @ blk.mlp.c_fc.weight + blk.mlp.c_fc.bias
        x = x + frozen_gate(pre, blk.mlp.act(pre)) @ blk.mlp.c_proj.weight + blk.mlp.c_proj.bias
    return ln_frozen(x, t.ln_f)


def llama(hf, x):
    m, c = hf.model, hf.config
    H, KV, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    pos_ids = torch.arange(x.shape[0])[None]
    cos, sin = (a[0] for a in m.rotary_emb(x[None], pos_ids))
    for blk in m.layers:
        a = blk.self_attn
        h = rms_frozen(x, blk.input_layernorm)
        q = a.q_proj(h).view(-1, H, D).transpose(0, 1)
        k = a.k_proj(h).view(-1, KV, D).transpose(0, 1).repeat_interleave(H // KV, 0)
        v = a.v_proj(h).view(-1, KV, D).transpose(0, 1).repeat_interleave(H // KV, 0)
        z = attend(rotate(q, cos, sin), rotate(k, cos, sin), v)
        x = x + a.o_proj(z.transpose(0, 1).reshape(x.shape[0], -1))
        h = rms_frozen(x, blk.post_attention_layernorm)
        mlp = blk.mlp
        x = x + mlp.down_proj(mlp.act_fn(mlp.gate_proj(h)).detach() * mlp.up_proj(h))
    return rms_frozen(x, m.norm)


def gpt_neox(hf, x):
    m, c = hf.gpt_neox, hf.config
    H = c.num_attention_heads
    D = c.hidden_size // H
    pos_ids = torch.arange(x.shape[0])[None]
    cos, sin = (a[0] for a in m.rotary_emb(x[None], pos_ids))
    assert c.use_parallel_residual
    for blk in m.layers:
        a = blk.attention
        h = ln_frozen(x, blk.input_layernorm)
        qkv = a.query_key_value(h).view(x.shape[0], H, 3 * D).transpose(0, 1)
        q, k, v = qkv.chunk(3, -1)
        z = attend(rotate(q, cos, sin), rotate(k, cos, sin), v)
        attn_out = a.dense(z.transpose(0, 1).reshape(x.shape))
        pre = blk.mlp.dense_h_to_4h(ln_frozen(x, blk.post_attention_layernorm))
        mlp_out = blk.mlp.dense_4h_to_h(frozen_gate(pre, blk.mlp.act(pre)))
        x = x + attn_out + mlp_out
    return ln_frozen(x, m.final_layer_norm)


FORWARDS = {"gpt2": gpt2, "llama": llama, "gpt_neox": gpt_neox}
