"""The operating point: frozen coefficients of one forward pass, and their replay.

Detach (autograd at ``x*`` with every coefficient detached) and replay (a forward pass at
any input with every coefficient replaced by its recorded value) are two views of one
frozen affine map ``F``. Both are built here from one set of hook functions
(:func:`lens_linear.hooks.freeze.site_hooks`):

* ``F(x*) = y*``; ``F(v) - F(0) = J⁺ v`` (one forward); ``F(0)`` is the bias term;
* backward through a replay graph gives ``uᵀ J⁺``.

The memory constants below decide how a recording stores attention patterns
(:func:`patterns_fit`) and how the site check replays (:func:`checks_whole_prompt`).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from jaxtyping import Float, Int

from lens_linear._validation import (
    LinearizationError,
    ModelInUseError,
    relative_error,
    require_hook,
    require_tl_model,
)
from lens_linear.hooks.contexts import (
    analysis_mode,
    bias_leaves,
    bias_tensors,
    biases_zeroed,
    computing_in,
    linears_skipped,
)
from lens_linear.hooks.freeze import site_hooks
from lens_linear.hooks.patterns import FrozenAttention
from lens_linear.hooks.rules.inside import cuttable
from lens_linear.hooks.run import Hook, forward, hooks_on, run_to
from lens_linear.hooks.sites import (
    INPUT_HOOK,
    PARTS,
    Site,
    block_outputs,
    feeds_frozen_only,
    find_sites,
    output_hook,
)
from lens_linear.hooks.tangents import forward_mode
from lens_linear.hooks.values import cut_positions
from lens_linear.hooks.verify import (
    SiteCheck,
    batched_grad,
    centred_projections,
    projected_error,
    seeded_randn,
)
from lens_linear.memory import patterns_fit
from lens_linear.tokens import model_dtype

SITE_CHECK_POSITIONS = 8  # positions replayed to find ignored sites (without user hooks)
WHOLE_CHECK_POSITIONS = (
    64  # up to this length the site check replays the whole prompt and also checks the
)
# reconstruction; beyond, the recording carries J⁺x* in forward mode. SmolLM2, 2 CPU cores, seconds at 8 / 32 /
# 64 / 128 tokens: whole-prompt check 0.51 / 0.70 / 1.28 / 2.44, against tangents + suffix check 0.85 / 0.82 /
# 1.11 / 1.31; the whole-prompt check's graph then saves the first Jacobian's forward (~0.5 s at 64 tokens)


def checks_whole_prompt(n_pos: int, fwd_hooks: Sequence[Any] = ()) -> bool:
    """Whether :meth:`OperatingPoint.check_sites` replays the whole prompt (short prompts, or user
    hooks, which may index absolute positions), so that it can also check the reconstruction."""
    return bool(fwd_hooks) or n_pos <= WHOLE_CHECK_POSITIONS


class OperatingPoint:
    """Frozen coefficients (norm scales, attention patterns, MLP gates) of one forward pass.

    Build with :meth:`record`. ``x_star`` is the input variable (``blocks.0.hook_resid_pre``
    at every position) and ``values`` maps each site's hook name to its frozen value.
    Vocabulary, here and everywhere: ``hook`` is an output hook, ``pos`` an output position,
    ``input_hook`` where the input is placed, ``start_pos`` the first input position replayed.
    """

    def __init__(
        self,
        model: Any,
        tokens: Int[torch.Tensor, "1 pos"],
        sites: list[Site],
        values: dict[str, torch.Tensor],
        x_star: Float[torch.Tensor, "pos d_model"],
        fwd_hooks: Sequence[Hook] = (),
        tangents: dict[str, torch.Tensor] | None = None,
        frozen_attention: dict[str, FrozenAttention] | None = None,
    ):
        self.model = model
        self.tokens = tokens
        self.sites = sites
        self.values = values
        self.x_star = x_star
        self.fwd_hooks = list(fwd_hooks)
        self.tangents = tangents or {}  # hook → J⁺x* at every position, carried by the recording
        self.frozen_attention = (
            frozen_attention or {}
        )  # hook_pattern → its queries and keys (not in values)
        # a recording run with autograd (``record(graph=True)``): (output, input leaf, factors,
        # bias leaves or None), for the first site check, which consumes it
        self.recorded_graph: (
            tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor] | None]
            | None
        ) = None

    @classmethod
    def record(
        cls,
        model: Any,
        tokens: Int[torch.Tensor, "1 pos"],
        parts: Sequence[str] = PARTS,
        fwd_hooks: Sequence[Hook] = (),
        names_filter: Any = None,
        tangent_at: str | None = None,
        store_patterns: bool | None = None,
        max_memory: int | None = None,
        graph: bool = False,
    ) -> tuple["OperatingPoint", torch.Tensor, Any]:
        """Run ``model`` once on ``tokens`` and freeze every coefficient at its value.

        ``fwd_hooks`` (the user's own, names or name filters as in ``run_with_hooks``) stay
        active in the recording and in every replay; the frozen value of a coefficient is
        the value after the user's hooks. Returns the operating point, the logits and the
        ``ActivationCache`` of that forward pass (``names_filter`` as in ``run_with_cache``).
        With ``tangent_at``, the recording runs in forward mode with the input as its own
        tangent, so it also carries ``J⁺x*`` at that hook (every position) for
        :meth:`directional`, at the price of the tangents' arithmetic (verification without
        a second pass); where an operation has no forward-mode rule it runs again without.
        ``store_patterns``: keep attention patterns whole (``True``) or as their queries and
        keys where that verifies (``False``, :mod:`lens_linear.hooks.patterns`); by default
        whole while every layer's pattern together fits in ``max_memory``
        (:func:`lens_linear.memory.patterns_fit`), which also sizes the blocks of pattern rows
        that a replay recomputes from queries and keys.
        ``graph`` (patterns stored whole): the recording itself runs with autograd, its input a
        leaf and a factor (value 1) on every site, as :meth:`check_sites`' replay does; every
        freezing hook detaches its coefficient, so this graph is the frozen map's at ``x*``, and
        the check and the first Jacobian of the output use it instead of a replay of their own
        (one forward instead of two).
        """
        require_tl_model(model)
        sites = find_sites(model, parts)
        values: dict[str, torch.Tensor] = {}
        seen: dict[str, torch.Tensor] = {}
        upstream: dict[str, torch.Tensor] = {}
        tangents: dict[str, torch.Tensor] = {}
        if store_patterns is None:
            store_patterns = patterns_fit(model, tokens.shape[-1], max_memory=max_memory)
        frozen: dict[str, FrozenAttention] | None = None if store_patterns else {}
        graph = graph and store_patterns and tangent_at is None
        biases: list[torch.Tensor] | None = None  # the recording's bias leaves (graph only)
        factors = (
            {
                s.name: torch.ones((), device=tokens.device, requires_grad=True)
                for s in sites  # float32 scalars: a 0-dim factor keeps every value's dtype
            }
            if graph
            else {}
        )
        out_name = output_hook(model)

        def grab(value: torch.Tensor, hook: Any) -> torch.Tensor | None:
            seen["x"] = value.detach()[0]
            upstream.update(values)  # sites fired before the input (an embedding norm), by value
            if graph:
                seen["leaf"] = seen["x"].clone().requires_grad_(True)
                return seen["leaf"][None]
            return fwAD.make_dual(value, value.detach()) if tangent_at is not None else None

        def keep_output(value: torch.Tensor, hook: Any) -> None:
            seen["y"] = value

        def carry(value: torch.Tensor, hook: Any) -> torch.Tensor:
            primal, tangent = fwAD.unpack_dual(value)
            tangents[hook.name] = (torch.zeros_like(value) if tangent is None else tangent)[
                0
            ].clone()
            return primal  # the rest of the forward (the unembedding) needs no tangent

        extra = [(INPUT_HOOK, grab)] + ([(tangent_at, carry)] if tangent_at is not None else [])
        extra += [(out_name, keep_output)] if graph else []
        try:
            with torch.set_grad_enabled(graph), contextlib.ExitStack() as stack:
                if tangent_at is not None:
                    stack.enter_context(forward_mode())
                if graph and not fwd_hooks:  # the biases' gradients explain F(0) for the check
                    biases = stack.enter_context(bias_leaves(model))
                stack.enter_context(
                    hooks_on(
                        model,
                        list(fwd_hooks)
                        + site_hooks(
                            model,
                            sites,
                            values,
                            "record",
                            factors,
                            frozen=frozen,
                            max_memory=max_memory,
                        )
                        + extra,
                    )
                )
                logits, cache = model.run_with_cache(tokens, names_filter=names_filter)
                logits = fwAD.unpack_dual(logits).primal.detach()
        except (LinearizationError, ModelInUseError):  # a user hook called back in: not ours
            raise
        except NotImplementedError:
            if tangent_at is None:
                raise
            return cls.record(
                model,
                tokens,
                parts,
                fwd_hooks,
                names_filter,
                store_patterns=store_patterns,
                max_memory=max_memory,
            )
        except Exception as exc:
            with torch.no_grad():
                forward(
                    model, tokens, fwd_hooks
                )  # the model runs without the freezing hooks: they are the cause
            raise LinearizationError(
                f"the model's forward pass fails once its coefficients are frozen "
                f"({type(exc).__name__}: {exc}). A component of this model does not accept an "
                f"edited hook value (a weight-free norm in TransformerLens' bridge, say)."
            ) from exc
        # a coefficient only upstream of the input variable is not part of the map from it (one
        # that fires again later, as a norm module shared by the embedding and the output, is)
        before = {name for name, value in upstream.items() if values.get(name) is value}
        sites = [s for s in sites if s.name not in before]
        point = cls(
            model,
            tokens,
            sites,
            {k: v for k, v in values.items() if k not in before},
            seen["x"],
            fwd_hooks,
            tangents,
            frozen,
        )
        if "y" in seen and "leaf" in seen:
            point.recorded_graph = (seen["y"], seen["leaf"], factors, biases)
        return point, logits, cache

    @functools.cached_property
    def activations(self) -> Any:
        """The full ``ActivationCache`` of the recorded pass, computed on first use by running
        the recording again; for a point cast wider than its model (:meth:`in_dtype`), the
        frozen map's values at ``x*`` in the point's dtype (one replay)."""
        if self.x_star.dtype == model_dtype(self.model):
            hooks = self.hooks("record")
        else:
            hooks = self.hooks("replay") + [
                (INPUT_HOOK, lambda value, hook: self.x_star[None].to(value.dtype))
            ]
        with (
            self.computing(),
            analysis_mode(self.model),
            torch.no_grad(),
            hooks_on(self.model, hooks),
        ):
            return self.model.run_with_cache(self.tokens)[1]

    def computing(self) -> contextlib.AbstractContextManager:
        """Run the model in this point's dtype (a float32 point of a bfloat16 model: weights
        copied to float32 meanwhile, restored bit for bit); a no-op where they agree."""
        return computing_in(self.model, self.x_star.dtype)

    def ignored_sites(self) -> list[str]:
        """Sites whose frozen value never reaches the output (see :meth:`check_sites`)."""
        return self.check_sites().ignored

    def check_sites(
        self,
        target: Float[torch.Tensor, "pos d_out"] | None = None,
        n_projections: int = 8,
        keep_graph: bool = False,
    ) -> "SiteCheck":
        """Which sites never reach the output and, on a short prompt, how far ``J⁺x* + F(0)`` is
        from ``target`` (the output hook's value at every position), from one replay.

        Ignored sites: the model read the coefficient before its hook fired (as TransformerLens'
        bridge does with ``hook_pattern`` on some architectures). The replay at ``x*`` carries a
        scalar factor (value 1) on every site; one backward of random projections of the output
        with respect to all factors at once leaves a discarded value's factor without a
        gradient path (``None``), while every site that reaches the output gets a nonzero
        derivative with probability 1. Which sites reach the output does not depend on the
        prompt's length, so this replays the last few positions only, unless
        :func:`checks_whole_prompt` (a short prompt, or user hooks, which may index absolute
        positions).

        Reconstruction (given ``target``, on a whole-prompt replay; else ``None``): the same
        backward, with the input requiring grad, gives ``Uᵀ J⁺`` for ``n_projections`` centred
        Gaussian rows ``U``, and ``‖U(J⁺x* + F(0) − target)‖ / ‖U target‖`` estimates the relative
        reconstruction error. An error ``e ≠ 0`` projects to zero with probability 0, and below a
        tenth of its size with probability about 1e-8 for 8 projections (a χ² with 8 degrees of
        freedom). Cost: one forward and one backward of ``n_projections`` batched rows, plus one
        replay at zero where the map may add a constant (:meth:`may_add_constant`).

        Unexplained constant (same conditions, no user hooks): the backward is taken with
        respect to every bias too (:func:`~lens_linear.hooks.contexts.bias_leaves`). The frozen
        map is jointly linear in its input and its biases, so ``Σ_b ⟨Uᵀ∂F/∂b, b⟩`` is the part
        of ``U F(0)`` the biases explain, and ``‖U F(0) − Σ_b ⟨Uᵀ∂F/∂b, b⟩‖ / ‖U target‖``
        estimates what no bias explains, with no replay with the biases zeroed. A constant a
        rule ties to a bias by value (not by a gradient path) shows up here, so a failing
        estimate is settled by that replay (:meth:`unexplained_constant`), never trusted alone.
        ``keep_graph``: return that whole-prompt replay's graph, for a Jacobian to reuse.
        """
        out_name = output_hook(self.model)
        checked = [s for s in self.sites if not feeds_frozen_only(s, self.sites)]
        fired = {**self.values, **self.frozen_attention}
        # a site that never fired (a compressor with no complete window on this prompt) holds
        # nothing: it cannot fire in a replay of this prompt either
        ignored: list[str] = []
        whole = target is not None and checks_whole_prompt(len(self.x_star), self.fwd_hooks)
        start = 0 if whole or self.fwd_hooks else max(0, len(self.x_star) - SITE_CHECK_POSITIONS)
        recorded, self.recorded_graph = self.recorded_graph, None  # its graph serves one check
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.computing())
            stack.enter_context(analysis_mode(self.model))
            stack.enter_context(torch.enable_grad())
            # the biases' gradients too, where no user hook adds constants of its own
            biases = (
                stack.enter_context(bias_leaves(self.model))
                if whole and not self.fwd_hooks
                else None
            )
            if recorded is not None and whole:  # the recording ran with autograd: no replay
                y, x, every, recorded_biases = recorded
                factors = {s.name: every[s.name] for s in checked if s.name in fired}
                biases = biases if recorded_biases is not None else None
            else:
                factors = {
                    s.name: torch.ones(
                        (), dtype=self.x_star.dtype, device=self.x_star.device, requires_grad=True
                    )
                    for s in checked
                    if s.name in fired
                }
                x = self.x_star[start:].clone().requires_grad_(whole)  # [pos, d_in]: batch added
                y = self.replay(x, [out_name], start_pos=start, factors=factors)[out_name]
            if not y.requires_grad:
                return SiteCheck(ignored + list(factors))
            inputs = list(factors.values()) + ([x] if whole else []) + (biases or [])
            u = centred_projections(n_projections if whole else 1, y.shape, y, seed=1)
            grads = batched_grad(y, inputs, u, retain_graph=whole and keep_graph)
        ignored += [name for name, g in zip(factors, grads) if g is None or not bool(g.ne(0).any())]
        if not whole:
            return SiteCheck(ignored)
        pulled = grads[len(factors)]  # Uᵀ J⁺: [k, pos, d_in]
        pulled = torch.zeros_like(u) if pulled is None else pulled
        pulled_x = pulled.double().flatten(1) @ self.x_star.double().reshape(-1)
        constant = self.bias_term(out_name) if self.may_add_constant() else None
        unexplained = None
        if constant is not None and biases is not None:  # ‖U(F(0) − Σ_b (∂F/∂b) b)‖ / ‖U y‖
            rows = u.double().flatten(1)
            explained = sum(
                (g.double().flatten(1) @ b.detach().double().reshape(-1))
                for g, b in zip(grads[len(factors) + 1 :], biases)
                if g is not None
            )
            unexplained = float(
                (rows @ constant.double().reshape(-1) - explained).norm()
                / (rows @ target.double().reshape(-1)).norm().clamp_min(1e-300)
            )
        return SiteCheck(
            ignored,
            projected_error(u, pulled_x, constant, target),
            (y[0], x) if keep_graph else None,
            unexplained,
        )

    def hooks(self, mode: str = "replay") -> list[Hook]:
        """The user's hooks plus the freezing hooks (``record`` re-detaches, ``replay`` substitutes)."""
        if mode == "replay":
            return self.fwd_hooks + site_hooks(
                self.model, self.sites, self.values, mode, frozen=self.frozen_attention
            )
        return self.fwd_hooks + site_hooks(self.model, self.sites, {}, mode)

    def replay(
        self,
        x: Float[torch.Tensor, "batch pos d_in"],
        hooks: Sequence[str],
        *,
        input_hook: str = INPUT_HOOK,
        start_pos: int = 0,
        pos: int | None = None,
        factors: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run the frozen map on inputs ``x`` placed at ``input_hook``; return the values at ``hooks``.

        With the default input hook this is ``F``, the map from the input embeddings. Any
        other (``blocks.5.hook_resid_pre``, say) replays the frozen map from that point on:
        everything downstream is affine in ``x``. Differentiable: with ``x.requires_grad``
        the outputs carry the graph. ``start_pos > 0`` replays positions ``start_pos..`` alone,
        with every frozen value cut to them: exact for the map's linear part (biases zeroed),
        since frozen patterns make the map blind to absolute position and causal attention
        keeps earlier positions out of later ones. ``pos`` keeps only that position of each
        output; ``factors`` perturbs chosen frozen values per batch element (see :func:`site_hooks`).
        """
        require_hook(self.model, input_hook, *hooks)
        if x.ndim == 2:
            x = x.unsqueeze(0)
        if input_hook == INPUT_HOOK and x.shape[1:] != self.x_star[start_pos:].shape:
            raise ValueError(
                f"replay input must have shape [batch, {self.x_star.shape[0] - start_pos}, "
                f"{self.x_star.shape[1]}], got {tuple(x.shape)}"
            )
        if start_pos and not all(cuttable(s, self.values) for s in self.sites):
            # values that cannot be cut to the last positions (a compressor's windows): the
            # whole prompt replayed, the input zero before ``start_pos``
            pad = x.new_zeros(x.shape[0], start_pos, *x.shape[2:])
            out = self.replay(
                torch.cat([pad, x], 1),
                hooks,
                input_hook=input_hook,
                pos=None if pos is None else pos + start_pos,
                factors=factors,
            )
            return out if pos is not None else {h: v[:, start_pos:] for h, v in out.items()}
        sites, store = self.sites, self.values
        if start_pos:  # norms that feed only frozen values may run live on the suffix
            sites = [s for s in self.sites if not feeds_frozen_only(s, self.sites)]
            store = {
                **store,
                **{
                    s.name: cut_positions(
                        s, store[s.name], slice(start_pos, None), 1, len(self.x_star)
                    )
                    for s in sites
                    if s.kind not in ("moe", "scan") and s.name in store
                },
            }  # others fit
            # their values themselves (mixtures, scans, attention kept as queries and keys)
        with self.computing():
            return run_to(
                self.model,
                self.tokens[:, start_pos:].expand(x.shape[0], -1),
                self.fwd_hooks
                + site_hooks(self.model, sites, store, "replay", factors, self.frozen_attention),
                inject=(input_hook, x),
                capture=hooks,
                pos=pos,
            )

    def dead_linears(self, hooks: Sequence[str]) -> list[torch.nn.Module]:
        """Linear layers whose output cannot reach ``hooks`` once the coefficients are frozen.

        Under replay the query and key projections feed only the substituted pattern, and a
        gated MLP's gate projection only the substituted gate: about a third of a SwiGLU
        model's multiply-adds. Found from the replay graph (an output with no gradient path
        to ``hooks``), then confirmed by value: the replay with them skipped must equal the
        full replay at a random input, else nothing is skipped. Both replays run on the last
        4 positions alone (without user hooks, which may index absolute positions): which
        layers are dead does not depend on the length, and a full-length graph with every
        score and softmax in it is large (839 MB at 512 tokens on SmolLM2).
        """
        found: list[tuple[torch.nn.Module, torch.Tensor]] = []
        keep = lambda module, args, output: found.append((module, output))  # noqa: E731
        linears = [m for m in self.model.modules() if isinstance(m, torch.nn.Linear)]
        handles = [m.register_forward_hook(keep) for m in linears]
        start = 0 if self.fwd_hooks else max(0, len(self.x_star) - 4)
        x = seeded_randn(self.x_star[start:].shape, self.x_star, seed=0)[None]
        try:
            with torch.enable_grad():
                out = self.replay(x.clone().requires_grad_(True), hooks, start_pos=start)
        finally:
            for handle in handles:
                handle.remove()
        found = [(m, o) for m, o in found if isinstance(o, torch.Tensor) and o.requires_grad]
        total = sum(v.sum() for v in out.values())
        grads = (
            torch.autograd.grad(total, [o for _, o in found], allow_unused=True) if found else []
        )
        live = {id(m) for (m, _), g in zip(found, grads) if g is not None}
        dead = list({id(m): m for m, _ in found if id(m) not in live}.values())
        if dead:
            with torch.no_grad(), linears_skipped(dead):
                skipped = self.replay(x, hooks, start_pos=start)
            if any(not torch.equal(skipped[n], out[n].detach()) for n in hooks):
                return []
        return dead

    def bias_term(
        self, hook: str, *, input_hook: str = INPUT_HOOK, like: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``F(0)`` at ``hook``, every position: what the frozen map adds with no input. For
        another ``input_hook``, ``like`` is a value of that hook (its shape)."""
        zero = torch.zeros_like(self.x_star if like is None else like)
        with torch.no_grad():
            return self.replay(zero, [hook], input_hook=input_hook)[hook][0]

    def may_add_constant(self) -> bool:
        """Whether ``F(0)`` can be nonzero: the model has a nonzero bias (or one offloaded,
        unseen) or user hooks are on. Without either every operation of the frozen map is
        linear with no constant term, so ``F(0) = 0``; a constant we did not know of would make
        :meth:`LinearCache.check` fail, never pass wrongly."""
        return bool(self.fwd_hooks) or any(
            t.device.type == "meta" or bool(torch.count_nonzero(t))
            for t in bias_tensors(self.model).values()
        )

    def unexplained_constant(self, hook: str) -> torch.Tensor | None:
        """``F(0)`` at ``hook`` (every position) with every bias zeroed: the constant no bias
        explains, zero where every coefficient is frozen as a factor of a linear term. A rule
        that freezes a nonlinearity whole (an activation's input instead of its ratio) leaves
        the map affine, and the reconstruction exact, yet adds such a constant: this finds it.
        ``None`` where it cannot be computed or is not defined: user hooks (their constants
        are theirs) or biases offloaded by accelerate (they cannot be zeroed)."""
        biases = bias_tensors(self.model).values()
        if self.fwd_hooks or any(t.device.type == "meta" for t in biases):
            return None
        with biases_zeroed(self.model):
            return self.bias_term(hook)

    def directional(self, hook: str, *, pos: int | None = None) -> torch.Tensor:
        """``J⁺ x*`` at ``hook`` (every position, or ``pos``): free where the recording carried
        it (``record(tangent_at=hook)``), else from one replay in forward mode: the input
        carries itself as its tangent, every operation applies its derivative alongside its
        value, and no graph is kept (memory of a plain forward, time of about two). Raises
        ``NotImplementedError`` where an operation has no forward-mode rule."""
        tangent = self.tangents.get(hook)
        if tangent is None or tangent.dtype != self.x_star.dtype:  # none, or a point cast wider
            with torch.no_grad(), forward_mode():
                x = fwAD.make_dual(self.x_star[None], self.x_star[None])
                value = self.replay(x, [hook])[hook][0]
                tangent = fwAD.unpack_dual(value).tangent
                tangent = torch.zeros_like(value) if tangent is None else tangent.clone()
        return tangent if pos is None else tangent[pos]

    def bias_contributions(self, hook: str) -> dict[str, torch.Tensor]:
        """Split ``F(0)`` at ``hook`` (all positions) exactly into one term per bias.

        The frozen map is jointly linear in the input and every bias, so replaying at zero
        input with all biases but one set to zero gives that bias's share. The key
        ``"(other)"`` is the replay with every bias zeroed: what no bias explains (zero for
        the models we know). The zeros are substituted in each replay
        (:func:`~lens_linear.hooks.contexts.biases_zeroed`): the model's tensors are not written.
        """
        parts: dict[str, torch.Tensor] = {}
        for bias_name in [*bias_tensors(self.model), None]:
            with biases_zeroed(self.model, keep=bias_name):
                parts[bias_name or "(other)"] = self.bias_term(hook)
        return parts

    def jvp(self, v: Float[torch.Tensor, "pos d_model"], hook: str) -> torch.Tensor:
        """``J⁺ v`` at ``hook`` (all positions) by one batched replay: ``F(v) − F(0)``."""
        with torch.no_grad():
            out = self.replay(
                torch.stack([v.to(self.x_star), torch.zeros_like(self.x_star)]), [hook]
            )[hook]
        return out[0] - out[1]

    def vjp(self, u: torch.Tensor, hook: str, *, pos: int) -> Float[torch.Tensor, "pos d_model"]:
        """``uᵀ J⁺``: the cotangent ``u`` at ``hook[pos]`` pulled back to the input."""
        x = self.x_star.clone().requires_grad_(True)
        with torch.enable_grad():
            y = self.replay(x, [hook], pos=pos)[hook][0].reshape(-1)
            (grad,) = torch.autograd.grad(y, x, grad_outputs=u.reshape(-1).to(y))
        return grad

    def linearity_profile(
        self, hooks: Sequence[str] | None = None, seed: int = 0
    ) -> dict[str, float]:
        """Per-hook affinity error of the replayed map: ``F(a)+F(b)−F(a+b)−F(0)`` vs ``F(a)``.

        Zero (to rounding) at every hook where all nonlinearities upstream are frozen; the
        first hook where it is large is where linearity breaks.
        """
        hooks = list(hooks or block_outputs(self.model))
        b = seeded_randn(self.x_star.shape, self.x_star, seed)
        b = b * self.x_star.std() / b.std()
        a = self.x_star
        with torch.no_grad():
            out = self.replay(torch.stack([a, b, a + b, torch.zeros_like(a)]), hooks)
        return {n: relative_error(v[0] + v[1] - v[3], v[2]) for n, v in out.items()}

    def in_dtype(self, dtype: torch.dtype) -> "OperatingPoint":
        """The same frozen map with its coefficients and input cast to ``dtype``: replay it
        inside :func:`computing_in` to run a half-precision model's frozen map in float32."""
        values = {k: v.to(dtype) if v.is_floating_point() else v for k, v in self.values.items()}
        return OperatingPoint(
            self.model,
            self.tokens,
            self.sites,
            values,
            self.x_star.to(dtype),
            self.fwd_hooks,
            frozen_attention={k: v.to(dtype) for k, v in self.frozen_attention.items()},
        )

    def pattern(self, layer: int) -> Float[torch.Tensor, "head query key"] | None:
        """Block ``layer``'s frozen attention pattern, stored or recomputed from its queries and
        keys (``None`` for a block without softmax attention)."""
        name = f"blocks.{layer}.attn.hook_pattern"
        if name in self.frozen_attention:
            return self.frozen_attention[name].pattern()
        return self.values[name][0] if name in self.values else None

    def locate_break(self, tol: float) -> tuple[int | None, float | None]:
        """First block whose output is not affine in the input (``None`` if all are)."""
        for name, err in self.linearity_profile().items():
            if err > tol:
                return int(name.split(".")[1]), err
        return None, None
