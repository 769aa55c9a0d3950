"""Independent references for the detached Jacobian: this module imports nothing from
lens_linear (but :mod:`lens_linear._compat`, which reads other packages' private names and
knows nothing of linearization), and the tests and ``lens_linear.coverage`` compare the
library against it.

Plain-PyTorch forwards of tiny HF models with explicit detaches, written from the weights:
the detaches are placed by hand, so the Jacobians they give are an independent reference for J⁺.

Two more, sharing no code with lens_linear either:

* :func:`hf_frozen` runs any Hugging Face causal LM itself, with the coefficients detached by
  temporary hooks chosen per kind of operation (norm modules, the softmax, activation modules,
  a mixture of experts' router outputs and shared-expert gate).
* :func:`hooked_frozen` is a forward written from a HookedTransformer's weights and config.

Selective state-space mixers (Mamba, Mamba-2 and the hybrids built on them) are recomputed in
:func:`hf_frozen` from their weights with a sequential scan, not the module's chunked kernel.
"""

import contextlib
import inspect
import math
import re

import torch
from torch.overrides import TorchFunctionMode

from lens_linear._compat import attn_implementation, experts_implementation

F = torch.nn.functional


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
    mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    pattern = scores.masked_fill(~mask, float("-inf")).softmax(-1).detach()
    return pattern @ v  # [heads, pos, d_head]


def rotate(x, cos, sin):
    """Rotary on the first cos.shape[-1] dims (rotate-half convention); x: [heads, pos, d]."""
    r = cos.shape[-1]
    xr, xp = x[..., :r], x[..., r:]
    half = torch.cat([-xr[..., r // 2 :], xr[..., : r // 2]], -1)
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


def llama(hf, x, final_norm=True):
    """``final_norm=False``: the last residual stream, before the final norm."""
    m, c = hf.model, hf.config
    H, KV, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    pos_ids = torch.arange(x.shape[0], device=x.device)[None]
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
    return rms_frozen(x, m.norm) if final_norm else x


def gpt_neox(hf, x):
    m, c = hf.gpt_neox, hf.config
    H = c.num_attention_heads
    D = c.hidden_size // H
    pos_ids = torch.arange(x.shape[0], device=x.device)[None]
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


# ---- any Hugging Face causal LM, run itself with its coefficients detached -----------------


def _rms_frozen_hook(module, args, out):
    """RMS norm: recomputed in the input's precision (HF upcasts to float32, which for a float64
    model is a downcast); its gain is ``weight`` or Gemma's ``1 + weight``, whichever reproduces
    the module's own output."""
    x = args[0]
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    inv = (x.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
    w = getattr(module, "weight", None)
    with torch.no_grad():
        gains = (
            (torch.ones((), dtype=x.dtype, device=x.device),) if w is None else (w, 1 + w)
        )  # weight-free, plain, Gemma's offset
        gain = min(gains, key=lambda g: float((x * inv * g - out).abs().max()))
        assert torch.allclose(x * inv * gain, out, rtol=1e-4, atol=1e-5), (
            f"{type(module).__name__}: unknown RMS form"
        )
    return x * (inv * gain).detach()


def _ln_frozen_hook(module, args, out):
    """LayerNorm: the centered input over a frozen scale, times the weight, plus the bias, in
    the input's precision (some modules compute in float32, a downcast for a float64 model);
    checked against the module's own output."""
    x = args[0]
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-5))
    w = getattr(module, "weight", None)
    b = getattr(module, "bias", None)
    xc = x - x.mean(-1, keepdim=True)
    y = xc / (xc.pow(2).mean(-1, keepdim=True) + eps).sqrt().detach()
    shift = 0 if b is None else b
    with (
        torch.no_grad()
    ):  # the gain is ``weight`` or ``1 + weight`` (LayerNorm1P), whichever reproduces the module
        gains = (1,) if w is None else (w, 1 + w)
        gain = min(gains, key=lambda g: float((y * g + shift - out).abs().max()))
        assert torch.allclose(y * gain + shift, out, rtol=1e-4, atol=1e-5), (
            f"{type(module).__name__}: unknown LayerNorm form"
        )
    return y * gain + shift


def _act_slope_at_0(act, like):
    with torch.enable_grad():
        z = torch.zeros((), dtype=like.dtype, device=like.device, requires_grad=True)
        return torch.autograd.grad(act.forward(z), z)[0]  # .forward: not through our own hook


def _gate_hook(module, args, out):
    """Gated MLP (act(gate(h)) * up(h)): the whole activation output is the frozen gate."""
    return out.detach()


def _slope_hook(module, args, out):
    """Plain MLP: act(pre) = pre * frozen act(pre)/pre (the slope at 0 where pre == 0)."""
    pre = args[0]
    ratio = torch.where(pre == 0, _act_slope_at_0(module, pre), out / pre)
    return pre * ratio.detach()


ACTIVATION = re.compile(r"gelu|silu|swish|relu|activation|tanh|sigmoid|mish", re.IGNORECASE)


def _is_activation(m):
    """An elementwise activation module (some, like xIELU, hold parameters of their own)."""
    return (
        not list(m.children())
        and ACTIVATION.search(type(m).__name__) is not None
        and "softmax" not in type(m).__name__.lower()
    )


def _detach_outputs(module, args, out):
    """A router (or a shared expert's scalar gate): every output constant at its value."""
    if isinstance(out, tuple):
        return tuple(o.detach() if torch.is_tensor(o) else o for o in out)
    return out.detach()


def _gates_detached(module, args, out):
    """A doubly gated convolution's input projection ``[B, C, x]``: B and C detached."""
    d = out.shape[-1] // 3
    return torch.cat([out[..., : 2 * d].detach(), out[..., 2 * d :]], -1)


class _FunctionalActivations(torch.overrides.TorchFunctionMode):
    """Inside an MLP that calls its activation as a function (``F.silu(w1 x) * w3 x``): the
    activation's output detached (gated) or its ratio to the input detached (plain)."""

    def __init__(self, gated):
        super().__init__()
        self.gated = gated

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if ACTIVATION.search(getattr(func, "__name__", "")) and "softmax" not in func.__name__:
            out = (
                _gate_hook(None, args, out)
                if self.gated
                else (args[0] * torch.where(args[0] == 0, 0.0, out / args[0]).detach())
            )
        return out


def _mode_inside(module, make_mode):
    """Hooks that keep a fresh ``make_mode()`` active while ``module``'s forward runs."""
    modes = []

    def enter(module, args):
        modes.append(make_mode())
        modes[-1].__enter__()

    def leave(module, args, out):
        modes.pop().__exit__(None, None, None)

    return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]


def _conv_act(m, xs):
    """Causal depthwise convolution of ``xs`` [pos, channels], then its activation as a
    detached ratio (``c · silu(c)/c``: linear in ``xs``)."""
    n = xs.shape[0]
    c = F.conv1d(
        xs.T[None],
        m.conv1d.weight,
        m.conv1d.bias,
        padding=m.conv1d.kernel_size[0] - 1,
        groups=xs.shape[1],
    )[0, :, :n].T
    return c * torch.where(c == 0, 0.5, F.silu(c) / c).detach()


def _scan(A, dt, u, B, C, D):
    """``s_t = exp(A·Δ_t) s_{t-1} + Δ_t u_t B_tᵀ``, ``y_t = s_t C_t + D u_t``, one position at a
    time. Per head h: A [h] or [h, n] (Mamba: h = channels), Δ [pos, h], u [pos, h, p],
    B, C [pos, h, n]."""
    decay_shape = (A.shape[0], 1, -1) if A.ndim == 2 else (A.shape[0], 1, 1)
    state = u.new_zeros(u.shape[1], u.shape[2], B.shape[-1])
    ys = []
    for t in range(u.shape[0]):
        decay = torch.exp(A * (dt[t, :, None] if A.ndim == 2 else dt[t])).reshape(decay_shape)
        state = decay * state + (dt[t].reshape(-1, 1, 1) * u[t][:, :, None]) * B[t][:, None, :]
        ys.append((state @ C[t][:, :, None])[..., 0] + D.reshape(-1, 1) * u[t])
    return torch.stack(ys)  # [pos, h, p]


def _mamba(m, h):
    """A Mamba (v1) mixer on ``h`` [pos, d]: Δ, B, C and the gate silu(z) detached."""
    n, N = h.shape[0], m.ssm_state_size
    x, z = m.in_proj(h).chunk(2, -1)
    u = _conv_act(m, x)
    ts, B, C = m.x_proj(u).split([m.time_step_rank, N, N], -1)
    if hasattr(m, "b_layernorm"):  # FalconMamba, Jamba: norms on Δ's input, B and C
        ts, B, C = m.dt_layernorm(ts), m.b_layernorm(B), m.c_layernorm(C)
    dt = F.softplus(m.dt_proj(ts)).detach()  # [pos, channels]
    y = _scan(
        -torch.exp(m.A_log),
        dt,
        u[:, :, None],
        B.detach()[:, None].expand(n, u.shape[1], N),
        C.detach()[:, None].expand(n, u.shape[1], N),
        m.D,
    )[..., 0]
    return m.out_proj(y * F.silu(z).detach())


def _mamba2(m, h):
    """A Mamba-2 mixer on ``h`` [pos, d]: Δ, B, C, the gate silu(z) and the gated norm's scale detached."""
    n, I, H, G, N = h.shape[0], m.intermediate_size, m.num_heads, m.n_groups, m.ssm_state_size
    proj = (
        m.in_proj(h * getattr(m, "ssm_in_multiplier", 1.0)) * getattr(m, "mup_vector", 1.0)
    ).reshape(n, -1)
    d_mlp = (proj.shape[-1] - 2 * I - 2 * G * N - H) // 2
    _, _, z, xBC, dt = proj.split([d_mlp, d_mlp, I, I + 2 * G * N, H], -1)
    x, B, C = _conv_act(m, xBC).split([I, G * N, G * N], -1)
    B, C = (t.detach().reshape(n, G, N).repeat_interleave(H // G, 1) for t in (B, C))
    dt = F.softplus(dt + m.dt_bias).clamp(*m.time_step_limit).detach()
    y = _scan(-torch.exp(m.A_log), dt, x.reshape(n, H, -1), B, C, m.D).reshape(n, I)
    y = y * F.silu(z).detach()
    if getattr(m, "mamba_rms_norm", True):  # gated RMS norm per group of channels
        g = y.reshape(n, -1, m.norm.group_size)
        y = (
            g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + m.norm.variance_epsilon).detach()
        ).reshape(n, I) * m.norm.weight
    return m.out_proj(y)


def _delta(m, h):
    """A gated delta rule (Qwen3-Next, Qwen3.5, OLMo-hybrid) on ``h`` [pos, d]: q, k, β, g, the gate
    silu(z) and the gated norm's scale detached; ``S_t = S_{t-1} e^{g_t} + k_t ⊗ β_t (v_t − S_{t-1}ᵀ k_t)``
    one position at a time, ``o_t = S_tᵀ q_t``."""
    n, Hk, Hv, dk, dv = h.shape[0], m.num_k_heads, m.num_v_heads, m.head_k_dim, m.head_v_dim
    if hasattr(m, "in_proj_qkvz"):
        q, k, v, z, b, a = m.fix_query_key_value_ordering(
            m.in_proj_qkvz(h[None]), m.in_proj_ba(h[None])
        )
        q, k, v, z, b, a = (t.reshape(n, -1) for t in (q, k, v, z, b, a))
    elif hasattr(m, "in_proj_qkv"):
        q, k, v = m.in_proj_qkv(h).split([m.key_dim, m.key_dim, m.value_dim], -1)
        z, b, a = m.in_proj_z(h), m.in_proj_b(h), m.in_proj_a(h)
    else:  # separate projections (OLMo-hybrid)
        q, k, v, z, b, a = (
            m.q_proj(h),
            m.k_proj(h),
            m.v_proj(h),
            m.g_proj(h),
            m.b_proj(h),
            m.a_proj(h),
        )
    q, k, v = _conv_act(m, torch.cat([q, k, v], -1)).split([m.key_dim, m.key_dim, m.value_dim], -1)
    q, k = (t.detach().reshape(n, Hk, dk).repeat_interleave(Hv // Hk, 1) for t in (q, k))
    q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6) / dk**0.5
    k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    v = v.reshape(n, Hv, dv)
    beta = b.sigmoid().detach() * (2.0 if getattr(m, "allow_neg_eigval", False) else 1.0)
    g = (-m.A_log.exp() * F.softplus(a + m.dt_bias)).detach()
    state, outs = h.new_zeros(Hv, dk, dv), []
    for t in range(n):
        state = state * g[t].exp()[:, None, None]
        delta = (v[t] - (state * k[t][:, :, None]).sum(-2)) * beta[t][:, None]
        state = state + k[t][:, :, None] * delta[:, None, :]
        outs.append((state * q[t][:, :, None]).sum(-2))
    o = torch.stack(outs)  # [pos, heads, dv]; gated RMS norm per head, norm before gate
    norm, out = (m.norm, m.out_proj) if hasattr(m, "out_proj") else (m.o_norm, m.o_proj)
    o = (
        o
        * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon).detach()
        * norm.weight
    )
    return out((o * F.silu(z.reshape(n, Hv, dv)).detach()).reshape(n, -1))


class _DetachedSigmoids(TorchFunctionMode):
    """Inside an attention module: a sigmoid or softplus output gate (Qwen3-Next, AFMoE,
    Laguna) detached, and every softmax however it is called (``Tensor.softmax``: a
    compressor's pooling weights, DeepSeek-V4); inside a hyper-connection (``hc_mult``
    streams), its sigmoid and softmax weights (the Sinkhorn steps then act on constants)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        return out.detach() if name in ("sigmoid", "softplus", "softmax") else out


class _RwkvFrozen(TorchFunctionMode):
    """Inside RWKV's time mixing (``exp`` weights of the WKV recurrence and the receptance
    ``sigmoid`` detached: the numerator is then linear in the values, the denominator a
    constant) or channel mixing (``sigmoid`` detached; ``square(t) = t · t.detach()``, so with
    the live ``relu`` the squared ReLU is ``k · (relu(k)²/k)`` with that slope detached)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name in ("exp", "sigmoid"):
            return out.detach()
        if name == "square":
            return args[0] * args[0].detach()
        return out


class _ClampSlopes(TorchFunctionMode):
    """Inside an MLP or experts module with a ``limit`` (DeepSeek-V4's clamped SwiGLU):
    ``clamp(t) = t · (clamp(t)/t)`` with the slope detached (1 where ``t`` is zero)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") not in ("clamp", "clamp_"):
            return out
        t = args[0]
        one = torch.ones_like(t)
        return t * torch.where(t == 0, one, out / torch.where(t == 0, one, t)).detach()


def _is_ssm(m):
    """A Mamba scan (decay ``A_log`` and skip ``D``) or a gated delta rule (``A_log``, ``dt_bias``)."""
    params = {name for name, _ in m.named_parameters(recurse=False)}
    return "A_log" in params and bool({"D", "dt_bias"} & params)


def _ssm_frozen_hook(module, args, kwargs, out):
    """A selective state-space mixer recomputed from its weights (see :func:`_mamba`,
    :func:`_mamba2`), checked against the module's own output."""
    h = args[0] if args else kwargs["hidden_states"]
    recompute = (
        _delta
        if "D" not in dict(module.named_parameters(recurse=False))
        else _mamba2
        if hasattr(module, "dt_bias")
        else _mamba
    )
    y = torch.stack([recompute(module, row) for row in h])
    with torch.no_grad():
        assert torch.allclose(y, out, rtol=1e-4, atol=1e-5), (
            f"{type(module).__name__}: unknown state-space form"
        )
    return y


def _frozen_hooks(base):
    """Forward hooks by kind of operation: every norm module (scale frozen), every activation
    module (a gated one's output frozen; otherwise its ratio to its input), and in a mixture of
    experts the router's outputs and the shared expert's scalar gate (routing constant)."""
    handles = []
    inside_ssm = {id(c) for m in base.modules() if _is_ssm(m) for c in m.modules() if c is not m}
    for m in base.modules():
        name = type(m).__name__
        if id(m) in inside_ssm:
            continue  # recomputed whole by the mixer's own hook
        if _is_ssm(m):
            handles.append(m.register_forward_hook(_ssm_frozen_hook, with_kwargs=True))
            continue
        if name.endswith("Attention") or hasattr(m, "hc_mult") or hasattr(m, "recurrent_param"):
            handles += _mode_inside(m, _DetachedSigmoids)  # (an RG-LRU: its two gates)
        if hasattr(m, "time_mix_key"):  # RWKV's time and channel mixing
            handles += _mode_inside(m, _RwkvFrozen)
        if callable(getattr(m, "_apply_gate", None)) and hasattr(m, "alpha"):
            handles.append(_InstancePatch(m, "_apply_gate", _clamped_glu_frozen(m)))
        elif hasattr(m, "limit") and any(k in name for k in ("MLP", "Experts")):
            handles += _mode_inside(m, _ClampSlopes)
        if "RMS" in name and "Norm" in name:
            handles.append(m.register_forward_hook(_rms_frozen_hook))
        elif "LayerNorm" in name:
            handles.append(m.register_forward_hook(_ln_frozen_hook))
        elif "Norm" in name:
            raise NotImplementedError(f"no frozen form for norm module {name}")
        for child_name, child in m.named_children():
            if _is_activation(
                child
            ):  # gated: its parent also holds a gate projection (or fused gate_up)
                gated = any(
                    "gate" in n
                    for n, _ in [*m.named_children(), *m.named_parameters(recurse=False)]
                ) and not hasattr(m, "per_layer_input_gate")  # Gemma 4: act(W h) times a constant
                gated = gated or hasattr(m, "rg_lru")  # Griffin: act(W h) · RG-LRU(h)
                gated = gated or hasattr(m, "input_linear")  # JetMoE's experts: act(a) · b
                linears = [c for c in m.children() if isinstance(c, torch.nn.Linear)]
                gated = gated or any(
                    a is not b and a.out_features == 2 * b.in_features
                    for a in linears
                    for b in linears
                )  # a GLU inside one projection: act(a) · b from [a, b] (ModernBERT-decoder)
                handles.append(child.register_forward_hook(_gate_hook if gated else _slope_hook))
            elif child_name in ("gate", "router", "shared_expert_gate") and (
                hasattr(m, "experts") or hasattr(m, "input_linear")  # JetMoE's MLP and MoA
            ):
                handles.append(child.register_forward_hook(_detach_outputs))
        linears = [c for c in m.children() if isinstance(c, torch.nn.Linear)]
        if (
            any(k in name for k in ("MLP", "FeedForward", "Experts"))
            and not any(_is_activation(c) for c in m.modules())
            and not hasattr(m, "time_mix_key")  # RWKV's channel mixing has its own rule
        ):
            gated = len(linears) == 3 or any(
                "gate" in n for n, _ in m.named_parameters(recurse=False)
            )
            handles += _mode_inside(m, lambda: _FunctionalActivations(gated))
        conv = getattr(m, "conv", None)
        if (
            isinstance(conv, torch.nn.Conv1d)
            and hasattr(m, "in_proj")
            and m.in_proj.out_features == 3 * conv.in_channels
        ):
            handles.append(
                m.in_proj.register_forward_hook(_gates_detached)
            )  # C·conv(B·x): B, C constant
    return handles


class _InstancePatch:
    """``module.<name>`` replaced on the instance until :meth:`remove` (a hook handle's API)."""

    def __init__(self, module, name, fn):
        self.module, self.name = module, name
        vars(module)[name] = fn

    def remove(self):
        vars(self.module).pop(self.name, None)


def _clamped_glu_frozen(m):
    """gpt-oss's expert unit ``g σ(α g) · (clip(u) + 1)`` (``g = min(gate, limit)``, gate and up
    interleaved) with ``g σ(α g)`` detached and the clip replaced by its detached slope
    ``clip(u) / u``; checked against the module's own method at every call."""
    own = type(m)._apply_gate

    def frozen(gate_up):
        gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
        g = torch.minimum(gate, torch.full_like(gate, m.limit))
        glu = g * torch.sigmoid(m.alpha * g)
        clipped = torch.maximum(
            torch.minimum(up, torch.full_like(up, m.limit)), torch.full_like(up, -m.limit)
        )
        slope = torch.where(
            up == 0, torch.ones_like(up), clipped / torch.where(up == 0, torch.ones_like(up), up)
        )
        y = glu.detach() * (slope.detach() * up + 1)
        with torch.no_grad():
            want = own(m, gate_up)
            assert torch.allclose(y, want, rtol=1e-4, atol=1e-6), "unknown clamped-GLU form"
        return y

    return frozen


class _NoDowncast(TorchFunctionMode):
    """Casts of float64 tensors down to float32 are no-ops. Hugging Face computes norms,
    softmaxes, rotary angles and state-space scans in float32 "for precision", which in a float64
    model is a downcast: float64 comparisons would stop at float32 rounding."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if args and torch.is_tensor(args[0]) and args[0].dtype == torch.float64:
            if name == "float":
                return args[0]
            if name in ("to", "type") and torch.float32 in (kwargs.get("dtype"), *args[1:]):
                if name == "type":
                    return args[0]
                args = tuple(a for a in args if a is not torch.float32)
                kwargs.pop("dtype", None)
            if name in ("softmax", "log_softmax") and kwargs.get("dtype") == torch.float32:
                kwargs["dtype"] = None
        return func(*args, **kwargs)


@contextlib.contextmanager
def full_precision(detach_softmax=False):
    """Computations in the precision of their inputs: no float64 tensor is cast down to
    float32 (:class:`_NoDowncast`), and every ``F.softmax`` computes at no less than its input's
    precision (``detach_softmax``: its result detached)."""
    with full_precision_softmax(detach=detach_softmax), _NoDowncast():
        yield


@contextlib.contextmanager
def full_precision_softmax(detach=False):
    """Every ``F.softmax`` inside computes at no less than its input's precision (HF's eager
    attention and TL's bridge ask for float32: an upcast for half precision, a downcast for
    float64); with ``detach`` it returns a detached result."""
    F, orig = torch.nn.functional, torch.nn.functional.softmax

    def softmax(input, dim=None, _stacklevel=3, dtype=None):
        if dtype is not None and torch.finfo(dtype).bits < torch.finfo(input.dtype).bits:
            dtype = None
        out = orig(input, dim=dim, dtype=dtype)
        return out.detach() if detach else out

    F.softmax = softmax
    try:
        yield
    finally:
        F.softmax = orig


@contextlib.contextmanager
def _eager_attention(hf):
    """Eager attention (an explicit softmax) and, in a mixture of experts, the per-expert loop
    (grouped matrix products have no float64 kernel)."""
    prev = attn_implementation(hf.config)
    experts = experts_implementation(hf.config)
    if prev != "eager":
        hf.set_attn_implementation("eager")
    assert attn_implementation(hf.config) == "eager", (
        "this model cannot switch to eager attention: build it eager"
    )
    if experts is not None:
        hf.set_experts_implementation("eager")
    try:
        yield
    finally:
        if prev != "eager":
            hf.set_attn_implementation(prev)
        if experts is not None:
            hf.set_experts_implementation(experts)


def hf_frozen(hf, x, frozen=True, tokens=None):
    """The final-normed hidden state [pos, d_model] (through a prediction head where the model
    has one before its unembedding) of a Hugging Face causal LM whose first
    decoder layer receives ``x`` [pos, d_model] (TL's ``blocks.0.hook_resid_pre``), with norm
    scales, attention patterns and MLP gates detached (``frozen=False``: the plain model).
    ``tokens`` [pos]: the prompt's token ids, for a model whose layers read them (hash routing)."""
    base = hf.base_model
    if base is hf:  # a prefix the class does not hold (Llama 4's "language_model"): its decoder
        base = hf.model
    n = hf.config.num_hidden_layers
    layers = next(m for m in base.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n)

    streams = getattr(hf.config, "hc_mult", None)  # DeepSeek-V4: the layers read copies of x
    h = x[None] if streams is None else x[None, :, None].expand(-1, -1, streams, -1).contiguous()

    def inject(module, args, kwargs):
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    def token_ids(module, args, kwargs):  # hash routing reads the token ids (DeepSeek-V4)
        if kwargs.get("input_ids", 0) is None:
            return args, {**kwargs, "input_ids": tokens[None]}
        return args, kwargs

    def embeddings(module, args, kwargs):  # Zamba2: its layers read x a second time
        names = list(inspect.signature(type(module).forward).parameters)[1:]
        if "original_hidden_states" in kwargs:
            return args, {**kwargs, "original_hidden_states": x[None]}
        at = names.index("original_hidden_states")
        return (*args[:at], x[None], *args[at + 1 :]), kwargs

    handles = [layers[0].register_forward_pre_hook(inject, with_kwargs=True)]
    handles += [
        m.register_forward_pre_hook(embeddings, with_kwargs=True)
        for m in base.modules()
        if "original_hidden_states" in inspect.signature(type(m).forward).parameters
    ]
    if tokens is not None:
        handles += [
            layer.register_forward_pre_hook(token_ids, with_kwargs=True) for layer in layers
        ]
    # a head between the final norm and the unembedding (ModernBERT-decoder: dense, activation,
    # LayerNorm) is part of the map to the unembedding's input
    head = getattr(hf, "lm_head", None)
    if not (isinstance(head, torch.nn.Module) and hasattr(head, "dense") and hasattr(head, "norm")):
        head = None  # a plain unembedding (a wrapped one included)
    try:
        if frozen:
            handles += _frozen_hooks(base) + ([] if head is None else _frozen_hooks(head))
        with _eager_attention(hf), full_precision(detach_softmax=frozen):
            # the layer-0 input is replaced by ``x``; the embeddings passed are ``x``'s value, for
            # a model that also reads them elsewhere (Gemma 4's per-layer inputs, constants of
            # the map from ``x``)
            out = base(inputs_embeds=x.detach()[None], use_cache=False).last_hidden_state
            if head is not None:
                out = head(out)
        return out[0]  # after the final norm in every family (and a head after it)
    finally:
        for h in handles:
            h.remove()


# ---- a HookedTransformer, written from its weights and config --------------------------------


def _tl_norm(x, ln, cfg, center):
    """TL's LN / RMS norm with the scale frozen; ``ln`` holds w (and b)."""
    if center:
        x = x - x.mean(-1, keepdim=True)
    scale = (x.pow(2).mean(-1, keepdim=True) + cfg.eps).sqrt().detach()
    return x / scale * ln.w + (ln.b if center else 0)


def _tl_rotary(cfg, n_pos, dtype, device):
    r = cfg.rotary_dim
    freq = cfg.rotary_base ** (torch.arange(r // 2, dtype=torch.float64, device=device) / (r / 2))
    freq = freq.repeat_interleave(2) if cfg.rotary_adjacent_pairs else freq.repeat(2)
    angles = torch.arange(n_pos, dtype=torch.float64, device=device)[:, None] / freq
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _tl_rotate(x, cos, sin, adjacent):
    """x: [heads, pos, d_head]; rotary on the first cos.shape[-1] dims."""
    r = cos.shape[-1]
    xr, xp = x[..., :r], x[..., r:]
    if adjacent:
        flip = torch.stack([-xr[..., 1::2], xr[..., ::2]], -1).flatten(-2)
    else:
        flip = torch.cat([-xr[..., r // 2 :], xr[..., : r // 2]], -1)
    return torch.cat([xr * cos + flip * sin, xp], -1)


_TL_ACTS = {
    "gelu_new": lambda a: (
        0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a.pow(3))))
    ),
    "gelu": torch.nn.functional.gelu,
    "silu": torch.nn.functional.silu,
    "relu": torch.nn.functional.relu,
}


def hooked_frozen(model, x):
    """``ln_final`` output [pos, d_model] of a HookedTransformer from ``x`` = blocks.0.hook_resid_pre,
    written from W_Q/W_K/W_V/W_O, b_*, ln w/b, W_in/W_gate/W_out and the config only."""
    cfg = model.cfg
    assert cfg.normalization_type in ("LN", "RMS") and cfg.positional_embedding_type in (
        "standard",
        "rotary",
    )
    center = cfg.normalization_type == "LN"
    n = x.shape[0]
    if cfg.positional_embedding_type == "rotary":
        cos, sin = _tl_rotary(cfg, n, x.dtype, x.device)
    mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    for layer, blk in enumerate(model.blocks):
        a = blk.attn
        h = _tl_norm(x, blk.ln1, cfg, center)
        q, k, v = (
            torch.einsum("pd,hde->hpe", h, W) + b[:, None]
            for W, b in ((a.W_Q, a.b_Q), (a.W_K, a.b_K), (a.W_V, a.b_V))
        )  # K, V: heads repeated for GQA
        if cfg.positional_embedding_type == "rotary":
            q, k = (_tl_rotate(t, cos, sin, cfg.rotary_adjacent_pairs) for t in (q, k))
        scale = (cfg.attn_scale if cfg.use_attn_scale else 1.0) * (
            layer + 1 if cfg.scale_attn_by_inverse_layer_idx else 1
        )
        pattern = (
            (q @ k.transpose(-1, -2) / scale).masked_fill(~mask, float("-inf")).softmax(-1).detach()
        )
        attn_out = torch.einsum("hpe,hed->pd", pattern @ v, a.W_O) + a.b_O
        resid = x if cfg.parallel_attn_mlp else x + attn_out
        h = _tl_norm(resid, blk.ln2, cfg, center)
        m = blk.mlp
        pre = h @ (m.W_gate if cfg.gated_mlp else m.W_in) + (0 if cfg.gated_mlp else m.b_in)
        if (
            cfg.act_fn == "solu_ln"
        ):  # x * softmax(x) with the softmax frozen, then the MLP's own LN, scale frozen
            assert not cfg.gated_mlp
            post = _tl_norm(pre * pre.softmax(-1).detach(), m.ln, cfg, center=True)
        elif cfg.gated_mlp:
            post = _TL_ACTS[cfg.act_fn](pre).detach() * (h @ m.W_in) + m.b_in
        else:
            post = frozen_gate(pre, _TL_ACTS[cfg.act_fn](pre))
        x = resid + post @ m.W_out + m.b_out + (attn_out if cfg.parallel_attn_mlp else 0)
    return _tl_norm(x, model.ln_final, cfg, center)
