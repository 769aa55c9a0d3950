"""LinearCache: detached Jacobians of one input, next to the ordinary ActivationCache."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch
from jaxtyping import Float, Int
from transformer_lens import FactoredMatrix

from lens_linear import decode
from lens_linear.attention import AttentionCircuits
from lens_linear._validation import (LinearizationError, normalize_index, normalize_position, relative_error,
                                     require_hook, require_tl_model, tolerance)
from lens_linear.decode import Direction, SVDResult
from lens_linear.hooks.operating_point import (INPUT_HOOK, Hook, OperatingPoint, biases_zeroed, block_outputs,
                                               analysis_mode, hooks_on, linears_skipped, output_hook)
from lens_linear.hooks.sites import PARTS, layer_of
from lens_linear.jacobian import DEFAULT_MEMORY, batched_vjp_jacobian, chunk_rows, forward_jacobians

if TYPE_CHECKING:
    from lens_linear.matfree import MatrixFreeSVD


@dataclass(frozen=True)
class Prediction:
    token: str
    token_id: int
    prob: float


def to_tokens(model: Any, input: str | torch.Tensor, prepend_bos: bool | None = None,
              max_len: int | None = None) -> Int[torch.Tensor, "1 pos"]:
    """One sequence as ``[1, pos]`` token ids (cut to ``max_len``); rejects empty or batched input."""
    if isinstance(input, str):
        if not input.strip():
            raise ValueError("empty prompt: give at least one token of text")
        if model.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass token ids as a tensor instead of text")
        tokens = model.to_tokens(input, prepend_bos=prepend_bos, truncate=False)
    elif isinstance(input, torch.Tensor):
        tokens = input.unsqueeze(0) if input.ndim == 1 else input
        if tokens.ndim != 2 or tokens.shape[0] != 1:
            raise ValueError(f"expected one sequence of token ids [pos] or [1, pos], got shape {tuple(input.shape)}; "
                             f"a linearization is for one input, so loop over a batch")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"token ids must be an integer tensor, got {tokens.dtype}")
    else:
        raise TypeError(f"input must be a string or a tensor of token ids, got {type(input).__name__}")
    tokens = tokens[:, :max_len]
    if tokens.shape[-1] == 0:
        raise ValueError("empty prompt: give at least one token")
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx and tokens.shape[-1] > n_ctx:
        raise ValueError(f"prompt has {tokens.shape[-1]} tokens, more than the model's context of {n_ctx}"
                         + ("; pass max_len to cut prompts" if max_len is None else ""))
    return tokens.to(model.cfg.device if getattr(model.cfg, "device", None) else tokens.device)


RESIDUAL_WIDTH_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")
FORWARD_PASS_COST = 1.8  # forward token-layer pass vs backward row, measured (see LinearCache.jacobians)


class LinearCache:
    """Detached Jacobians of one input sequence, computed lazily and memoized.

    ``lcache[hook_name]`` is the Jacobian ``[pos_in, d_out, d_in]`` of that activation at the
    cache's output position ``pos`` with respect to the input variable
    (``blocks.0.hook_resid_pre`` at every position). The default hook is the final-normed
    residual (the unembedding's input). The ordinary ``ActivationCache``, the operating
    point, tokens and logits are kept alongside.
    """

    def __init__(self, model: Any, point: OperatingPoint, logits: torch.Tensor, activations: Any,
                 pos: int, max_memory: int = DEFAULT_MEMORY, progress: bool = False, complete: bool = False):
        self.model = model
        self.point = point
        self.tokens = point.tokens
        self.logits: Float[torch.Tensor, "pos d_vocab"] = logits[0]
        self._activations = activations
        self._complete = complete
        self.pos = pos
        self.output = output_hook(model)
        self.max_memory = max_memory
        self.progress = progress
        self._jacobians: dict[tuple[str, int, bool], torch.Tensor] = {}

    # ---- basic facts -------------------------------------------------------------------
    @property
    def n_pos(self) -> int:
        return self.tokens.shape[-1]

    @property
    def str_tokens(self) -> list[str]:
        if self.model.tokenizer is None:
            return [str(int(t)) for t in self.tokens[0]]
        return [self.model.tokenizer.decode([int(t)]) for t in self.tokens[0]]

    @property
    def x(self) -> Float[torch.Tensor, "pos d_model"]:
        """The input variable at the operating point (``blocks.0.hook_resid_pre``)."""
        return self.point.x_star

    @property
    def activations(self) -> Any:
        """The ``ActivationCache`` of the recorded forward pass (with the coefficients frozen,
        which leaves every value unchanged). Unless a ``names_filter`` was given, it is
        filled on first use by running the same recording again: a Jacobian alone never
        pays for caching every hook."""
        if not self._complete:
            with analysis_mode(self.model), torch.no_grad(), hooks_on(self.model, self.point.hooks("record")):
                _, self._activations = self.model.run_with_cache(self.tokens)
            self._complete = True
        return self._activations

    def activation(self, hook: str | None = None, pos: int | None = None) -> torch.Tensor:
        """The recorded activation at ``hook`` and position (flattened trailing dims)."""
        hook, pos = self._resolve(hook, pos)
        cache = self._activations if hook in self._activations else self.activations
        return cache[hook][0, pos].reshape(-1)

    def top_predictions(self, k: int = 5, pos: int | None = None) -> list[Prediction]:
        """The ``k`` most likely next tokens at ``pos`` with their probabilities."""
        _, pos = self._resolve(None, pos)
        probs = self.logits[pos].double().softmax(-1)
        top = probs.topk(k)
        decode = (lambda i: self.model.tokenizer.decode([i])) if self.model.tokenizer else str
        return [Prediction(decode(int(i)), int(i), float(p)) for p, i in zip(top.values, top.indices)]

    # ---- Jacobians ---------------------------------------------------------------------
    def _resolve(self, hook: str | None, pos: int | None) -> tuple[str, int]:
        hook = hook or self.output
        require_hook(self.model, hook)
        return hook, normalize_position(self.pos if pos is None else pos, self.n_pos)

    def _row_bytes(self) -> int:
        """Bytes one backward row (or one forward direction) keeps alive, roughly."""
        cfg = self.model.cfg
        width = 8 * cfg.d_model + 4 * (cfg.d_mlp or 4 * cfg.d_model) + 4 * cfg.n_heads * self.n_pos
        return self.x.element_size() * self.n_pos * width

    def jacobian(self, hook: str | None = None, pos: int | None = None,
                 source: str | None = None) -> Float[torch.Tensor, "pos_in d_out d_in"]:
        """Detached Jacobian of ``hook`` at ``pos`` w.r.t. the input at every position.

        ``source`` (default: the input embeddings, ``blocks.0.hook_resid_pre``) may be any
        earlier hook, e.g. ``blocks.3.hook_resid_pre``: the Jacobian is then that of the frozen
        map from there on. One replay forward, then chunked batched VJPs; memoized.
        """
        return self._jacobian(hook, pos, plain=False, source=source)

    def __getitem__(self, hook: str) -> Float[torch.Tensor, "pos_in d_out d_in"]:
        return self.jacobian(hook)

    def plain_jacobian(self, hook: str | None = None, pos: int | None = None) -> Float[torch.Tensor, "pos_in d_out d_in"]:
        """The ordinary Jacobian (nothing frozen), for comparison: it does not reconstruct."""
        return self._jacobian(hook, pos, plain=True)

    def _source_value(self, source: str) -> torch.Tensor:
        return self.x if source == INPUT_HOOK else self.activations[source][0]

    def _jacobian(self, hook: str | None, pos: int | None, plain: bool, source: str | None = None) -> torch.Tensor:
        hook, pos = self._resolve(hook, pos)
        source = source or INPUT_HOOK
        require_hook(self.model, source)
        key = (hook, pos, plain, source)
        if key not in self._jacobians:
            if plain:
                fn = self._plain_fn(hook, pos)
            else:
                fn = lambda x: self.point.replay(x, [hook], source, at=pos)[hook][0].reshape(-1)  # noqa: E731
            x = self._source_value(source).detach().clone().requires_grad_(True)
            with analysis_mode(self.model), torch.enable_grad():
                y = fn(x)
                chunk = chunk_rows(y.numel(), self._row_bytes(), self.max_memory)
                self._jacobians[key] = batched_vjp_jacobian(y, x, chunk, self.progress).detach()
        return self._jacobians[key]

    def jacobians(self, hooks: Sequence[str] | None = None, pos: int | None = None,
                  method: str = "auto") -> dict[str, Float[torch.Tensor, "pos_in d_out d_in"]]:
        """Detached Jacobians of many hooks at once (default: every ``hook_resid_post``).

        Two engines, counted in token-layer passes (n positions, output at ``pos``):

        * ``"reverse"``: one batched-VJP Jacobian per hook, each row a backward through the
          hook's depth over all positions: ``n · Σ_hooks depth · d_out`` (layers² · n · d for
          every layer's residual).
        * ``"forward"``: one replay per input direction, every hook read off the same pass; a
          direction at position ``i`` runs on positions ``i..`` only:
          ``d_in · Σ_{i≤pos} (n − i) · depth_max`` (layers · n² · d / 2).

        ``"auto"`` takes the cheaper, weighting a forward pass ×1.8 (measured: per token-layer
        a batched forward ran at 17k/s and a batched backward row at 30k/s on 2 CPU cores):
        forward for short prompts and many layers, reverse for long prompts, and reverse
        whenever user hooks are on (they may index absolute positions).
        """
        hooks = list(hooks or block_outputs(self.model))
        pos = self._resolve(None, pos)[1]
        for hook in hooks:
            self._resolve(hook, pos)
        todo = [h for h in hooks if (h, pos, False, INPUT_HOOK) not in self._jacobians]
        if method not in ("auto", "forward", "reverse"):
            raise ValueError(f"method must be 'auto', 'forward' or 'reverse', got {method!r}")
        if todo and method == "auto":
            method = "reverse" if self.point.fwd_hooks else self._cheaper(todo, pos)
        if todo and method == "forward":
            def apply(start: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
                out = self.point.replay(x, todo, start=start, at=pos - start)
                return {h: v.reshape(x.shape[0], -1) for h, v in out.items()}

            # balanced batches of at most 160 directions: measured on SmolLM2 at 8 tokens,
            # 144 per batch took 39 s / 472 MB, 256 per batch 37 s / 812 MB
            d_in = self.x.shape[-1]
            cap = math.ceil(d_in / math.ceil(d_in / 160))
            chunk = chunk_rows(d_in, self._row_bytes() // 2, self.max_memory, cap=cap)
            with analysis_mode(self.model):
                dead = self.point.dead_linears(todo)
            with analysis_mode(self.model), biases_zeroed(self.model), linears_skipped(dead):
                found = forward_jacobians(apply, *self.x.shape, pos, chunk, self.x, self.progress)
            for h, jac in found.items():
                self._jacobians[(h, pos, False, INPUT_HOOK)] = jac
        return {h: self.jacobian(h, pos) for h in hooks}

    def _width(self, hook: str, pos: int) -> int:
        """Output size of a hook, without filling the full activation cache for it."""
        if hook == self.output or hook.rsplit(".", 1)[-1] in RESIDUAL_WIDTH_HOOKS:
            return self.model.cfg.d_model
        return self.activation(hook, pos).numel()

    def _cheaper(self, hooks: Sequence[str], pos: int) -> str:
        """Pick the engine by counted token-layer passes (see :meth:`jacobians`)."""
        n, d_in = self.x.shape
        depth = {h: (layer_of(h) + 1 if layer_of(h) is not None else self.model.cfg.n_layers) for h in hooks}
        reverse = sum(depth[h] * self._width(h, pos) for h in hooks) * n
        suffixes = sum(n - i for i in range(pos + 1))
        forward = FORWARD_PASS_COST * d_in * suffixes * max(depth.values())
        return "forward" if forward < reverse else "reverse"

    def layerwise_jacobian(self, layer: int, pos: int | None = None,
                           cumulative: bool = False) -> Float[torch.Tensor, "pos_in d_model d_model"]:
        """The map of block ``layer`` from its input residual stream (every position) to its
        output at ``pos``; with ``cumulative``, the map from the input embeddings up to it."""
        layer = normalize_index(layer, self.model.cfg.n_layers)
        out = f"blocks.{layer}.hook_resid_post"
        return self.jacobian(out, pos, source=None if cumulative else f"blocks.{layer}.hook_resid_pre")

    def _plain_fn(self, hook: str, pos: int):
        def fn(x: torch.Tensor) -> torch.Tensor:
            out: dict[str, torch.Tensor] = {}
            hooks: list[Hook] = [(INPUT_HOOK, lambda v, hook: x.unsqueeze(0).to(v.dtype)),
                                 (hook, lambda v, hook: out.__setitem__("y", v))]
            with hooks_on(self.model, self.point.fwd_hooks + hooks):
                self.model(self.tokens)
            return out["y"][0, pos].reshape(-1)
        return fn

    # ---- decomposition -----------------------------------------------------------------
    def bias_term_at(self, hook: str | None = None, pos: int | None = None) -> Float[torch.Tensor, "d_out"]:
        """``F(0)``: the biases' total contribution to ``hook`` at ``pos``."""
        hook, pos = self._resolve(hook, pos)
        return self.point.bias_term([hook])[hook][pos].reshape(-1)

    @property
    def bias_term(self) -> Float[torch.Tensor, "d_out"]:
        """The biases' contribution to the default output (zero for bias-free models)."""
        return self.bias_term_at()

    def bias_contributions(self, hook: str | None = None, pos: int | None = None) -> dict[str, torch.Tensor]:
        """``bias_term`` split exactly into one vector per bias parameter (plus ``"(other)"``)."""
        hook, pos = self._resolve(hook, pos)
        return {k: v[pos].reshape(-1) for k, v in self.point.bias_contributions(hook).items()}

    def contributions(self, hook: str | None = None, pos: int | None = None,
                      by: str = "position") -> Float[torch.Tensor, "pos_in d_out"] | dict[str, torch.Tensor]:
        """Exact additive parts of the activation at ``hook[pos]``; with the bias term they sum to it.

        ``by="position"``: ``J_i x_i`` per input position, ``[pos_in, d_out]`` (add
        :meth:`bias_term_at`). ``by="component"``: for a residual-stream hook or the output,
        ``{"embed", "blocks.L.attn", "blocks.L.mlp", ..., "bias"}``: each component's own output
        at ``pos`` (the direct path), carried through the frozen final norm for the output;
        ``"bias"`` is what the final norm adds.
        """
        if by == "position":
            return torch.einsum("pod,pd->po", self._jacobian(hook, pos, False), self.x)
        if by != "component":
            raise ValueError(f"by must be 'position' or 'component', got {by!r}")
        hook, pos = self._resolve(hook, pos)
        n_layers = self.model.cfg.n_layers
        if hook == self.output:
            upto, lens = n_layers, self._readout(f"blocks.{n_layers - 1}.hook_resid_post", pos)
        elif layer_of(hook) is not None and hook.rsplit(".", 1)[-1] in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post"):
            upto, lens = layer_of(hook) + (hook.endswith("post")), None
        else:
            raise ValueError(f"by='component' needs a residual-stream hook (hook_resid_pre/mid/post) or "
                             f"the output {self.output!r}, got {hook!r}")
        names = [("embed", INPUT_HOOK)]
        for layer in range(upto):
            names += [(f"blocks.{layer}.attn", f"blocks.{layer}.hook_attn_out"),
                      (f"blocks.{layer}.mlp", f"blocks.{layer}.hook_mlp_out")]
        if hook.endswith("hook_resid_mid"):
            names.append((f"blocks.{upto}.attn", f"blocks.{upto}.hook_attn_out"))
        parts = {label: self.activations[name][0, pos] for label, name in names}
        resid = sum(parts.values())
        target = self.activation(f"blocks.{n_layers - 1}.hook_resid_post" if lens is not None else hook, pos)
        if relative_error(resid, target) > 10 * tolerance(self.x.dtype):
            raise ValueError(f"the residual stream of {self.model.cfg.model_name} is not the sum of "
                             f"hook_embed/hook_attn_out/hook_mlp_out (relative error "
                             f"{relative_error(resid, target):.1e}): a component decomposition would be wrong here")
        if lens is None:
            return {**parts, "bias": torch.zeros_like(resid)}
        out = {label: lens @ v for label, v in parts.items()}
        out["bias"] = self.activation(hook, pos) - lens @ target
        return out

    def reconstruction(self, hook: str | None = None, pos: int | None = None, plain: bool = False) -> torch.Tensor:
        """``Σ_i J_i x_i + bias_term`` (with the plain Jacobian if ``plain``)."""
        jac = self._jacobian(hook, pos, plain)
        return torch.einsum("pod,pd->o", jac, self.x) + self.bias_term_at(hook, pos)

    def reconstruction_error(self, hook: str | None = None, pos: int | None = None, plain: bool = False) -> float:
        """``std(reconstruction − y) / std(y)``: ~1e-7 detached in float32, O(1) plain."""
        return relative_error(self.reconstruction(hook, pos, plain), self.activation(hook, pos))

    def check(self, hook: str | None = None, pos: int | None = None) -> float:
        """Raise :class:`LinearizationError` unless every frozen coefficient provably reaches
        the output and the reconstruction is exact for the dtype; returns the error."""
        ignored = self.point.ignored_sites()
        if ignored:
            layer = self.point.sites[[s.name for s in self.point.sites].index(ignored[0])].layer
            raise LinearizationError(
                f"{len(ignored)} frozen coefficient(s) never reach the output, first {ignored[0]}: "
                f"the model reads that value before the hook fires (TransformerLens' bridge fires "
                f"hook_pattern after the attention has used it on some architectures), so "
                f"freezing it there is silently ignored. Ignored: {', '.join(ignored[:6])}"
                f"{' ...' if len(ignored) > 6 else ''}.", layer=layer)
        err = self.reconstruction_error(hook, pos)
        tol = tolerance(self.x.dtype)
        if not err <= tol:
            layer, layer_err = self.point.locate_break(tol)
            where = (f"linearity first breaks at blocks.{layer} (affinity error {layer_err:.2e})"
                     if layer is not None else "every block's replay is affine, so the Jacobian path disagrees with replay")
            raise LinearizationError(
                f"the detached Jacobian does not reconstruct {hook or self.output} (relative error "
                f"{err:.2e} > {tol:.0e}): {where}. A nonlinearity is not frozen there: a user hook, "
                f"or a component without a freezing rule (MoE router, attention pattern the model "
                f"reads before hook_pattern fires).", layer=layer, error=err)
        return err

    # ---- SVD, decoding, dimensionality ------------------------------------------------
    def svd_matrix_free(self, hook: str | None = None, pos: int | None = None, position: int | str = "all",
                        k: int = 3, **kwargs: Any) -> "MatrixFreeSVD":
        """Top-``k`` singular triplets from replay products only (no Jacobian is formed):
        see :func:`lens_linear.matfree.matrix_free_svd`."""
        from lens_linear.matfree import matrix_free_svd

        return matrix_free_svd(self, hook, pos, position, k, **kwargs)

    @functools.cached_property
    def attention(self) -> AttentionCircuits:
        """Attention circuits at this operating point: frozen patterns, per-head OV/QK
        ``FactoredMatrix`` circuits, token-to-token Jacobians and their QK term."""
        return AttentionCircuits(self)

    def attention_jacobian(self, layer: int, query_pos: int, key_pos: int, head: int | None = None,
                           include_norm: bool = False) -> FactoredMatrix:
        """``Σ_h A[h, q, k] W_V^h W_O^h``: see :meth:`AttentionCircuits.jacobian`."""
        return self.attention.jacobian(layer, query_pos, key_pos, head, include_norm)

    def svd(self, hook: str | None = None, position: int | str = "all", k: int | None = None,
            pos: int | None = None) -> SVDResult:
        """SVD of the Jacobian of ``hook`` at output ``pos``: for one input ``position``, or
        for all input positions side by side (``"all"``). ``k`` triplets (default 10)."""
        hook, pos = self._resolve(hook, pos)
        jac = self.jacobian(hook, pos)
        if position != "all":
            position = normalize_position(position, self.n_pos, "position")
        return decode.svd(jac, hook, position, k, self.activation(hook, pos))

    def _readout(self, hook: str, pos: int) -> torch.Tensor | None:
        """The frozen final norm's linear map at ``pos`` (``[d_model, d_model]``), to read an
        intermediate residual the way the output is read (a logit lens on the frozen map)."""
        if hook == self.output:
            return None
        final_resid = f"blocks.{self.model.cfg.n_layers - 1}.hook_resid_post"
        return self.jacobian(self.output, pos, source=final_resid)[pos]

    def decode(self, hook: str | None = None, position: int | str = "all", k: int = 3, n: int = 5,
               readout: bool = True, pos: int | None = None) -> list[Direction]:
        """The top ``k`` singular triplets as tokens: left vectors through the unembedding
        (after the frozen final norm when ``readout`` and ``hook`` is an intermediate residual),
        right vectors as the nearest input-token embeddings."""
        hook, pos = self._resolve(hook, pos)
        result = self.svd(hook, position, k, pos)
        decode.check_output_space(self.model, result.U.shape[0], hook)
        lens = self._readout(hook, pos) if readout else None
        out = []
        for j in range(result.S.shape[0]):
            u = result.U[:, j] if lens is None else lens @ result.U[:, j]
            # all positions: read the right vector at the input position where it is largest
            where = position if position != "all" else int(result.V[:, :, j].norm(dim=-1).argmax())
            v = result.V[0 if position != "all" else where, :, j]
            out.append(Direction(j, float(result.S[j]), decode.output_tokens(self.model, u, n),
                                 decode.input_tokens(self.model, v, n), where))
        return out

    def top_rows(self, position: int, hook: str | None = None, n_rows: int = 3, n: int = 5,
                 pos: int | None = None) -> list[Direction]:
        """Rows of largest norm of input ``position``'s Jacobian: the input features that
        the most strongly driven output units select for, as nearest input tokens."""
        hook, pos = self._resolve(hook, pos)
        jac = self.jacobian(hook, pos)[normalize_position(position, self.n_pos, "position")]
        norms = jac.norm(dim=1)
        idx = norms.topk(min(n_rows, len(norms))).indices
        return [Direction(int(i), float(norms[i]), None, decode.input_tokens(self.model, jac[i], n)) for i in idx]

    def top_columns(self, position: int, hook: str | None = None, n_cols: int = 3, n: int = 5,
                    pos: int | None = None) -> list[Direction]:
        """Columns of largest norm of input ``position``'s Jacobian, read through the unembedding."""
        hook, pos = self._resolve(hook, pos)
        jac = self.jacobian(hook, pos)[normalize_position(position, self.n_pos, "position")]
        decode.check_output_space(self.model, jac.shape[0], hook)
        norms = jac.norm(dim=0)
        idx = norms.topk(min(n_cols, len(norms))).indices
        return [Direction(int(i), float(norms[i]), decode.output_tokens(self.model, jac[:, i], n), None) for i in idx]

    def _gram(self, hook: str | None, position: int | str, pos: int | None) -> Float[torch.Tensor, "d_out d_out"]:
        """``J Jᵀ`` in float64: its top eigenpairs are the top singular pairs (``σ² , u``),
        from a ``d_out × d_out`` matrix instead of an SVD of the wide ``d_out × pos·d_in`` one."""
        jac = self.jacobian(hook, pos)
        mat = (jac.permute(1, 0, 2).reshape(jac.shape[1], -1) if position == "all"
               else jac[normalize_position(position, self.n_pos, "position")]).double()
        return mat @ mat.T

    def stable_rank(self, hook: str | None = None, position: int | str = "all", pos: int | None = None) -> float:
        """``‖J‖_F² / ‖J‖_2²`` of the Jacobian (one input position or all side by side)."""
        gram = self._gram(hook, position, pos)
        return float(gram.trace() / torch.linalg.eigvalsh(gram)[-1])

    def spectra(self, hooks: Sequence[str], position: int | str = "all",
                pos: int | None = None) -> dict[str, torch.Tensor]:
        """Normalized singular value spectra (``S / S[0]``) of several hooks' Jacobians,
        computed together (e.g. every layer's ``hook_attn_out``, ``hook_mlp_out``, ``hook_resid_post``)."""
        self.jacobians(hooks, pos)
        return {h: (lambda s: s / s[0])(self.svd(h, position, 1, pos).spectrum) for h in hooks}

    def alignment(self, hooks: Sequence[str] | None = None, reference: str | None = None, k: int = 3,
                  pos: int | None = None) -> Float[torch.Tensor, "n_hooks k"]:
        """``|⟨u_j(hook), u_j(reference)⟩|`` for the top ``k`` left singular vectors of each
        hook's all-positions Jacobian against the reference's (default: the last layer's
        residual): how early the final layer's leading directions appear (paper fig. 6B)."""
        hooks = list(hooks or block_outputs(self.model))
        reference = reference or hooks[-1]
        self.jacobians([*hooks, reference], pos)
        top = lambda h: torch.linalg.eigh(self._gram(h, "all", pos)).eigenvectors[:, -k:].flip(-1)  # noqa: E731
        ref = top(reference)
        return torch.stack([(top(h) * ref).sum(0).abs() for h in hooks]).to(self.x.dtype)

    def _repr_html_(self) -> str:
        """Notebook summary: prediction, reconstruction errors, token contributions."""
        from lens_linear.render import summary_html

        return summary_html(self)

    def __repr__(self) -> str:
        top = self.top_predictions(1)[0]
        return (f"LinearCache({self.model.cfg.model_name}, {self.n_pos} tokens, pos={self.pos}, "
                f"output={self.output!r}, top={top.token!r} p={top.prob:.3f}, "
                f"jacobians cached={len(self._jacobians)})")


def run_with_linear_cache(
    model: Any,
    input: str | torch.Tensor,
    pos: int = -1,
    parts: Sequence[str] = PARTS,
    fwd_hooks: Sequence[Hook] = (),
    prepend_bos: bool | None = None,
    check: bool = True,
    names_filter: Any = None,
    max_memory: int = DEFAULT_MEMORY,
    progress: bool = True,
) -> LinearCache:
    """Record the operating point of one input and return its :class:`LinearCache`.

    Args:
        model: a ``TransformerBridge`` or ``HookedTransformer``; returned untouched.
        input: a prompt or one sequence of token ids.
        pos: the output position the Jacobians describe (negative counts from the end).
        parts: which nonlinearities to freeze (``"norm"``, ``"attn"``, ``"mlp"``).
        fwd_hooks: your own hooks, active in the recording and in every replay.
        check: compute the final output's Jacobian now and raise
            :class:`LinearizationError` unless it reconstructs the output exactly.
        names_filter: which activations the ``ActivationCache`` keeps (as ``run_with_cache``);
            by default all of them, recorded on first access to ``lcache.activations``.
        max_memory: bytes of backward intermediates per batched-VJP chunk.
        progress: show progress bars (notebook-aware) while Jacobians are computed.

    Example:
        >>> lcache = run_with_linear_cache(model, "The bridge out of Marin is the")
        >>> lcache.reconstruction_error()  # ~1e-7 in float32
    """
    require_tl_model(model)
    tokens = to_tokens(model, input, prepend_bos)
    pos = normalize_position(pos, tokens.shape[-1])
    keep = _with_output(names_filter, output_hook(model))
    with analysis_mode(model):
        point, logits, activations = OperatingPoint.record(model, tokens, parts, fwd_hooks, keep)
    lcache = LinearCache(model, point, logits, activations, pos, max_memory, progress,
                         complete=names_filter is not None)
    if check:
        lcache.check()
    return lcache


def _with_output(names_filter: Any, output: str) -> Any:
    """A ``names_filter`` that always keeps the default output (needed for reconstruction);
    none given: only the output, the full cache is filled when first asked for."""
    if names_filter is None:
        return [output]
    if isinstance(names_filter, str):
        names_filter = [names_filter]
    if callable(names_filter):
        return lambda name: name == output or names_filter(name)
    return list({*names_filter, output})
