"""LinearCache: detached Jacobians of one input, next to the ordinary ActivationCache.

A thin façade: the operating point (:mod:`lens_linear.hooks`) holds the frozen map, the
engines (:mod:`lens_linear.jacobian`, :mod:`lens_linear.matfree`) compute, and
:mod:`lens_linear.decode` and :mod:`lens_linear.attention` read results. The cache keys
Jacobians and keeps the vocabulary of every signature:

* ``hook`` — the output hook (default: the final-normed residual, the unembedding's input);
  a full name or an ``ActivationCache`` shorthand such as ``("resid_post", 3)``;
* ``pos`` — the output position (default: the cache's own, ``lcache.pos``);
* ``input_hook`` / ``input_pos`` — where the input variable sits (default: the embeddings,
  ``blocks.0.hook_resid_pre``) and which input position (or ``"all"`` side by side);
* ``detached`` — the frozen map's Jacobian (``True``) or the ordinary one (``False``);
* ``n_triplets`` — singular triplets; ``n_tokens`` — tokens shown per vector.

Every Jacobian is ``[pos_in, d_out, d_in]`` and acts on column vectors: ``y = Σ_i J[i] @ x_i + c``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from jaxtyping import Float
from transformer_lens import FactoredMatrix

from lens_linear import decode
from lens_linear._validation import (
    LinearizationError,
    check_dtype,
    hook_name,
    normalize_index,
    normalize_position,
    relative_error,
    require_tl_model,
    tolerance,
)
from lens_linear.attention import AttentionCircuits
from lens_linear.decode import Direction, SVDResult
from lens_linear.hooks.contexts import HALF, analysis_mode, biases_zeroed, linears_skipped
from lens_linear.hooks.operating_point import OperatingPoint, checks_whole_prompt
from lens_linear.hooks.run import Hook, run_to
from lens_linear.hooks.sites import (
    INPUT_HOOK,
    PARTS,
    block_outputs,
    components_without_sites,
    layer_of,
    output_hook,
)
from lens_linear.hooks.verify import centred_projections, projected_error, seeded_randn
from lens_linear.jacobian import batched_vjp_jacobian, cheaper_engine, forward_jacobians
from lens_linear.jacobian_lens import prompt_transports, readout_functional, source_layer
from lens_linear.matfree import MatrixFreeSVD, matrix_free_svd
from lens_linear.memory import budget, chunk_size, release_freed_memory, sequence_bytes
from lens_linear.tokens import model_dtype, single_token, to_tokens, token_strings


@dataclass(frozen=True)
class Prediction:
    token: str
    token_id: int
    prob: float


@dataclass(frozen=True)
class PositionNorms:
    """``values[i] = ‖J_i x_i‖²``: how much input position ``i`` contributes to one output;
    ``stderr`` where the values are an estimate."""

    values: Float[torch.Tensor, "pos_in"]  # noqa: F821
    stderr: Float[torch.Tensor, "pos_in"] | None = None  # noqa: F821


N_PROJECTIONS = 8  # random projections that verify a reconstruction (see LinearCache.check)
WIDE_TOLERANCE = 1e-4  # affinity error of a half-precision model's frozen map replayed in float32
RESIDUAL_WIDTH_HOOKS = (
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
)
HookKey = str | tuple  # a hook name or an ActivationCache shorthand


class LinearCache:
    """Detached Jacobians of one input sequence, computed lazily and memoized.

    ``lcache[hook]`` is the Jacobian ``[pos_in, d_out, d_in]`` of that activation at the
    cache's output position ``pos`` with respect to the input variable
    (``blocks.0.hook_resid_pre`` at every position); ``hook`` may be an ``ActivationCache``
    shorthand (``lcache["resid_post", 3]``). The ordinary ``ActivationCache``, the operating
    point, tokens and logits are kept alongside.
    """

    def __init__(
        self,
        model: Any,
        point: OperatingPoint,
        logits: torch.Tensor,
        activations: Any,
        pos: int,
        max_memory: int | None = None,
        progress: bool = False,
        complete: bool = False,
    ):
        self.model = model
        self.point = point
        self.tokens = point.tokens
        self.logits: Float[torch.Tensor, "pos d_vocab"] = logits[0]
        self._recorded = activations
        self._complete = complete
        self.pos = pos
        self.output = output_hook(model)
        self.max_memory = max_memory
        self.progress = progress
        self._jacobians: dict[tuple[str, int, bool, str], torch.Tensor] = {}
        self._lens: dict[tuple, Any] = {}  # this input's Jacobian-lens transports
        self._check_graph: tuple[torch.Tensor, torch.Tensor] | None = (
            None  # see check(): used by one Jacobian
        )
        self._upcast = (
            point.x_star.dtype != logits.dtype
        )  # computing a half model's frozen map wider

    # ---- basic facts -------------------------------------------------------------------
    @property
    def n_pos(self) -> int:
        return self.tokens.shape[-1]

    @property
    def str_tokens(self) -> list[str]:
        return token_strings(self.model, self.tokens[0])

    @property
    def x(self) -> Float[torch.Tensor, "pos d_model"]:
        """The input variable at the operating point (``blocks.0.hook_resid_pre``)."""
        return self.point.x_star

    @property
    def activations(self) -> Any:
        """The ``ActivationCache`` of the recorded forward pass (coefficients frozen, which
        leaves every value unchanged): the hooks ``names_filter`` kept, or, without one, every
        hook, filled on first use by running the recording again (a Jacobian alone never pays
        for caching every hook)."""
        return self._recorded if self._complete else self.point.activations

    def activation(self, hook: HookKey | None = None, *, pos: int | None = None) -> torch.Tensor:
        """The activation at ``hook`` and output position (trailing dims flattened): the
        recorded one, or, when computing wider than the model (``dtype=``), the frozen map's
        value at ``x*`` in that dtype (the model's own differs by :meth:`model_rounding`)."""
        hook, pos = self._resolve(hook, pos)
        cache = (
            self._recorded
            if hook in self._recorded and not self._upcast
            else self.point.activations
        )
        return cache[hook][0, pos].reshape(-1)

    def model_rounding(self, hook: HookKey | None = None, *, pos: int | None = None) -> float:
        """``std(y_model − F(x*)) / std(F(x*))``: how far the model's own (half-precision)
        output is from its frozen map computed in the cache's dtype; 0 without ``dtype=``."""
        hook, pos = self._resolve(hook, pos)
        if not self._upcast:
            return 0.0
        recorded = self._recorded if hook in self._recorded else None
        if recorded is None:
            with analysis_mode(self.model), torch.no_grad():
                y = run_to(
                    self.model, self.tokens, self.point.hooks("record"), capture=[hook], pos=pos
                )[hook]
        else:
            y = recorded[hook][:, pos]
        return relative_error(y[0].reshape(-1), self.activation(hook, pos=pos))

    def top_predictions(self, n_tokens: int = 5, *, pos: int | None = None) -> list[Prediction]:
        """The ``n_tokens`` most likely next tokens at ``pos`` with their probabilities."""
        _, pos = self._resolve(None, pos)
        top = self.logits[pos].double().softmax(-1).topk(n_tokens)
        names = token_strings(self.model, top.indices)
        return [Prediction(t, int(i), float(p)) for t, p, i in zip(names, top.values, top.indices)]

    # ---- Jacobians ---------------------------------------------------------------------
    def _resolve(self, hook: HookKey | None, pos: int | None) -> tuple[str, int]:
        hook = self.output if hook is None else hook_name(self.model, hook)
        return hook, normalize_position(self.pos if pos is None else pos, self.n_pos)

    def _row_bytes(self) -> int:
        """Bytes one backward row (or one forward direction) keeps alive."""
        return sequence_bytes(self.model.cfg, self.n_pos, self.x.dtype)

    def jacobian(
        self,
        hook: HookKey | None = None,
        *,
        pos: int | None = None,
        input_hook: HookKey | None = None,
        detached: bool = True,
    ) -> Float[torch.Tensor, "pos_in d_out d_in"]:
        """Jacobian of ``hook`` at output position ``pos`` w.r.t. the input at every position.

        ``detached`` (default): the frozen map's Jacobian J⁺, which reconstructs the
        activation; ``False``: the ordinary Jacobian (nothing frozen), for comparison.
        ``input_hook`` (default: the input embeddings, ``blocks.0.hook_resid_pre``) may be any
        earlier hook, e.g. ``blocks.3.hook_resid_pre``: the Jacobian is then that of the frozen
        map from there on. One forward, then chunked batched VJPs; memoized.
        """
        hook, pos = self._resolve(hook, pos)
        input_hook = INPUT_HOOK if input_hook is None else hook_name(self.model, input_hook)
        key = (hook, pos, detached, input_hook)
        if key not in self._jacobians:
            graph = None
            if detached and hook == self.output and input_hook == INPUT_HOOK:
                graph, self._check_graph = (
                    self._check_graph,
                    None,
                )  # the check's graph serves one Jacobian
            with self.point.computing(), analysis_mode(self.model), torch.enable_grad():
                if (
                    graph is not None
                ):  # the check's whole-prompt replay at x*: its forward is already done
                    y, x = graph[0][pos], graph[1]
                else:
                    x = (
                        self.x
                        if input_hook == INPUT_HOOK
                        else self.point.activations[input_hook][0]
                    ).detach()
                    x = x.clone().requires_grad_(True)
                    y = (
                        self.point.replay(x, [hook], input_hook=input_hook, pos=pos)[hook]
                        if detached
                        else self._ordinary(x, hook, pos, input_hook)
                    )[0]
                y = y.reshape(-1)
                chunk = chunk_size(y.numel(), self._row_bytes(), self.max_memory, device=x.device)
                self._jacobians[key] = batched_vjp_jacobian(y, x, chunk, self.progress).detach()
        return self._jacobians[key]

    def __getitem__(self, hook: HookKey) -> Float[torch.Tensor, "pos_in d_out d_in"]:
        return self.jacobian(hook)

    def is_computed(
        self, hook: HookKey | None = None, *, pos: int | None = None, detached: bool = True
    ) -> bool:
        """Whether that Jacobian (from the input embeddings) is already in the cache."""
        hook, pos = self._resolve(hook, pos)
        return (hook, pos, detached, INPUT_HOOK) in self._jacobians

    def jacobians(
        self,
        hooks: Sequence[HookKey] | None = None,
        *,
        pos: int | None = None,
        method: str = "auto",
    ) -> dict[str, Float[torch.Tensor, "pos_in d_out d_in"]]:
        """Detached Jacobians of many hooks at once (default: every ``hook_resid_post``).

        Two engines (see :func:`lens_linear.jacobian.cheaper_engine` for their counted cost):
        ``"reverse"``, one batched-VJP Jacobian per hook, and ``"forward"``, one replay per
        input direction with every hook read off the same pass. ``"auto"`` takes the cheaper:
        forward for short prompts and many layers, reverse for long prompts, and reverse
        whenever user hooks are on (they may index absolute positions).
        """
        pos = self._resolve(None, pos)[1]
        hooks = [self._resolve(h, pos)[0] for h in (hooks or block_outputs(self.model))]
        todo = [h for h in hooks if (h, pos, True, INPUT_HOOK) not in self._jacobians]
        if method not in ("auto", "forward", "reverse"):
            raise ValueError(f"method must be 'auto', 'forward' or 'reverse', got {method!r}")
        n, d_in = self.x.shape
        if todo and method == "auto":
            method = self.engine(todo, pos=pos)
        if todo and method == "forward":

            def apply(start: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
                out = self.point.replay(x, todo, start_pos=start, pos=pos - start)
                return {h: v.reshape(x.shape[0], -1) for h, v in out.items()}

            # balanced batches of at most 160 directions: measured on SmolLM2 at 8 tokens,
            # 144 per batch took 39 s / 472 MB, 256 per batch 37 s / 812 MB
            cap = math.ceil(d_in / math.ceil(d_in / 160)) if self.x.device.type == "cpu" else None
            chunk = chunk_size(
                d_in, self._row_bytes() // 2, self.max_memory, cap=cap, device=self.x.device
            )
            with (
                self.point.computing(),
                analysis_mode(self.model),
            ):  # one weight copy for every replay
                dead = self.point.dead_linears(todo)
                with biases_zeroed(self.model), linears_skipped(dead):
                    found = forward_jacobians(apply, n, d_in, pos, chunk, self.x, self.progress)
            for h, jac in found.items():
                self._jacobians[(h, pos, True, INPUT_HOOK)] = jac
        return {h: self.jacobian(h, pos=pos) for h in hooks}

    def engine(self, hooks: Sequence[HookKey] | None = None, *, pos: int | None = None) -> str:
        """The engine :meth:`jacobians` picks for these hooks: ``"forward"`` or ``"reverse"``."""
        pos = self._resolve(None, pos)[1]
        hooks = [self._resolve(h, pos)[0] for h in (hooks or block_outputs(self.model))]
        if self.point.fwd_hooks:
            return "reverse"
        depths = {
            h: layer_of(h) + 1 if layer_of(h) is not None else self.model.cfg.n_layers
            for h in hooks
        }
        widths = {h: self._width(h, pos) for h in hooks}
        return cheaper_engine(depths, widths, *self.x.shape, pos)

    def _width(self, hook: str, pos: int) -> int:
        """Output size of a hook, without filling the full activation cache for it."""
        if hook == self.output or hook.rsplit(".", 1)[-1] in RESIDUAL_WIDTH_HOOKS:
            return self.model.cfg.d_model
        return self.activation(hook, pos=pos).numel()

    def layerwise_jacobian(
        self, layer: int, *, pos: int | None = None, cumulative: bool = False
    ) -> Float[torch.Tensor, "pos_in d_model d_model"]:
        """The map of block ``layer`` from its input residual stream (every position) to its
        output at ``pos``; with ``cumulative``, the map from the input embeddings up to it."""
        layer = normalize_index(layer, self.model.cfg.n_layers)
        out = f"blocks.{layer}.hook_resid_post"
        return self.jacobian(
            out, pos=pos, input_hook=None if cumulative else f"blocks.{layer}.hook_resid_pre"
        )

    # ---- decomposition -----------------------------------------------------------------
    def bias_term(
        self, hook: HookKey | None = None, *, pos: int | None = None
    ) -> Float[torch.Tensor, "d_out"]:  # noqa: F821
        """``F(0)``: the biases' total contribution to ``hook`` at ``pos`` (zero for bias-free models)."""
        hook, pos = self._resolve(hook, pos)
        return self.point.bias_term(hook)[pos].reshape(-1)

    def bias_contributions(
        self, hook: HookKey | None = None, *, pos: int | None = None
    ) -> dict[str, torch.Tensor]:
        """``bias_term`` split exactly into one vector per bias parameter (plus ``"(other)"``)."""
        hook, pos = self._resolve(hook, pos)
        return {k: v[pos].reshape(-1) for k, v in self.point.bias_contributions(hook).items()}

    def contributions(
        self, hook: HookKey | None = None, *, pos: int | None = None, by: str = "position"
    ) -> Float[torch.Tensor, "pos_in d_out"] | dict[str, torch.Tensor]:
        """Exact additive parts of the activation at ``hook[pos]``; with the bias term they sum to it.

        ``by="position"``: ``J_i x_i`` per input position, ``[pos_in, d_out]`` (add
        :meth:`bias_term`). ``by="component"``: for a residual-stream hook or the output,
        ``{"embed", "blocks.L.attn", "blocks.L.mlp", ..., "bias"}``: each component's own output
        at ``pos`` (the direct path), carried through the frozen final norm for the output;
        ``"bias"`` is what the final norm adds.
        """
        if by == "position":
            return torch.einsum("pod,pd->po", self.jacobian(hook, pos=pos), self.x)
        if by != "component":
            raise ValueError(f"by must be 'position' or 'component', got {by!r}")
        hook, pos = self._resolve(hook, pos)
        n_layers = self.model.cfg.n_layers
        if hook == self.output:
            upto, lens = n_layers, self.final_norm_map(pos=pos)
        elif layer_of(hook) is not None and hook.rsplit(".", 1)[-1] in (
            "hook_resid_pre",
            "hook_resid_mid",
            "hook_resid_post",
        ):
            upto, lens = layer_of(hook) + (hook.endswith("post")), None
        else:
            raise ValueError(
                f"by='component' needs a residual-stream hook (hook_resid_pre/mid/post) or "
                f"the output {self.output!r}, got {hook!r}"
            )
        names = [("embed", INPUT_HOOK)]
        for layer in range(upto):
            names += [
                (f"blocks.{layer}.attn", f"blocks.{layer}.hook_attn_out"),
                (f"blocks.{layer}.mlp", f"blocks.{layer}.hook_mlp_out"),
            ]
        if hook.endswith("hook_resid_mid"):
            names.append((f"blocks.{upto}.attn", f"blocks.{upto}.hook_attn_out"))
        parts = {label: self.activations[name][0, pos] for label, name in names}
        resid = sum(parts.values())
        target = self.activation(
            f"blocks.{n_layers - 1}.hook_resid_post" if lens is not None else hook, pos=pos
        )
        if relative_error(resid, target) > 10 * tolerance(self.x.dtype):
            raise ValueError(
                f"the residual stream of {self.model.cfg.model_name} is not the sum of "
                f"hook_embed/hook_attn_out/hook_mlp_out (relative error "
                f"{relative_error(resid, target):.1e}): a component decomposition would be wrong here"
            )
        if lens is None:
            return {**parts, "bias": torch.zeros_like(resid)}
        out = {label: lens @ v for label, v in parts.items()}
        out["bias"] = self.activation(hook, pos=pos) - lens @ target
        return out

    def contribution_norms(
        self,
        hook: HookKey | None = None,
        *,
        pos: int | None = None,
        probes: int | None = None,
        seed: int = 0,
    ) -> PositionNorms:
        """``‖J_i x_i‖²`` for every input position ``i``: exact from the full Jacobian
        (``probes=None``, ``d_out`` VJPs), or, for long prompts, an unbiased estimate from
        ``probes`` Gaussian cotangents ``u`` (``E (uᵀJ_i x_i)² = ‖J_i x_i‖²``), with its standard
        error: ``probes`` VJPs through one replay, whatever the prompt's length."""
        hook, pos = self._resolve(hook, pos)
        if probes is None:
            return PositionNorms(self.contributions(hook, pos=pos).double().pow(2).sum(-1))
        if probes < 2:
            raise ValueError(f"probes must be at least 2 (for a standard error), got {probes}")
        u = seeded_randn((probes, self.activation(hook, pos=pos).numel()), self.x, seed)
        x = self.x.detach().clone().requires_grad_(True)
        with self.point.computing(), analysis_mode(self.model), torch.enable_grad():
            out = self.point.replay(x, [hook], pos=pos)[hook][0].reshape(-1)
            chunk = chunk_size(probes, self._row_bytes(), self.max_memory, device=x.device)
            pulled = batched_vjp_jacobian(
                out, x, chunk, self.progress, cotangents=u
            )  # [pos_in, probes, d_in]
        squares = torch.einsum("pkd,pd->pk", pulled.double(), self.x.double()).pow(2)
        return PositionNorms(squares.mean(1), squares.std(1) / probes**0.5)

    def final_norm_map(self, *, pos: int | None = None) -> Float[torch.Tensor, "d_model d_model"]:
        """The frozen final norm at ``pos`` as a Jacobian (last residual stream → output), to
        read an intermediate residual the way the output is read (a logit lens on the frozen map)."""
        _, pos = self._resolve(None, pos)
        final_resid = f"blocks.{self.model.cfg.n_layers - 1}.hook_resid_post"
        return self.jacobian(self.output, pos=pos, input_hook=final_resid)[pos]

    # ---- the Jacobian lens of this input --------------------------------------------------
    def transport(
        self, layer: int, *, skip_first_positions: int = 0
    ) -> Float[torch.Tensor, "d_model d_model"]:
        """This input's own Jacobian-lens transport from the output of block ``layer`` to the
        last block's output, through its frozen map: ``(1/|V|) Σ_{t∈V} Σ_{t'∈V} J⁺_{t'←t}``
        over the valid positions ``V`` (the first ``skip_first_positions`` and the last left
        out), float64, verified. It is the matrix ``fit_jacobian_lens(model, [this input],
        detached=True, source_layers=[layer])`` averages over prompts; memoized."""
        return self.transports([layer], skip_first_positions=skip_first_positions)[
            source_layer(self.model, layer)
        ]

    def transports(
        self, layers: Sequence[int] | None = None, *, skip_first_positions: int = 0
    ) -> dict[int, Float[torch.Tensor, "d_model d_model"]]:
        """:meth:`transport` of several layers (default every layer below the last) from one
        set of backward passes: every source layer is read off the same rows."""
        layers = sorted(
            {source_layer(self.model, k) for k in layers or range(self.model.cfg.n_layers - 1)}
        )
        todo = [k for k in layers if ("transport", k, skip_first_positions) not in self._lens]
        if todo:
            if self.n_pos <= skip_first_positions + 1:
                raise ValueError(
                    f"this input has {self.n_pos} tokens: none is valid with "
                    f"skip_first_positions={skip_first_positions} (the last is always left out)"
                )
            found = prompt_transports(
                self.model,
                self.tokens,
                todo,
                detached=True,
                skip_first_positions=skip_first_positions,
                max_memory=self.max_memory,
                progress=self.progress,
                point=self.point,
            )
            for k, matrix in found.items():
                self._lens[("transport", k, skip_first_positions)] = matrix
        return {k: self._lens[("transport", k, skip_first_positions)] for k in layers}

    def lens_contributions(
        self,
        layer: int,
        token: int | str,
        *,
        lens: Any = None,
        pos: int | None = None,
        by: str = "component",
    ) -> dict[str, float] | Float[torch.Tensor, "pos_in"]:  # noqa: F821
        """This input's Jacobian-lens readout of ``token`` at ``pos`` from block ``layer``,
        split exactly: the logit (before any output transform: logit scale, soft cap) that ``lens`` (a fitted
        ``JacobianLens``; default this input's own :meth:`transport`) reads from the residual
        ``h`` there, with the final norm frozen at the transported vector ``T h``.

        ``by="component"``: ``{"embed", "L{k}H{h}", "blocks.k.attn.b_O", "blocks.k.mlp", ...,
        "readout bias"}``, each component's direct write to ``h`` read through the lens: each
        head ``z_h W_O^h`` where the heads add up to the layer's attention output (else the
        layer whole, ``"blocks.k.attn"``); ``"readout bias"`` is what the final norm and
        unembedding add. ``by="position"``: ``[pos_in]``, the frozen map's
        per-input-token parts ``J⁺_i x_i`` of ``h`` read through the lens, then one last entry:
        the frozen map's bias term read through the lens plus the readout's own bias; the
        entries sum to the logit.
        Either sums to the readout to the dtype's precision, or :class:`LinearizationError`."""
        _, pos = self._resolve(None, pos)
        layer = source_layer(self.model, layer)
        if isinstance(token, str):
            token = single_token(self.model, token)
        hook = f"blocks.{layer}.hook_resid_post"
        matrix = self.transport(layer) if lens is None else lens.jacobians[layer].double()
        h = self.activation(hook, pos=pos).double()
        g, constant = readout_functional(self.model, matrix.to(h.device) @ h, token)
        read = g @ matrix.to(h.device)  # the readout as a functional of h
        if by == "component":
            parts = self._heads_split(self.contributions(hook, pos=pos, by="component"), pos)
            out = {label: float(read @ v.double()) for label, v in parts.items() if label != "bias"}
            out["readout bias"] = constant
        elif by == "position":
            parts = self.contributions(hook, pos=pos, by="position").double()
            bias = self.bias_term(hook, pos=pos).double()
            out = torch.cat([parts @ read, (read @ bias)[None] + constant])
        else:
            raise ValueError(f"by must be 'component' or 'position', got {by!r}")
        total = sum(out.values()) if isinstance(out, dict) else float(out.sum())
        expected = float(read @ h) + constant
        err = abs(total - expected) / max(abs(expected), float(read.abs() @ h.abs()), 1e-30)
        if not err <= tolerance(self.x.dtype):
            raise LinearizationError(
                f"the lens readout's parts do not add up to it at {hook}[{pos}] (relative "
                f"error {err:.2e} > {tolerance(self.x.dtype):.0e})",
                layer=layer,
                error=err,
            )
        return out

    def _heads_split(self, parts: dict[str, torch.Tensor], pos: int) -> dict[str, torch.Tensor]:
        """Each attention layer's part split per head (``L{k}H{h}``: ``z_h W_O^h``, plus
        ``blocks.{k}.attn.b_O``) where those add up to it: not where a norm or scale follows
        the heads' sum (post-norm blocks), which keep the layer's part whole."""
        out: dict[str, torch.Tensor] = {}
        for label, part in parts.items():
            k = layer_of(label)
            attn = getattr(self.model.blocks[k], "attn", None) if k is not None else None
            z_name = f"blocks.{k}.attn.hook_z"
            if (
                not label.endswith(".attn")
                or getattr(attn, "W_O", None) is None
                or z_name not in self.model.hook_dict
            ):
                out[label] = part
                continue
            z = self.activations[z_name][0, pos].double()  # [head, d_head]
            heads = torch.einsum("hd,hdm->hm", z, attn.W_O.double().to(z.device))
            bias = getattr(attn, "b_O", None)
            bias = torch.zeros_like(heads[0]) if bias is None else bias.double().to(z.device)
            if relative_error(heads.sum(0) + bias, part.double()) > 10 * tolerance(self.x.dtype):
                out[label] = part
                continue
            out.update({f"L{k}H{h}": heads[h] for h in range(heads.shape[0])})
            out[f"blocks.{k}.attn.b_O"] = bias
        return out

    def transport_fraction(
        self, lens: Any, layers: Sequence[int] | None = None, *, skip_first_positions: int = 0
    ) -> dict[int, float]:
        """How much of the corpus ``lens``' transport of this input this input's own map
        explains, per source layer: ``1 − Σ_t ‖(J − T) h_t‖² / Σ_t ‖J h_t‖²`` over the valid
        positions, ``J`` the lens's matrix and ``T`` this input's :meth:`transport` (1: the
        corpus lens moves these residuals exactly as this input's own map does)."""
        layers = lens.source_layers if layers is None else layers
        out = {}
        valid = list(range(skip_first_positions, self.n_pos - 1))
        for layer in layers:
            h = self.activations[f"blocks.{layer}.hook_resid_post"][0, valid].double()
            corpus = h @ lens.jacobians[layer].double().to(h.device).T
            own = (
                h @ self.transport(layer, skip_first_positions=skip_first_positions).to(h.device).T
            )
            out[layer] = 1.0 - float((corpus - own).pow(2).sum() / corpus.pow(2).sum())
        return out

    def reconstruction(
        self, hook: HookKey | None = None, *, pos: int | None = None, detached: bool = True
    ) -> torch.Tensor:
        """``Σ_i J_i x_i + bias_term`` (with the ordinary Jacobian if not ``detached``), summed
        in at least float32: a half-precision Jacobian's sum over every input position and
        dimension would otherwise round (its entries stay as computed). The ordinary Jacobian,
        unless already computed, is not formed: ``Σ_i J_i x_i`` is one Jacobian-vector product
        (two backward passes instead of ``d_out``)."""
        wide = torch.promote_types(self.x.dtype, torch.float32)
        if detached or self.is_computed(hook, pos=pos, detached=False):
            jac = self.jacobian(hook, pos=pos, detached=detached)
            jx = torch.einsum("pod,pd->o", jac.to(wide), self.x.to(wide))
        else:
            jx = self._ordinary_jvp(*self._resolve(hook, pos)).to(wide)
        return jx + self.bias_term(hook, pos=pos).to(wide)

    def _ordinary(
        self, x: torch.Tensor, hook: str, pos: int, input_hook: str = INPUT_HOOK
    ) -> torch.Tensor:
        """``hook[pos]`` of the model itself (nothing frozen, the user's hooks on) with ``x`` at ``input_hook``."""
        return run_to(
            self.model,
            self.tokens,
            self.point.fwd_hooks,
            inject=(input_hook, x[None]),
            capture=[hook],
            pos=pos,
        )[hook]

    def _ordinary_jvp(self, hook: str, pos: int) -> Float[torch.Tensor, "d_out"]:  # noqa: F821
        """``J x*`` for the ordinary Jacobian ``J`` of ``hook[pos]``: the derivative of
        ``u ↦ (Jᵀu)·x*``, which is linear in ``u`` (backward of a backward)."""
        x = self.x.detach().clone().requires_grad_(True)
        with self.point.computing(), analysis_mode(self.model), torch.enable_grad():
            y = self._ordinary(x, hook, pos)[0].reshape(-1)
            u = torch.zeros_like(y, requires_grad=True)
            (g,) = torch.autograd.grad(y, x, grad_outputs=u, create_graph=True)
            (jx,) = torch.autograd.grad(g, u, grad_outputs=x.detach())
        return jx.detach()

    def reconstruction_error(
        self, hook: HookKey | None = None, *, pos: int | None = None, detached: bool = True
    ) -> float:
        """``std(reconstruction − y) / std(y)``: ~1e-7 detached in float32, O(1) otherwise."""
        return relative_error(
            self.reconstruction(hook, pos=pos, detached=detached), self.activation(hook, pos=pos)
        )

    def check(
        self,
        hook: HookKey | None = None,
        *,
        pos: int | None = None,
        n_projections: int = N_PROJECTIONS,
    ) -> float:
        """Raise :class:`LinearizationError` unless every frozen coefficient provably reaches
        the output and the frozen map reconstructs ``hook[pos]`` exactly for the dtype; return
        the relative reconstruction error.

        Cheap by design, a few forwards instead of a full Jacobian's ``d_out`` backward rows:

        * every site reaches the output: one replay at ``x*`` and one backward, with respect to
          a factor on every site (:meth:`OperatingPoint.check_sites`), on the last few positions;
        * the reconstruction ``J⁺x* + F(0)`` against the recorded ``y``, every output dimension at
          every position. On a short prompt
          (:func:`~lens_linear.hooks.operating_point.checks_whole_prompt`) that replay covers the
          whole prompt, and its backward of ``n_projections`` random projections (with respect to
          the input too) checks the reconstruction for no further forward: a wrong reconstruction
          passes with probability 0. Its graph, where it takes at most ``max_memory`` bytes, is
          kept for the first Jacobian of the output, which then needs no forward of its own.
          Otherwise from ``J⁺x*``, carried by the recording in forward mode
          (:meth:`directional_error`): deterministic, no projection. ``F(0)`` costs one more replay only for a model with biases or user
          hooks (without them the frozen map has no constant). Where an operation has no
          forward-mode rule, random projections are checked instead
          (:meth:`projected_reconstruction_error`). Where the full Jacobian is already computed,
          it is used.
        * no constant that no bias explains (a rule holding an input-dependent value constant):
          on a short prompt, from the same backward taken with respect to every bias too;
          otherwise, or where that estimate fails, from one replay with every bias zeroed
          (:meth:`OperatingPoint.unexplained_constant`).
        * a half-precision model's frozen map is also replayed in float32 for affinity
          (4 forwards), where rounding cannot hide a small nonlinearity.
        """
        hook, pos = self._resolve(hook, pos)
        target = (
            None if self._upcast else self._recorded[self.output][0]
        )  # upcast: F(x*) in the point's dtype
        keep = (
            not self._upcast
            and not self.is_computed()
            and self.model.cfg.n_layers * self._row_bytes()
            <= budget(self.max_memory, self.x.device) // 2
        )  # a small graph (no more than a chunk), for the first Jacobian
        sites = self.point.check_sites(
            target if hook == self.output else None, n_projections, keep_graph=keep
        )
        ignored = sites.ignored
        if ignored:
            layer = self.point.sites[[s.name for s in self.point.sites].index(ignored[0])].layer
            raise LinearizationError(
                f"{len(ignored)} frozen coefficient(s) never reach the output, first {ignored[0]}: "
                f"the model reads that value before the hook fires (TransformerLens' bridge fires "
                f"hook_pattern after the attention has used it on some architectures), so "
                f"freezing it there is silently ignored. Ignored: {', '.join(ignored[:6])}"
                f"{' ...' if len(ignored) > 6 else ''}.",
                layer=layer,
            )
        if self.x.dtype in HALF:  # half-precision rounding (~1e-2) would hide a small nonlinearity:
            # test the frozen map's linearity in float32, where its rounding is ~1e-7
            layer, layer_err = self.point.in_dtype(torch.float32).locate_break(WIDE_TOLERANCE)
            if layer is not None:
                raise LinearizationError(
                    f"the frozen map is not linear: replayed in float32 (the model is {self.x.dtype}), "
                    f"linearity first breaks at blocks.{layer} (affinity error {layer_err:.2e} > "
                    f"{WIDE_TOLERANCE:.0e}). A nonlinearity is not frozen there: a user hook, or a component "
                    f"without a freezing rule.",
                    layer=layer,
                    error=layer_err,
                )
        if self.is_computed(hook, pos=pos):
            err = self.reconstruction_error(hook, pos=pos)
        elif sites.error is not None:
            err = sites.error
        else:
            try:
                err = self.directional_error(hook, pos=pos)
            except NotImplementedError:  # an operation without a forward-mode rule
                err = self.projected_reconstruction_error(
                    hook, pos=pos, n_projections=n_projections
                )
        tol = tolerance(self.x.dtype)
        if not err <= tol:
            layer, layer_err = self.point.locate_break(tol)
            where = (
                f"linearity first breaks at blocks.{layer} (affinity error {layer_err:.2e})"
                if layer is not None
                else "every block's replay is affine, so the Jacobian path disagrees with replay"
            )
            bare = (
                components_without_sites(self.model, layer, self.point.sites)
                if layer is not None
                else []
            )
            suspects = (
                f"blocks.{layer}'s {', '.join(bare)} (no freezing rule for its operator: a state-space "
                f"scan, gated convolution or recurrence), or a user hook"
                if bare
                else "a user hook, or a component without a freezing rule"
            )
            raise LinearizationError(
                f"the detached Jacobian does not reconstruct {hook} (relative error {err:.2e} > {tol:.0e}): "
                f"{where}. A nonlinearity is not frozen there: {suspects}.",
                layer=layer,
                error=err,
            )
        explained = sites.unexplained is not None and sites.unexplained <= tol
        if self.point.may_add_constant() and not explained:  # a constant no bias explains: a
            # rule froze too much. The site check's bias gradients clear most models with no
            # replay; otherwise (a rule's constant tied to a bias by value) the bias-free replay
            stray = self.point.unexplained_constant(hook)
            if stray is not None:
                y = self.activation(hook, pos=pos).double()
                size = float(stray[pos].double().norm() / y.norm().clamp_min(1e-300))
                if not size <= tol:
                    raise LinearizationError(
                        f"the frozen map adds a constant to {hook} that no bias explains (relative "
                        f"size {size:.2e} > {tol:.0e}): a value that depends on the input is "
                        f"held constant (a freezing rule that holds an activation's input where "
                        f"its ratio belongs, or a second read of the embeddings not tied to the "
                        f"input), so the Jacobian would miss that dependence.",
                        error=size,
                    )
        self._check_graph = sites.graph  # kept only once the map it holds is verified
        return err

    def directional_error(self, hook: HookKey | None = None, *, pos: int | None = None) -> float:
        """The reconstruction error of ``hook[pos]`` without any Jacobian: ``J⁺x*`` from one
        forward-mode replay, or carried by the recording (:meth:`OperatingPoint.directional`),
        plus ``F(0)``, against the recorded value."""
        hook, pos = self._resolve(hook, pos)
        with self.point.computing(), analysis_mode(self.model):
            jx = self.point.directional(hook, pos=pos).reshape(-1)
        wide = torch.promote_types(jx.dtype, torch.float32)
        if self.point.may_add_constant():
            return relative_error(
                jx.to(wide) + self.bias_term(hook, pos=pos).to(wide), self.activation(hook, pos=pos)
            )
        return relative_error(jx.to(wide), self.activation(hook, pos=pos))

    def projected_reconstruction_error(
        self,
        hook: HookKey | None = None,
        *,
        pos: int | None = None,
        n_projections: int = N_PROJECTIONS,
        seed: int = 0,
    ) -> float:
        """:meth:`reconstruction_error` seen through ``n_projections`` random directions:
        ``‖U(Σ_i J_i x_i + c − y)‖ / ‖U y‖`` with centred Gaussian rows ``U``, from one batched
        backward of ``U`` (``n_projections`` VJPs) and, where the map may add a constant, one
        replay for ``c``; dot products
        accumulated in float64. Without the full Jacobian (see :meth:`check`)."""
        hook, pos = self._resolve(hook, pos)
        y = self.activation(hook, pos=pos)
        u = centred_projections(n_projections, y.shape, y.double(), seed)
        x = self.x.detach().clone().requires_grad_(True)
        with self.point.computing(), analysis_mode(self.model), torch.enable_grad():
            out = self.point.replay(x, [hook], pos=pos)[hook][0].reshape(-1)
            chunk = chunk_size(n_projections, self._row_bytes(), self.max_memory, device=x.device)
            pulled = batched_vjp_jacobian(
                out, x, chunk, cotangents=u
            )  # [pos_in, n_projections, d_in]
        pulled_x = torch.einsum("pkd,pd->k", pulled.double(), self.x.double())
        constant = self.bias_term(hook, pos=pos) if self.point.may_add_constant() else None
        return projected_error(u, pulled_x, constant, y)

    # ---- SVD, decoding, dimensionality ------------------------------------------------
    def svd(
        self,
        hook: HookKey | None = None,
        *,
        pos: int | None = None,
        input_pos: int | str = "all",
        n_triplets: int | None = None,
    ) -> SVDResult:
        """SVD of the Jacobian of ``hook`` at output position ``pos``: for one ``input_pos``, or
        all input positions side by side (``"all"``). ``n_triplets`` (default 10); unpacks as
        ``U, S, V``."""
        hook, pos = self._resolve(hook, pos)
        return decode.svd(
            self.jacobian(hook, pos=pos),
            hook,
            input_pos,
            n_triplets,
            self.activation(hook, pos=pos),
        )

    def svd_matrix_free(
        self,
        hook: HookKey | None = None,
        *,
        pos: int | None = None,
        input_pos: int | str = "all",
        n_triplets: int = 3,
        **kwargs: Any,
    ) -> MatrixFreeSVD:
        """Top ``n_triplets`` of the same SVD from replay products only (no Jacobian is formed):
        see :func:`lens_linear.matfree.matrix_free_svd` for ``tol``, ``block``, ``chunk``."""
        hook, pos = self._resolve(hook, pos)
        kwargs = {"max_memory": self.max_memory, "progress": self.progress, **kwargs}
        return matrix_free_svd(
            self.point, hook, pos=pos, input_pos=input_pos, n_triplets=n_triplets, **kwargs
        )

    def decode(
        self,
        hook: HookKey | None = None,
        *,
        pos: int | None = None,
        input_pos: int | str = "all",
        n_triplets: int = 3,
        n_tokens: int = 5,
        readout: bool = True,
    ) -> list[Direction]:
        """The top singular triplets as tokens: left vectors through the unembedding (after the
        frozen final norm when ``readout`` and ``hook`` is an intermediate residual), right
        vectors as the nearest input-token embeddings.

        The triplets come from the dense Jacobian where it is computed or fits in
        ``max_memory``; a longer prompt's from the matrix-free SVD (a few dozen replay
        products instead of ``d_out`` backward rows: Gemma 3 270M at 700 tokens, 290 s → ~20 s),
        with the dense SVD's sign convention, and from the dense Jacobian after all if the
        iteration does not converge."""
        hook, pos = self._resolve(hook, pos)
        result = self._top_triplets(hook, pos, input_pos, n_triplets)
        decode.check_output_space(self.model, result.U.shape[0], hook)
        lens = self.final_norm_map(pos=pos) if readout and hook != self.output else None
        out = []
        for j in range(result.S.shape[0]):
            u = result.U[:, j] if lens is None else lens @ result.U[:, j]
            # all positions: read the right vector at the input position where it is largest
            where = (
                normalize_position(input_pos, self.n_pos, "input_pos")
                if input_pos != "all"
                else int(result.V[:, :, j].norm(dim=-1).argmax())
            )
            v = result.V[0 if input_pos != "all" else where, :, j]
            out.append(
                Direction(
                    j,
                    float(result.S[j]),
                    decode.output_tokens(self.model, u, n_tokens),
                    decode.input_tokens(self.model, v, n_tokens),
                    where,
                )
            )
        return out

    def _top_triplets(self, hook: str, pos: int, input_pos: int | str, k: int) -> SVDResult:
        d_out = self.activation(hook, pos=pos).numel()
        n_in = self.n_pos if input_pos == "all" else 1
        dense_bytes = n_in * self.x.shape[1] * d_out * self.x.element_size()
        if self.is_computed(hook, pos=pos) or dense_bytes <= budget(self.max_memory, self.x.device):
            return self.svd(hook, pos=pos, input_pos=input_pos, n_triplets=k)
        mf = self.svd_matrix_free(hook, pos=pos, input_pos=input_pos, n_triplets=k)
        if not mf.converged:
            return self.svd(hook, pos=pos, input_pos=input_pos, n_triplets=k)
        explains = self.activation(hook, pos=pos)
        return decode.from_factors(
            hook, input_pos, mf.U, mf.S, mf.V.reshape(n_in, -1, k), explains, mf.S.dtype
        )

    def top_rows(
        self,
        hook: HookKey | None = None,
        *,
        input_pos: int,
        pos: int | None = None,
        n_rows: int = 3,
        n_tokens: int = 5,
    ) -> list[Direction]:
        """Rows of largest norm of ``input_pos``'s Jacobian block: the input features that the
        most strongly driven output units select for, as nearest input tokens."""
        jac = decode.flatten(self.jacobian(hook, pos=pos), input_pos)
        norms = jac.norm(dim=1)
        idx = norms.topk(min(n_rows, len(norms))).indices
        return [
            Direction(
                int(i), float(norms[i]), None, decode.input_tokens(self.model, jac[i], n_tokens)
            )
            for i in idx
        ]

    def top_columns(
        self,
        hook: HookKey | None = None,
        *,
        input_pos: int,
        pos: int | None = None,
        n_cols: int = 3,
        n_tokens: int = 5,
    ) -> list[Direction]:
        """Columns of largest norm of ``input_pos``'s Jacobian block, read through the unembedding."""
        hook, pos = self._resolve(hook, pos)
        jac = decode.flatten(self.jacobian(hook, pos=pos), input_pos)
        decode.check_output_space(self.model, jac.shape[0], hook)
        norms = jac.norm(dim=0)
        idx = norms.topk(min(n_cols, len(norms))).indices
        return [
            Direction(
                int(i), float(norms[i]), decode.output_tokens(self.model, jac[:, i], n_tokens), None
            )
            for i in idx
        ]

    def stable_rank(
        self, hook: HookKey | None = None, *, pos: int | None = None, input_pos: int | str = "all"
    ) -> float:
        """``‖J‖_F² / ‖J‖_2²`` of the Jacobian (one input position or all side by side)."""
        return decode.gram_stable_rank(self.jacobian(hook, pos=pos), input_pos)

    def spectra(
        self, hooks: Sequence[HookKey], *, pos: int | None = None, input_pos: int | str = "all"
    ) -> dict[str, torch.Tensor]:
        """Normalized singular value spectra (``S / S[0]``) of several hooks' Jacobians,
        computed together (e.g. every layer's ``hook_attn_out``, ``hook_mlp_out``, ``hook_resid_post``)."""
        jacs = self.jacobians(hooks, pos=pos)
        return {
            h: (lambda s: s / s[0])(
                self.svd(h, pos=pos, input_pos=input_pos, n_triplets=1).spectrum
            )
            for h in jacs
        }

    def alignment(
        self,
        hooks: Sequence[HookKey] | None = None,
        *,
        reference: HookKey | None = None,
        n_triplets: int = 3,
        pos: int | None = None,
    ) -> Float[torch.Tensor, "n_hooks n_triplets"]:
        """``|⟨u_j(hook), u_j(reference)⟩|`` for the top left singular vectors of each hook's
        all-positions Jacobian against the reference's (default: the last hook): how early the
        final layer's leading directions appear (paper fig. 6B)."""
        hooks = list(hooks or block_outputs(self.model))
        reference = reference if reference is not None else hooks[-1]
        jacs = self.jacobians([*hooks, reference], pos=pos)
        names = list(jacs)
        ref = decode.top_left_vectors(jacs[names[-1]], n_triplets)
        return torch.stack(
            [
                (decode.top_left_vectors(jacs[h], n_triplets) * ref).sum(0).abs()
                for h in names[: len(hooks)]
            ]
        ).to(self.x.dtype)

    # ---- attention ----------------------------------------------------------------------
    @functools.cached_property
    def attention(self) -> AttentionCircuits:
        """Attention circuits at this operating point: frozen patterns, per-head OV/QK
        circuits (row convention), token-to-token Jacobians and their QK term (column convention)."""
        return AttentionCircuits(self.point, self.max_memory)

    def attention_jacobian(
        self,
        layer: int,
        query_pos: int,
        key_pos: int,
        *,
        head: int | None = None,
        include_norm: bool = False,
    ) -> FactoredMatrix:
        """``∂ attn_out[query_pos] / ∂ x[key_pos]`` with the pattern frozen, a column-convention
        ``FactoredMatrix``: see :meth:`AttentionCircuits.jacobian`."""
        return self.attention.jacobian(
            layer, query_pos, key_pos, head=head, include_norm=include_norm
        )

    def _repr_html_(self) -> str:
        """Notebook summary: prediction, reconstruction errors, token contributions."""
        from lens_linear.render import summary_html  # plotly and circuitsvis load only when shown

        return summary_html(self)

    def __repr__(self) -> str:
        top = self.top_predictions(1)[0]
        return (
            f"LinearCache({self.model.cfg.model_name}, {self.n_pos} tokens, pos={self.pos}, "
            f"output={self.output!r}, top={top.token!r} p={top.prob:.3f}, "
            f"jacobians cached={len(self._jacobians)})"
        )


def run_with_linear_cache(
    model: Any,
    input: str | torch.Tensor,
    *,
    pos: int = -1,
    parts: Sequence[str] = PARTS,
    fwd_hooks: Sequence[Hook] = (),
    prepend_bos: bool | None = None,
    check: bool = True,
    names_filter: Any = None,
    max_memory: int | None = None,
    progress: bool = True,
    dtype: torch.dtype | None = None,
    store_patterns: bool | None = None,
) -> LinearCache:
    """Record the operating point of one input and return its :class:`LinearCache`.

    Args:
        model: a ``TransformerBridge`` or ``HookedTransformer``; returned untouched.
        input: a prompt or one sequence of token ids.
        pos: the output position the Jacobians describe (negative counts from the end).
        parts: which nonlinearities to freeze (``"norm"``, ``"attn"``, ``"mlp"``).
        fwd_hooks: your own hooks ``[(name or name filter, fn)]`` as in ``run_with_hooks``,
            active in the recording and in every replay.
        check: verify now, for a few products (see :meth:`LinearCache.check`), and raise
            :class:`LinearizationError` unless every frozen coefficient reaches the output and
            the frozen map reconstructs it exactly; no full Jacobian is computed.
        names_filter: which activations ``lcache.activations`` keeps (a name, a list or a
            callable, as in ``run_with_cache``); by default all of them, recorded on first access.
        max_memory: the memory budget in bytes (:mod:`lens_linear.memory`; default 256 MB on a
            CPU, a quarter of the free memory on a GPU): stored attention patterns take at most
            all of it, each chunk of batched products half, a block of pattern rows a quarter.
        progress: show progress bars (notebook-aware) while Jacobians are computed.
        dtype: compute the frozen map in this dtype (``torch.float32`` or ``torch.float64`` for a
            bfloat16/float16 model): the coefficients are recorded in the model's own dtype,
            then every computation runs with the weights copied to ``dtype`` (one extra copy of
            the weights while it runs: 2× a bfloat16 model's size in float32) and put back
            bit for bit. Reconstruction is then exact to ``dtype``; ``lcache.model_rounding()``
            reports the model's own rounding.
        store_patterns: keep every attention pattern whole (``True``: ``layers · heads · n²``
            values) or as its queries and keys (``False``: ``layers · heads · n · d_head``; each
            replay recomputes the pattern a block of rows at a time, in the backward pass too, so
            no product holds a whole pattern). Default: whole while they fit in ``max_memory`` (256 MB: up to
            about 500 tokens on SmolLM2), then queries and keys. Where a layer's pattern is not
            ``softmax(scale · q kᵀ + causal mask)`` (with a sliding window and attention sinks
            where the model has them; softcapping is not), that layer's pattern is stored whole
            regardless.

    Example:
        >>> lcache = run_with_linear_cache(model, "The bridge out of Marin is the")
        >>> lcache.reconstruction_error()  # ~1e-7 in float32
    """
    require_tl_model(model)
    tokens = to_tokens(model, input, prepend_bos)
    pos = normalize_position(pos, tokens.shape[-1])
    output = output_hook(model)
    keep = _with_output(names_filter, output)
    carried = check and not checks_whole_prompt(
        tokens.shape[-1], fwd_hooks
    )  # else the site check covers it
    with analysis_mode(model):  # one setup for the recording and its check
        point, logits, activations = OperatingPoint.record(
            model,
            tokens,
            parts,
            fwd_hooks,
            keep,
            tangent_at=output if carried else None,
            store_patterns=store_patterns,
            max_memory=max_memory,
            graph=check and not carried and dtype in (None, model_dtype(model)),
        )
        if point.frozen_attention:  # a long prompt: its recording's freed memory back to the system
            release_freed_memory()
        if dtype is not None and check_dtype(dtype) != point.x_star.dtype:
            point = point.in_dtype(dtype)
        lcache = LinearCache(
            model,
            point,
            logits,
            activations,
            pos,
            max_memory,
            progress,
            complete=names_filter is not None,
        )
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
        return lambda name: name == output or bool(names_filter(name))
    return list({*names_filter, output})
