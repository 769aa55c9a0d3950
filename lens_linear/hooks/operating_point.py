"""The operating point: frozen coefficients of one forward pass, and their replay.

Detach (autograd at ``x*`` with every coefficient detached) and replay (a forward pass at
any input with every coefficient replaced by its recorded value) are two views of one
frozen affine map ``F``. Both are built here from one set of hook functions:

* ``F(x*) = y*``; ``F(v) - F(0) = J⁺ v`` (one forward); ``F(0)`` is the bias term;
* backward through a replay graph gives ``uᵀ J⁺``.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from jaxtyping import Float, Int

from lens_linear._validation import (
    LinearizationError,
    relative_error,
    require_hook,
    require_tl_model,
    tolerance,
)
from lens_linear.hooks.inside import fit_to, moe_hooks, scan_hooks
from lens_linear.hooks.patterns import FrozenAttention, attention_hooks, recipe_tolerance
from lens_linear.hooks.run import Hook, forward, hooks_on, run_to
from lens_linear.hooks.sites import PARTS, Site, activation_fn, find_sites, slope_at_zero
from lens_linear.hooks.tangents import forward_mode

INPUT_HOOK = "blocks.0.hook_resid_pre"
PATTERN_BUDGET = 256 << 20  # bytes of attention patterns stored whole; beyond, queries and keys
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


def output_hook(model: Any) -> str:
    """The final-normed residual: the unembedding's input (the predicted output embedding)."""
    for name in ("unembed.hook_in", "ln_final.hook_normalized"):
        if name in model.hook_dict:
            return name
    return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"


def block_outputs(model: Any) -> list[str]:
    return [f"blocks.{layer}.hook_resid_post" for layer in range(model.cfg.n_layers)]


def _broadcast(stored: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A recorded value (batch 1) for a batch: expand, or tile where batch and positions are
    flattened into one leading dimension (as some models do inside their MLP)."""
    return fit_to(stored, like, max(like.shape[0] // stored.shape[0], 1))


def _spread(factor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-batch-element factor for a value whose leading dim may be batch × positions."""
    if factor.ndim == 0:
        return factor
    if factor.shape[0] != like.shape[0]:
        factor = factor.repeat_interleave(like.shape[0] // factor.shape[0], dim=0)
    return factor.expand_as(like)


def site_hooks(
    model: Any,
    sites: Sequence[Site],
    store: dict[str, torch.Tensor],
    mode: str,
    factors: dict[str, torch.Tensor] | None = None,
    frozen: dict[str, FrozenAttention] | None = None,
) -> list[Hook]:
    """Hook functions that freeze every site.

    ``mode="record"``: detach each coefficient at its current value (the detached
    Jacobian) and store it. ``mode="replay"``: substitute the stored value, whatever the
    input; ``factors`` (site name → per-batch-element multiplier) perturbs chosen sites, to
    prove that each substitution reaches the output. The output value is unchanged in
    record mode. ``frozen`` (attention patterns kept as queries and keys,
    :mod:`lens_linear.hooks.patterns`): given in record mode, each pattern goes there where its
    recipe verifies instead of into ``store``; in replay mode, those layers attend through it.
    """
    factors = factors or {}
    hooks: list[Hook] = []
    for site in sites:
        special = None
        if site.kind == "attn" and frozen is not None and (mode == "record" or site.name in frozen):
            special = attention_hooks(
                model,
                site.name,
                store,
                frozen,
                mode,
                factors.get(site.name),
                recipe_tolerance(model_dtype(model) or torch.float32),
            )
        if special is not None:
            hooks += special
        elif site.kind == "ratio":
            hooks += _ratio_hooks(model, site, store, mode, factors.get(site.name))
        elif site.kind == "moe":
            hooks += moe_hooks(model, site.layer, site.name, store, mode, factors.get(site.name))
        elif site.kind == "scan":
            hooks += scan_hooks(model, site.name, store, mode, factors.get(site.name))
        elif site.kind == "slice":
            hooks.append(
                (
                    site.name,
                    partial(
                        _slice_hook,
                        site=site,
                        store=store,
                        mode=mode,
                        factor=factors.get(site.name),
                    ),
                )
            )
        elif mode == "record":

            def record(value: torch.Tensor, hook: Any, key: str = site.name) -> torch.Tensor:
                store[key] = value.detach()
                return store[key]

            hooks.append((site.name, record))
        else:

            def replay(
                value: torch.Tensor,
                hook: Any,
                key: str = site.name,
                factor: torch.Tensor | None = factors.get(site.name),
            ) -> torch.Tensor:
                frozen = _broadcast(store[key], value)
                return frozen if factor is None else frozen * _spread(factor, value)

            hooks.append((site.name, replay))
    return hooks


def _slice_hook(
    value: torch.Tensor,
    hook: Any,
    site: Site,
    store: dict[str, torch.Tensor],
    mode: str,
    factor: torch.Tensor | None,
) -> torch.Tensor:
    """Freeze thirds ``site.frozen`` of the last dimension, keep the rest live."""
    third = value.shape[-1] // 3
    part = slice(site.frozen[0] * third, site.frozen[1] * third)
    if mode == "record":
        store[site.name] = value.detach()[..., part]
        frozen = store[site.name]
    else:
        frozen = _broadcast(store[site.name], value[..., part])
        frozen = frozen if factor is None else frozen * _spread(factor, frozen)
    return torch.cat([value[..., : part.start], frozen, value[..., part.stop :]], dim=-1)


def _ratio_hooks(
    model: Any,
    site: Site,
    store: dict[str, torch.Tensor],
    mode: str,
    factor: torch.Tensor | None = None,
) -> list[Hook]:
    act = activation_fn(model, site.layer) if site.layer is not None else None
    live: dict[str, torch.Tensor] = {}

    def keep_pre(value: torch.Tensor, hook: Any) -> None:
        live["pre"] = value

    def gate_post(post: torch.Tensor, hook: Any) -> torch.Tensor:
        pre = live.pop("pre", None)
        if mode == "replay":
            gate = _broadcast(store[site.name], pre)
            return pre * (gate if factor is None else gate * _spread(factor, pre))
        if pre is None or pre.shape != post.shape:
            raise LinearizationError(
                f"{site.name} is not an elementwise activation of {site.source} "
                f"(shapes {None if pre is None else tuple(pre.shape)} vs {tuple(post.shape)}); "
                f"this MLP (e.g. a mixture of experts) has no frozen-gate rule.",
                layer=site.layer,
            )
        if act is None:
            raise LinearizationError(
                f"cannot verify the activation of blocks.{site.layer}.mlp: no act_fn found on the "
                f"module (a mixture-of-experts block, say, whose router and expert gates have no "
                f"freezing rule), so freezing {site.name} as a gate could hide a nonlinearity.",
                layer=site.layer,
            )
        with torch.no_grad():
            expected = act(pre)
            err = float((expected - post).abs().max() / post.abs().max().clamp_min(1e-30))
            if err > tolerance(post.dtype):
                raise LinearizationError(
                    f"{site.name} is not act_fn({site.source}) (max relative difference {err:.2e}); "
                    f"the gate rule would hide a nonlinearity, so it is refused.",
                    layer=site.layer,
                    error=err,
                )
            gate = torch.where(
                pre != 0, post / torch.where(pre != 0, pre, 1), slope_at_zero(act, pre)
            )
        store[site.name] = gate
        return post.detach() + (pre - pre.detach()) * gate  # value: post; gradient: gate

    return [(site.source, keep_pre), (site.name, gate_post)]


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
        whole while every layer's pattern together fits in ``PATTERN_BUDGET`` bytes.
        """
        require_tl_model(model)
        sites = find_sites(model, parts)
        values: dict[str, torch.Tensor] = {}
        seen: dict[str, torch.Tensor] = {}
        upstream: dict[str, torch.Tensor] = {}
        tangents: dict[str, torch.Tensor] = {}
        if store_patterns is None:
            store_patterns = patterns_fit(model, tokens.shape[-1])
        frozen: dict[str, FrozenAttention] | None = None if store_patterns else {}

        def grab(value: torch.Tensor, hook: Any) -> torch.Tensor | None:
            seen["x"] = value.detach()[0]
            upstream.update(values)  # sites fired before the input (an embedding norm), by value
            return fwAD.make_dual(value, value.detach()) if tangent_at is not None else None

        def carry(value: torch.Tensor, hook: Any) -> torch.Tensor:
            primal, tangent = fwAD.unpack_dual(value)
            tangents[hook.name] = (torch.zeros_like(value) if tangent is None else tangent)[
                0
            ].clone()
            return primal  # the rest of the forward (the unembedding) needs no tangent

        extra = [(INPUT_HOOK, grab)] + ([(tangent_at, carry)] if tangent_at is not None else [])
        try:
            with torch.no_grad(), contextlib.ExitStack() as stack:
                if tangent_at is not None:
                    stack.enter_context(forward_mode())
                stack.enter_context(
                    hooks_on(
                        model,
                        list(fwd_hooks)
                        + site_hooks(model, sites, values, "record", frozen=frozen)
                        + extra,
                    )
                )
                logits, cache = model.run_with_cache(tokens, names_filter=names_filter)
                logits = fwAD.unpack_dual(logits).primal
        except LinearizationError:
            raise
        except NotImplementedError:
            if tangent_at is None:
                raise
            return cls.record(
                model, tokens, parts, fwd_hooks, names_filter, store_patterns=store_patterns
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
        ``keep_graph``: return that whole-prompt replay's graph, for a Jacobian to reuse.
        """
        out_name = output_hook(self.model)
        checked = [s for s in self.sites if not feeds_frozen_only(s, self.sites)]
        fired = {**self.values, **self.frozen_attention}
        ignored = [s.name for s in checked if s.name not in fired]  # never fired at all
        whole = target is not None and checks_whole_prompt(len(self.x_star), self.fwd_hooks)
        start = 0 if whole or self.fwd_hooks else max(0, len(self.x_star) - SITE_CHECK_POSITIONS)
        factors = {
            s.name: torch.ones(
                (), dtype=self.x_star.dtype, device=self.x_star.device, requires_grad=True
            )
            for s in checked
            if s.name in fired
        }
        x = self.x_star[start:].clone().requires_grad_(whole)  # [pos, d_in]: replay adds the batch
        inputs = list(factors.values()) + ([x] if whole else [])
        with analysis_mode(self.model), torch.enable_grad():
            y = self.replay(x, [out_name], start_pos=start, factors=factors)[out_name]
            if not y.requires_grad:
                return SiteCheck(ignored + list(factors))
            u = centred_projections(n_projections if whole else 1, y.shape, y, seed=1)
            grads = _batched_grad(y, inputs, u, retain_graph=whole and keep_graph)
        ignored += [name for name, g in zip(factors, grads) if g is None or not bool(g.ne(0).any())]
        if not whole:
            return SiteCheck(ignored)
        pulled = torch.zeros_like(u) if grads[-1] is None else grads[-1]  # Uᵀ J⁺: [k, pos, d_in]
        pulled_x = pulled.double().flatten(1) @ self.x_star.double().reshape(-1)
        constant = self.bias_term(out_name) if self.may_add_constant() else None
        return SiteCheck(
            ignored,
            projected_error(u, pulled_x, constant, target),
            (y[0], x) if keep_graph else None,
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
        the models we know). Biases are zeroed in place and restored bit-for-bit in a
        ``finally``: ``torch.func.functional_call`` would not touch the model, but on a
        TransformerBridge it leaves the substituted tensors behind.
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


@dataclass(frozen=True)
class SiteCheck:
    """What :meth:`OperatingPoint.check_sites` found: the sites whose value never reaches the
    output; on a whole-prompt replay, the projected reconstruction error and (asked for) the
    replay's graph, the output at every position and the input leaf it was computed from."""

    ignored: list[str]
    error: float | None = None
    graph: tuple[Float[torch.Tensor, "pos d_out"], Float[torch.Tensor, "pos d_in"]] | None = None


def _batched_grad(
    y: torch.Tensor, inputs: list[torch.Tensor], u: torch.Tensor, retain_graph: bool = False
) -> list[torch.Tensor | None]:
    """``uₖᵀ ∂y/∂input`` for every row ``k`` of ``u`` and every input (``None``: no path), as one
    batched backward, or one backward per row where an op in the graph has no batching rule."""
    try:
        return list(
            torch.autograd.grad(
                y,
                inputs,
                grad_outputs=u,
                retain_graph=True if retain_graph else None,
                is_grads_batched=True,
                allow_unused=True,
            )
        )
    except RuntimeError:
        rows = [
            torch.autograd.grad(y, inputs, grad_outputs=row, retain_graph=True, allow_unused=True)
            for row in u
        ]
        return [
            None if any(g is None for g in column) else torch.stack(column)
            for column in map(list, zip(*rows))
        ]


def centred_projections(
    n: int, shape: Sequence[int], like: torch.Tensor, seed: int
) -> torch.Tensor:
    """``n`` seeded Gaussian rows of ``shape``, each centred: ``u · t`` then projects
    ``t − mean(t)``, as the relative error's ``std()`` measures."""
    u = seeded_randn((n, *shape), like, seed)
    return u - u.flatten(1).mean(1).reshape(-1, *[1] * len(shape))


def projected_error(
    u: torch.Tensor,
    pulled_x: Float[torch.Tensor, "rows"],  # noqa: F821
    constant: torch.Tensor | None,
    target: torch.Tensor,
) -> float:
    """``‖U(J⁺x + c − t)‖ / ‖U t‖`` from ``pulled_x = (Uᵀ J⁺) · x`` (one value per row of ``U``),
    the constant ``c`` (``None``: none) and the target ``t``, in float64."""
    rows = u.double().flatten(1)
    reconstructed = pulled_x.double() + (
        0 if constant is None else rows @ constant.double().reshape(-1)
    )
    expected = rows @ target.double().reshape(-1)
    return float((reconstructed - expected).norm() / expected.norm().clamp_min(1e-300))


def patterns_fit(model: Any, n_pos: int, batch: int = 1) -> bool:
    """Whether every layer's attention pattern for ``batch`` prompts of ``n_pos`` tokens fits
    in ``PATTERN_BUDGET`` bytes (the model's dtype): the default for storing them whole."""
    cfg = model.cfg
    itemsize = (model_dtype(model) or torch.float32).itemsize
    return batch * cfg.n_layers * cfg.n_heads * n_pos * n_pos * itemsize <= PATTERN_BUDGET


def seeded_randn(shape: Sequence[int], like: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Standard normal values from a seeded CPU generator (the same numbers on every device;
    the user's RNG untouched), placed like ``like``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float64, device="cpu").to(like)


def cut_positions(site: Site, value: torch.Tensor, keep: slice, batch: int, n: int) -> torch.Tensor:
    """A frozen value of ``batch`` prompts of ``n`` positions cut to positions ``keep``:
    patterns on both query and key axes; values whose leading dimension flattens batch and
    positions (as some MLPs have) are cut per prompt."""
    if site.kind == "attn":
        return value[:, :, keep, keep]
    if value.shape[0] == batch * n != batch:
        return value.reshape(batch, n, *value.shape[1:])[:, keep].flatten(0, 1)
    return value[:, keep]


def feeds_frozen_only(site: Site, sites: Sequence[Site]) -> bool:
    """A norm that matters only through other frozen values: inside attention (q/k norms, once
    the pattern is frozen) or inside a state-space mixer (on the step sizes' input, once the
    step sizes are frozen). It cannot reach the output, and may run live on a suffix replay."""
    if site.kind != "norm":
        return False
    if ".attn." in site.name and any(s.kind == "attn" for s in sites):
        return True
    return any(
        s.kind == "scan" and site.name.startswith(s.name.rsplit(".", 1)[0] + ".") for s in sites
    )


@contextlib.contextmanager
def biases_zeroed(
    model: torch.nn.Module, keep: str | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Zero every bias (but ``keep``) in place; restore them bit-for-bit on exit, even on error.

    ``torch.func.functional_call`` would not touch the model, but on a TransformerBridge it
    leaves the substituted tensors behind, so the swap is done by hand.
    """
    biases = bias_tensors(model)
    offloaded = [
        n for n, t in biases.items() if t.device.type == "meta" and _offloaded_nonzero(model, n)
    ]
    if (
        offloaded
    ):  # accelerate reloads them from its weights map before every use: a zero would not stick
        raise LinearizationError(
            f"{len(offloaded)} bias(es) of this model are offloaded by accelerate (first {offloaded[0]}), so they "
            f"cannot be zeroed for the bias decomposition, the forward Jacobian engine, the matrix-free SVD or "
            f"steering. Load the model without offloading its biased layers, or use lcache.jacobians(..., "
            f"method='reverse')."
        )
    saved = {n: t.detach().clone() for n, t in biases.items()}
    try:
        with torch.no_grad():
            for name, t in biases.items():
                if name != keep:
                    t.zero_()
        yield biases
    finally:
        with torch.no_grad():
            for name, t in biases.items():
                t.copy_(saved[name])


def _offloaded_nonzero(model: torch.nn.Module, name: str) -> bool:
    """Whether an accelerate-offloaded tensor holds anything but zeros (unknown: ``True``)."""
    path, _, leaf = name.rpartition(".")
    top = getattr(model.get_submodule(path), "_hf_hook", None)
    for hook in getattr(top, "hooks", None) or ([top] if top is not None else []):
        store = getattr(hook, "weights_map", None)
        if store is not None and leaf in store:
            return bool(torch.count_nonzero(store[leaf]))
    return True


@contextlib.contextmanager
def linears_skipped(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Let these linear layers return zeros instead of computing (see
    :meth:`OperatingPoint.dead_linears`); their own ``forward`` is back on exit, even on error."""

    def zeros(module: torch.nn.Linear, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], module.out_features)

    saved = [
        (module, vars(module).get("forward")) for module in modules
    ]  # accelerate wraps forward here
    try:
        for module in modules:
            module.forward = partial(zeros, module)
        yield
    finally:
        for module, own in saved:
            if own is None:
                vars(module).pop("forward", None)
            else:
                module.forward = own


def _is_bias(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf in ("bias", "b") or leaf.startswith("b_")


def bias_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every bias parameter or buffer, one per memory block.

    A bridge can expose one bias twice (a joint QKV bias and per-projection views of it):
    of tensors sharing storage only the largest is kept, so no share is counted twice.
    """
    named = [(n, t) for n, t in [*model.named_parameters(), *model.named_buffers()] if _is_bias(n)]
    best: dict[int, tuple[str, torch.Tensor]] = {}
    for name, t in named:
        key = t.untyped_storage().data_ptr()
        if key not in best or t.numel() > best[key][1].numel():
            best[key] = (name, t)
    return dict(best.values())


@contextlib.contextmanager
def analysis_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no parameter requiring grad: the Jacobians we take are
    w.r.t. activations, so a graph built here saves no layer inputs for weight gradients
    (less memory, faster). Every module's flag and parameter's ``requires_grad`` are
    restored on exit, even on error."""
    modes = [(m, m.training) for m in model.modules()]
    params = [p for p in model.parameters() if p.requires_grad]
    for module, training in modes:  # the flag itself: ``model.eval()`` on a bridge costs ~0.1 s
        if training:
            module.training = False
    try:
        for param in params:
            param.requires_grad_(False)
        yield
    finally:
        for module, training in modes:
            module.training = training
        for param in params:
            param.requires_grad_(True)


HALF = (torch.float16, torch.bfloat16)


def model_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


@contextlib.contextmanager
def computing_in(model: torch.nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Run the model's floating-point parameters and buffers in ``dtype`` for the duration.

    The original tensors are put back on exit (the same storage: bit for bit), even on
    error. Costs one copy of the weights in ``dtype`` while it lasts (for a bfloat16 model in
    float32: twice the model's size)."""
    own = model_dtype(model) or dtype
    if own == dtype:  # already there (or nested inside another computing_in): nothing to do
        yield
        return
    if any(p.device.type == "meta" for p in model.parameters()):
        raise LinearizationError(
            f"this model's weights are offloaded by accelerate: they cannot be copied to "
            f"{dtype} for the computation. Compute in the model's own dtype ({own})."
        )
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    cfg = getattr(model, "cfg", None)
    cfg_dtype = getattr(cfg, "dtype", None)
    try:
        for t in [*model.parameters(), *model.buffers()]:
            if (
                t.dtype == own
            ):  # buffers kept in another precision (rotary frequencies) stay as they are
                saved.append((t, t.data))
                t.data = t.data.to(dtype)
        if cfg_dtype is not None:
            cfg.dtype = dtype
        yield
    finally:
        for t, data in saved:
            t.data = data
        if cfg_dtype is not None:
            cfg.dtype = cfg_dtype


def input_embeddings(
    model: Any, tokens: Int[torch.Tensor, "1 pos"]
) -> Float[torch.Tensor, "pos d_model"]:
    """The input variable ``x`` (``blocks.0.hook_resid_pre``) of ``tokens``; the forward stops there."""
    with torch.no_grad():
        return run_to(model, tokens, capture=[INPUT_HOOK], detach=True)[INPUT_HOOK][0]
