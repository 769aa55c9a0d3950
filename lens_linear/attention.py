"""Attention circuits at the operating point.

With the pattern frozen, attention is linear: the output at query ``q`` depends on the
attention input at key ``k`` through ``Σ_h A[h, q, k] · W_V^h W_O^h``, a rank ≤ n_heads·d_head
product that stays a :class:`FactoredMatrix`. What freezing removes is the *QK term*: the
change of the pattern itself. For scores ``s = q·k / scale`` and ``A = softmax(s)`` (one
head, ``v``, ``z`` the value and mixed-value vectors of the run)::

    ∂out_q/∂x_k = A_qk W_V W_O                                  (OV term, kept)
                + A_qk / scale · (W_K q_q) ⊗ ((v_k − z_q) W_O)     (keys move the scores)
                + [q == k] / scale · Σ_l A_ql (W_Q (k_l − k̄_q)) ⊗ ((v_l − z_q) W_O)   (the query moves them)

with ``k̄_q = Σ_l A_ql k_l``.

Two orientations, named so they cannot be mixed up:

* a **Jacobian** (:meth:`AttentionCircuits.jacobian`, :meth:`~AttentionCircuits.full_jacobian`,
  :meth:`~AttentionCircuits.qk_term`) is ``[d_out, d_in]`` and acts on column vectors,
  ``Δout = J @ Δx``, as every Jacobian of this package (``LinearCache.jacobian``);
* a **circuit** or weight (:meth:`~AttentionCircuits.ov_circuit`,
  :meth:`~AttentionCircuits.qk_circuit`, :meth:`~AttentionCircuits.weights`,
  :meth:`~AttentionCircuits.norm_map`) follows TransformerLens' row-vector convention of
  ``model.W_V``, ``model.OV``: ``x @ M``. ``circuit.T`` turns one into the other.
"""

from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from transformer_lens import FactoredMatrix

from lens_linear._validation import normalize_index, normalize_position, tolerance
from lens_linear.hooks.contexts import analysis_mode
from lens_linear.hooks.operating_point import OperatingPoint
from lens_linear.hooks.run import run_to
from lens_linear.jacobian import batched_vjp_jacobian
from lens_linear.memory import chunk_size, sequence_bytes
from lens_linear.tokens import model_device


def attention_input(model: Any, layer: int) -> str:
    """The hook whose value the query, key and value projections read: the attention
    module's input on a bridge, the block's normed residual on a HookedTransformer (or the
    residual itself in a model without norms). Hook names alone can mislead: a bridge may
    bind ``ln1`` to a norm that sits after attention (OLMo-2 under TransformerLens 3.9)."""
    for name in (f"blocks.{layer}.attn.hook_in", f"blocks.{layer}.ln1.hook_normalized"):
        if name in model.hook_dict:
            return name
    return f"blocks.{layer}.hook_resid_pre"


def _per_head(value: torch.Tensor, n_heads: int, dim: int = -2) -> torch.Tensor:
    """Shared key/value heads (grouped-query attention) repeated for the query heads they serve."""
    return (
        value.repeat_interleave(n_heads // value.shape[dim], dim=dim)
        if value.shape[dim] != n_heads
        else value
    )


@dataclass(frozen=True)
class InductionHead:
    layer: int
    head: int
    score: float  # mean attention from second-half tokens to the token after their first copy
    copying_score: float | None  # eigenvalue copying score of its pattern-weighted OV circuit

    def __repr__(self) -> str:
        copy = "n/a" if self.copying_score is None else f"{self.copying_score:+.3f}"
        return f"L{self.layer}H{self.head}: induction {self.score:.3f}, copying {copy}"


@dataclass
class InductionReport:
    """Induction scores of every head ``[n_layers, n_heads]`` and the top heads in detail."""

    tokens: Int[torch.Tensor, "1 pos"]
    scores: Float[torch.Tensor, "n_layers n_heads"]
    top: list[InductionHead]
    detector_scores: Float[torch.Tensor, "n_layers n_heads"] | None  # head_detector's, same scale

    def __repr__(self) -> str:
        lines = [f"induction heads on {self.tokens.shape[-1]} tokens (random, repeated twice):"]
        lines += [f"  {h!r}" for h in self.top]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "scores": self.scores.tolist(),
            "top": [
                {
                    "layer": h.layer,
                    "head": h.head,
                    "score": h.score,
                    "copying_score": h.copying_score,
                }
                for h in self.top
            ],
            "detector_scores": None
            if self.detector_scores is None
            else self.detector_scores.tolist(),
        }


class AttentionCircuits:
    """The attention view of one operating point (reached as ``lcache.attention``).

    Orientation: see the module docstring (Jacobians ``J @ x``, circuits ``x @ M``).
    """

    def __init__(self, point: OperatingPoint, max_memory: int | None = None):
        self.point = point
        self.model = point.model
        self.cfg = point.model.cfg
        self.n_pos = point.tokens.shape[-1]
        self.max_memory = max_memory
        self._local: dict[tuple[str, str, int], torch.Tensor] = {}
        self._weights: dict[int, dict[str, torch.Tensor]] = {}

    # -- validation -----------------------------------------------------------------------
    def _layer(self, layer: int) -> int:
        return normalize_index(layer, self.cfg.n_layers)

    def _heads(self, head: int | None) -> list[int]:
        n = self.cfg.n_heads
        return (
            list(range(n))
            if head is None
            else [normalize_index(head, n, "head", "heads per layer")]
        )

    def _positions(self, query_pos: int, key_pos: int) -> tuple[int, int]:
        q = normalize_position(query_pos, self.n_pos, "query_pos")
        k = normalize_position(key_pos, self.n_pos, "key_pos")
        if k > q:
            warnings.warn(
                f"key_pos={k} comes after query_pos={q}: causal attention cannot see it, "
                f"so this Jacobian is exactly zero.",
                stacklevel=3,
            )
        return q, k

    def _chunk(self, n_rows: int) -> int:
        x = self.point.x_star
        return chunk_size(
            n_rows, sequence_bytes(self.cfg, self.n_pos, x.dtype), self.max_memory, device=x.device
        )

    # -- frozen values ----------------------------------------------------------------------
    def pattern(
        self, layer: int, *, head: int | None = None
    ) -> Float[torch.Tensor, "n_heads query_pos key_pos"]:
        """The frozen attention pattern of ``layer`` (``[query_pos, key_pos]`` for one head)."""
        layer = self._layer(layer)
        pattern = self.point.pattern(layer)
        if pattern is None:
            raise ValueError(
                f"block {layer} has no frozen softmax pattern (blocks.{layer}.attn.hook_pattern): "
                f"attention circuits need softmax attention"
            )
        return pattern if head is None else pattern[self._heads(head)[0]]

    def _local_map(self, source: str, target: str, pos: int) -> Float[torch.Tensor, "d_in d_out"]:
        """``∂ target[pos] / ∂ source[pos]`` of the frozen map as a row-convention matrix
        (``x @ M``), for a map that acts position by position (a norm, a projection): one
        replay, ``d_out`` batched VJPs; memoized."""
        key = (source, target, pos)
        if key not in self._local:
            base = self.point.activations[source][0].detach()
            x_pos = base[pos : pos + 1].clone().requires_grad_(True)
            with analysis_mode(self.model), torch.enable_grad():
                x = torch.cat([base[:pos], x_pos, base[pos + 1 :]])
                y = self.point.replay(x.unsqueeze(0), [target], input_hook=source, pos=pos)[target][
                    0
                ].reshape(-1)
                jac = batched_vjp_jacobian(y, x_pos, self._chunk(y.numel()))
            self._local[key] = jac[0].T.detach()
        return self._local[key]

    def weights(self, layer: int) -> dict[str, Float[torch.Tensor, "n_heads d d_head"]]:
        """Per-head ``W_Q, W_K, W_V`` ``[n_heads, d_model, d_head]`` from the attention input,
        and ``W_O`` ``[n_heads, d_head, d_model]`` (row convention, as ``model.W_Q``); shared
        key/value heads (grouped-query attention) repeated for the query heads they serve.

        ``W_Q, W_K, W_V`` are read off the model (the map from the attention input to
        ``hook_q/k/v``, by replay), not taken from parameter names: whatever sits between
        (a norm's weight in a HookedTransformer, a fused QKV projection) is included.
        """
        layer = self._layer(layer)
        if layer not in self._weights:
            source, n = attention_input(self.model, layer), self.cfg.n_heads
            w = {}
            for name in "QKV":
                m = self._local_map(source, f"blocks.{layer}.attn.hook_{name.lower()}", 0)
                m = m.reshape(m.shape[0], -1, self.cfg.d_head).transpose(
                    0, 1
                )  # [heads, d_in, d_head]
                w[f"W_{name}"] = _per_head(m, n, dim=0)
            w_o = self.model.blocks[layer].attn.W_O.detach().to(self.point.x_star)
            w["W_O"] = _per_head(w_o, n, dim=0)
            self._weights[layer] = w
        return self._weights[layer]

    def norm_map(self, layer: int, *, pos: int) -> Float[torch.Tensor, "d_model d_model"]:
        """The block input's frozen norm at ``pos`` as a row-convention matrix (``x @ N``):
        residual stream to attention input, scale frozen, computed by replay (so LayerNorm's
        centering, RMSNorm and folded weights are all covered)."""
        source, target = f"blocks.{layer}.hook_resid_pre", attention_input(self.model, layer)
        if target == source:
            return torch.eye(
                self.cfg.d_model, dtype=self.point.x_star.dtype, device=self.point.x_star.device
            )
        return self._local_map(source, target, normalize_position(pos, self.n_pos))

    def post_map(
        self, layer: int, *, query_pos: int
    ) -> Float[torch.Tensor, "d_model d_model"] | None:
        """The norm some models apply to the attention output before ``hook_attn_out``
        (Gemma, OLMo-2), frozen at ``query_pos``, row convention; ``None`` where there is none."""
        raw, out = f"blocks.{layer}.attn.hook_out", f"blocks.{layer}.hook_attn_out"
        hooks = self.model.hook_dict
        if raw in hooks:
            return None if hooks[raw] is hooks[out] else self._local_map(raw, out, query_pos)
        if f"blocks.{layer}.ln1_post.hook_scale" in hooks:
            raise ValueError(
                f"block {layer} normalizes its attention output before {out}, and this model "
                f"has no hook on the raw attention output to start from: load it as a "
                f"TransformerBridge (lens_linear.load_model(..., backend='bridge'))."
            )
        return None

    def _then_post(self, layer: int, query_pos: int, jac: torch.Tensor) -> torch.Tensor:
        """A column-convention Jacobian followed by the post-attention norm, if any."""
        post = self.post_map(layer, query_pos=query_pos)
        return jac if post is None else post.T @ jac

    # -- circuits (row convention) --------------------------------------------------------------
    def ov_circuit(
        self, layer: int, *, head: int | None = None, key_pos: int | None = None
    ) -> FactoredMatrix:
        """Per-head ``W_V W_O`` ``[n_heads, d_model, d_model]`` (or one head's), row convention
        like ``model.OV``; with ``key_pos``, starting at the residual stream through the block
        norm frozen at that position."""
        layer, heads = self._layer(layer), self._heads(head)
        w = self.weights(layer)
        left = w["W_V"][heads]
        if key_pos is not None:
            left = (
                self.norm_map(layer, pos=normalize_position(key_pos, self.n_pos, "key_pos")) @ left
            )
        fm = FactoredMatrix(left, w["W_O"][heads])
        return fm[0] if head is not None else fm

    def qk_circuit(
        self,
        layer: int,
        *,
        head: int | None = None,
        query_pos: int | None = None,
        key_pos: int | None = None,
    ) -> FactoredMatrix:
        """Per-head bilinear form ``W_Q W_Kᵀ`` of the scores (before the scale), row convention
        like ``model.QK``; with positions, from the residual stream through the frozen norms
        there. Rotary embeddings rotate queries and keys by position after these weights and
        are not included: a warning says so."""
        layer, heads = self._layer(layer), self._heads(head)
        if self.cfg.positional_embedding_type == "rotary":
            warnings.warn(
                "this model uses rotary embeddings: the QK circuit is the weights' bilinear "
                "form, without the position-dependent rotation",
                stacklevel=2,
            )
        w = self.weights(layer)
        left, right = w["W_Q"][heads], w["W_K"][heads].transpose(-1, -2)
        if query_pos is not None:
            left = (
                self.norm_map(layer, pos=normalize_position(query_pos, self.n_pos, "query_pos"))
                @ left
            )
        if key_pos is not None:
            right = (
                right
                @ self.norm_map(layer, pos=normalize_position(key_pos, self.n_pos, "key_pos")).T
            )
        fm = FactoredMatrix(left, right)
        return fm[0] if head is not None else fm

    # -- Jacobians (column convention) ------------------------------------------------------------
    def jacobian(
        self,
        layer: int,
        query_pos: int,
        key_pos: int,
        *,
        head: int | None = None,
        include_norm: bool = False,
    ) -> FactoredMatrix:
        """``∂ attn_out[query_pos] / ∂ attention input[key_pos]`` with the pattern frozen:
        ``Σ_h A[h, q, k] (W_V^h W_O^h)ᵀ`` as a ``[d_model, d_model]`` FactoredMatrix in the
        column convention (``fm @ Δx``; ``fm.AB`` is the dense Jacobian). ``head`` keeps one
        head's term; ``include_norm`` starts at the residual stream, through the block norm
        frozen at ``key_pos``."""
        layer, heads = self._layer(layer), self._heads(head)
        q, k = self._positions(query_pos, key_pos)
        w = self.weights(layer)
        a = self.pattern(layer)[heads, q, k]
        value_side = (
            (a[:, None, None] * w["W_V"][heads]).transpose(0, 1).reshape(self.cfg.d_model, -1)
        )  # x @ ·
        out_side = w["W_O"][heads].reshape(-1, self.cfg.d_model)
        if include_norm:
            value_side = self.norm_map(layer, pos=k) @ value_side
        return FactoredMatrix(self._then_post(layer, q, out_side.T), value_side.T)

    def full_jacobian(
        self, layer: int, query_pos: int, key_pos: int, *, head: int | None = None
    ) -> Float[torch.Tensor, "d_out d_in"]:
        """The same Jacobian with the pattern following the input, by autograd (column
        convention like :meth:`jacobian`). Nothing inside attention is frozen; a norm on the
        attention output (Gemma, OLMo-2) keeps its frozen scale, so that ``full = OV + QK``
        separates the pattern's share exactly. Elsewhere this is the plain Jacobian."""
        layer, heads = self._layer(layer), self._heads(head)
        q, k = self._positions(query_pos, key_pos)
        source = attention_input(self.model, layer)
        w_o = self.weights(layer)["W_O"][heads]
        x = self.point.activations[source][0].detach().clone().requires_grad_(True)
        z_hook = f"blocks.{layer}.attn.hook_z"
        with self.point.computing(), analysis_mode(self.model), torch.enable_grad():
            z = run_to(
                self.model,
                self.point.tokens,
                self.point.fwd_hooks,
                inject=(source, x.unsqueeze(0)),
                capture=[z_hook],
            )[z_hook]
            y = torch.einsum("hd,hdo->o", _per_head(z[0, q], self.cfg.n_heads)[heads], w_o)
            jac = batched_vjp_jacobian(y, x, self._chunk(y.numel()))
        return self._then_post(layer, q, jac[k].detach())

    def qk_term(
        self,
        layer: int,
        query_pos: int,
        key_pos: int,
        *,
        head: int | None = None,
        method: str = "auto",
    ) -> Float[torch.Tensor, "d_out d_in"]:
        """What freezing the pattern removes: ``full_jacobian − jacobian`` (column convention).

        ``"analytic"`` uses the formula in the module docstring; it holds where the run's
        scores are ``q·k / scale`` and the pattern their softmax, which is checked on the
        recorded values (rotary, ALiBi or soft-capped scores fail the check). ``"autograd"``
        subtracts the OV term from :meth:`full_jacobian`. ``"auto"`` takes the analytic form
        where it holds.
        """
        if method not in ("auto", "analytic", "autograd"):
            raise ValueError(f"method must be 'auto', 'analytic' or 'autograd', got {method!r}")
        layer = self._layer(layer)
        scale = self._score_scale(layer) if method != "autograd" else None
        if method == "analytic" and scale is None:
            raise ValueError(
                f"the scores of layer {layer} are not q·k/scale followed by a softmax "
                f"(rotary, ALiBi or soft-capped attention): use method='autograd'"
            )
        if scale is None:
            return (
                self.full_jacobian(layer, query_pos, key_pos, head=head)
                - self.jacobian(layer, query_pos, key_pos, head=head).AB
            )
        q, k = self._positions(query_pos, key_pos)
        return self._then_post(layer, q, self._analytic_qk(layer, q, k, self._heads(head), scale).T)

    def _run_values(self, layer: int) -> dict[str, torch.Tensor]:
        acts, n = self.point.activations, self.cfg.n_heads
        return {name: _per_head(acts[f"blocks.{layer}.attn.hook_{name}"][0], n) for name in "qkvz"}

    def _score_scale(self, layer: int) -> float | None:
        """The scale with ``scores = q·k / scale`` if the recorded run satisfies it and the
        pattern is the softmax of those scores; ``None`` otherwise."""
        names = [f"blocks.{layer}.attn.hook_{n}" for n in ("q", "k", "v", "z", "attn_scores")]
        if any(n not in self.model.hook_dict for n in names):
            return None
        values = self._run_values(layer)
        scores = self.point.activations[f"blocks.{layer}.attn.hook_attn_scores"][0]
        dots = torch.einsum("qhd,khd->hqk", values["q"], values["k"])
        causal = torch.ones_like(dots[0], dtype=torch.bool).tril()
        d, s = dots[:, causal].double(), scores[:, causal].double()
        scale = float((d * d).sum() / (d * s).sum())
        tol = 10 * tolerance(scores.dtype)
        fitted = torch.where(causal, dots / scale, torch.finfo(dots.dtype).min).softmax(-1)
        if (
            float((d / scale - s).norm() / s.norm()) > tol
            or float((fitted - self.pattern(layer)).abs().max()) > tol
        ):
            return None
        return scale

    def _analytic_qk(
        self, layer: int, q: int, k: int, heads: list[int], scale: float
    ) -> torch.Tensor:
        """The QK term in row convention ``[d_in, d_out]``."""
        v = self._run_values(layer)
        w = self.weights(layer)
        a = self.pattern(layer)
        x = self.point.x_star
        term = torch.zeros(self.cfg.d_model, self.cfg.d_model, dtype=x.dtype, device=x.device)
        for h in heads:
            moved_out = (v["v"][:, h] - v["z"][q, h]) @ w["W_O"][
                h
            ]  # [pos, d_model]: (v_l − z_q) W_O
            term += a[h, q, k] / scale * torch.outer(w["W_K"][h] @ v["q"][q, h], moved_out[k])
            if q == k:
                centered = v["k"][: q + 1, h] - a[h, q, : q + 1] @ v["k"][: q + 1, h]  # k_l − k̄_q
                term += (w["W_Q"][h] @ centered.T * a[h, q, : q + 1]) @ moved_out[: q + 1] / scale
        return term

    def copying_score(self, jacobian: FactoredMatrix) -> float:
        """Eigenvalue copying score of an attention Jacobian (column convention, as from
        :meth:`jacobian`; for a row-convention circuit pass ``circuit.T``): the eigenvalues of
        ``W_E Jᵀ W_U``, ``Σλ / Σ|λ|`` (real part); near +1 when the map sends each token's
        embedding onto its own unembedding. The nonzero eigenvalues are those of
        ``Aᵀ (W_U W_E) Bᵀ`` for ``J = A B`` (inner size only), in float64 (no half-precision
        eigenvalue kernel exists, and rounding there would blur the score)."""
        inner = jacobian.A.double().T @ self._unembed_embed @ jacobian.B.double().T
        eig = torch.linalg.eigvals(inner)
        return float((eig.sum() / eig.abs().sum()).real)

    @functools.cached_property
    def _unembed_embed(self) -> Float[torch.Tensor, "d_model d_model"]:
        return self.model.W_U.detach().double() @ self.model.W_E.detach().double()


def repeated_random_tokens(
    model: Any, seq_len: int, seed: int = 0, tries: int = 20
) -> tuple[Int[torch.Tensor, "1 pos"], str | None]:
    """``seq_len`` distinct random word tokens, repeated twice (after a BOS where the model
    prepends one), and the text that tokenizes back to exactly these tokens (``None`` if no
    draw round-trips, as with byte-level pieces that merge)."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError("the induction study needs a tokenizer (model.tokenizer is None)")
    pieces = tok.batch_decode([[i] for i in range(model.cfg.d_vocab)])
    special = set(getattr(tok, "all_special_ids", []))
    for pattern in (
        r"^ [A-Za-z]{3,}$",
        r"^[A-Za-z]$",
    ):  # whole words (BPE), else letters (char-level)
        candidates = [i for i, p in enumerate(pieces) if re.match(pattern, p) and i not in special]
        if len(candidates) >= seq_len:
            break
    else:
        raise ValueError(
            f"the vocabulary has fewer than {seq_len} word tokens to draw from; use a shorter seq_len"
        )
    gen = torch.Generator(device="cpu").manual_seed(seed)
    bos = (
        [tok.bos_token_id] if model.cfg.default_prepend_bos and tok.bos_token_id is not None else []
    )
    device = model_device(model)
    for _ in range(tries):
        pick = torch.randperm(len(candidates), generator=gen, device="cpu")[:seq_len].tolist()
        ids = [candidates[i] for i in pick]
        tokens = torch.tensor([bos + ids + ids], device="cpu")
        text = tok.decode(ids + ids)
        if torch.equal(model.to_tokens(text).cpu(), tokens):
            return tokens.to(device), text
    return tokens.to(device), None


def induction_heads(
    model: Any, *, seq_len: int = 50, seed: int = 0, n_top_heads: int = 5, n_queries: int = 8
) -> InductionReport:
    """Score every head for induction on random tokens repeated twice, and describe the best.

    A head's score is its mean attention from each second-half token to the token that
    followed that token's first occurrence. For the ``n_top_heads`` best heads the copying
    score of the pattern-weighted OV Jacobian (:meth:`AttentionCircuits.jacobian` with the
    block norm, from the residual stream at the attended token) is averaged over
    ``n_queries`` second-half positions. Where ``transformer_lens.head_detector`` runs on the
    model its induction scores are reported on the same scale (its ratio counts every query row).
    In a hybrid, blocks without softmax attention score NaN; a model with none is refused.
    """
    tokens, text = repeated_random_tokens(model, seq_len, seed)
    with analysis_mode(model):
        point = OperatingPoint.record(model, tokens, names_filter=[])[0]
    first = tokens.shape[-1] - 2 * seq_len  # 1 after a BOS
    queries = torch.arange(first + seq_len, first + 2 * seq_len, device=tokens.device)
    keys = queries - seq_len + 1
    att = AttentionCircuits(point)
    layers = [
        layer
        for layer in range(model.cfg.n_layers)
        if f"blocks.{layer}.attn.hook_pattern" in {**point.values, **point.frozen_attention}
    ]
    if not layers:
        raise ValueError(
            "the induction study needs softmax attention, and no block of this model has a frozen "
            "softmax pattern (its token mixers are state-space scans or recurrences)"
        )
    scores = torch.full((model.cfg.n_layers, model.cfg.n_heads), float("nan"), device=tokens.device)
    for layer in layers:  # blocks without softmax attention (a hybrid's scans) keep NaN
        scores[layer] = att.pattern(layer)[:, queries, keys].mean(-1)
    ranked = sorted(
        ((float(scores[l, h]), l, h) for l in layers for h in range(scores.shape[1])), reverse=True
    )[:n_top_heads]
    sample = queries[
        torch.linspace(0, seq_len - 1, min(n_queries, seq_len), device=tokens.device).round().long()
    ]
    top = []
    for score, layer, head in ranked:
        copying = [
            att.copying_score(
                att.jacobian(layer, int(q), int(q) - seq_len + 1, head=head, include_norm=True)
            )
            for q in sample
        ]
        top.append(InductionHead(layer, head, score, sum(copying) / len(copying)))
    return InductionReport(
        tokens, scores.cpu(), top, _detector_scores(model, text, tokens.shape[-1] / seq_len)
    )


def _detector_scores(model: Any, text: str | None, rescale: float) -> torch.Tensor | None:
    """``transformer_lens.head_detector``'s induction scores, rescaled to ours; ``None`` (with a
    warning saying why) where it cannot run on this model or text."""
    if text is None:
        warnings.warn("no text round-trips to the random tokens: head_detector comparison skipped")
        return None
    try:
        from transformer_lens.head_detector import detect_head

        return detect_head(model, text, "induction_head").to("cpu", torch.float64) * rescale
    except Exception as exc:  # a model head_detector does not support
        warnings.warn(
            f"transformer_lens.head_detector did not run on this model ({type(exc).__name__}: {exc})"
        )
        return None
