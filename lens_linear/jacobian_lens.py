"""The Jacobian lens (TransformerLens' ``JacobianLens``), fitted by batched products.

For each source layer ``l`` the lens is one ``[d_model, d_model]`` transport from the output
of block ``l`` to the output of the last block (before the final norm)::

    J_l = mean over prompts of  (1/|V|) Σ_{t ∈ V} Σ_{t' ∈ V} ∂h_final,t' / ∂h_l,t

with ``V`` the valid positions (the first ``skip_first_positions`` and the last excluded).
TransformerLens' ``JacobianLens.fit`` replicates each prompt ``dim_batch`` times and runs
``⌈d_model / dim_batch⌉`` backward passes; here one forward per prompt is followed by
batched backward passes of as many rows as the memory budget allows
(``is_grads_batched``), every source layer read off the same pass. The backward work is the
same ``d_model`` rows through every layer above the first source layer: on a CPU both are
bound by that arithmetic, on a GPU the batched rows fill the device.

``detached=True`` fits the lens of the frozen map: every norm scale, attention pattern, gate,
router and scan coefficient frozen at the prompt's own values (the recording of
:class:`~lens_linear.hooks.OperatingPoint`), so each prompt's transport is the Jacobian of an
exactly linear map, verified for every prompt (its replay reproduces the model's final
block and is affine along the prompt's own activation), for every family lens_linear
linearizes, mixtures of experts and state-space models included.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from lens_linear._compat import model_revision
from lens_linear._validation import (
    LinearizationError,
    normalize_index,
    relative_error,
    require_tl_model,
    tolerance,
)
from lens_linear.hooks.contexts import analysis_mode
from lens_linear.hooks.freeze import site_hooks
from lens_linear.hooks.operating_point import OperatingPoint
from lens_linear.hooks.run import hooks_on, run_to
from lens_linear.hooks.sites import find_sites
from lens_linear.jacobian import pullback_rows
from lens_linear.memory import chunk_size, sequence_bytes
from lens_linear.tokens import model_device, model_dtype, to_tokens, token_strings

ESTIMATORS = {False: "jacobian_lens", True: "detached_jacobian_lens"}
HOOK_CONVENTION = "blocks.{layer}.hook_out"  # = blocks.{layer}.hook_resid_post


def resid_post(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def source_layer(model: Any, layer: int) -> int:
    """A source layer index (negative counts from ``n_layers``, as in TransformerLens), below
    the last block, whose output is the lens's target."""
    n_layers = model.cfg.n_layers
    layer = normalize_index(layer, n_layers)
    if layer >= n_layers - 1:
        raise ValueError(
            f"source layers must lie below the last block ({n_layers - 1}), the lens's target; "
            f"got {layer}"
        )
    return layer


def valid_positions(n_pos: int, skip_first_positions: int) -> range:
    """Source and target positions of the estimator: the first ``skip_first_positions`` (atypical
    attention-sink residuals) and the last (no next token) left out, as in TransformerLens."""
    return range(skip_first_positions, n_pos - 1)


def prompt_transports(
    model: Any,
    tokens: Int[torch.Tensor, "1 pos"],
    source_layers: Sequence[int],
    *,
    detached: bool = False,
    skip_first_positions: int = 16,
    max_memory: int | None = None,
    progress: bool = False,
    point: OperatingPoint | None = None,
) -> dict[int, Float[torch.Tensor, "d_model d_model"]]:
    """One prompt's transports ``(1/|V|) Σ_{t∈V} Σ_{t'∈V} ∂h_final,t'/∂h_l,t``, float64, for
    each source layer ``l`` (the rows are output dimensions, as in ``JacobianLens``).

    One forward from the first source layer on (that layer's output made a leaf, so nothing
    below it enters the graph), then ``d_model`` cotangents, each one output dimension at
    every valid target position, pulled back in batched chunks; every source layer's rows
    are summed over the valid source positions as each chunk arrives. ``detached``: through
    the frozen map of this prompt (``point``, where it is already recorded: a
    :class:`~lens_linear.LinearCache`'s, with its user hooks and dtype), verified before
    anything is returned."""
    cfg = model.cfg
    n_pos, d_model, last = tokens.shape[-1], cfg.d_model, cfg.n_layers - 1
    valid = list(valid_positions(n_pos, skip_first_positions))
    names = [resid_post(layer) for layer in source_layers]
    target = resid_post(last)
    sums = {  # accumulated on the CPU in float64, as the lens's matrices are kept
        layer: torch.zeros(d_model, d_model, dtype=torch.float64, device="cpu")
        for layer in source_layers
    }
    with analysis_mode(model), torch.enable_grad():
        if detached:
            if point is None:
                point, _, cache = OperatingPoint.record(
                    model, tokens, names_filter=[names[0], target], max_memory=max_memory
                )
            else:
                cache = point.activations
            root = cache[names[0]][0].detach().to(point.x_star.dtype)
            # positions before the first valid one reach no valid source's rows: with the
            # coefficients frozen they only add constants, so the replay leaves them out (not
            # under user hooks, which may index absolute positions)
            start = 0 if point.fwd_hooks else skip_first_positions
            leaf = root[start:].clone().requires_grad_(True)
            with point.computing():
                out = point.replay(leaf, [*names, target], input_hook=names[0], start_pos=start)
        else:

            def make_leaf(value: torch.Tensor, hook: Any) -> torch.Tensor:
                return value.detach().requires_grad_(True)

            out = run_to(model, tokens, [(names[0], make_leaf)], capture=[*names, target])
            root, start = None, 0
        y = out[target]  # [1, pos - start, d_model]
        rows_at = torch.tensor([t - start for t in valid], device=y.device)
        pulled = torch.zeros(d_model, dtype=torch.float64, device="cpu")  # u_iᵀ J h*: the check

        def cotangent(rows: slice) -> torch.Tensor:
            u = y.new_zeros(rows.stop - rows.start, *y.shape)
            dims = torch.arange(rows.start, rows.stop, device=y.device)
            u[
                torch.arange(len(dims), device=y.device)[:, None], 0, rows_at[None], dims[:, None]
            ] = 1
            return u

        def take(rows: slice, grads: Sequence[torch.Tensor]) -> None:
            for layer, grad in zip(source_layers, grads):
                part = grad[:, 0, rows_at.to(grad.device)].double().sum(1) / len(valid)
                sums[layer][rows] = part.cpu()  # each row once
            if root is not None:
                g = grads[0][:, 0]  # the leaf's rows: every position replayed
                pulled[rows] = (g.double().flatten(1) @ root[start:].double().reshape(-1)).cpu()

        row_bytes = sequence_bytes(cfg, n_pos, y.dtype) + len(names) * n_pos * d_model * 8
        chunk = chunk_size(d_model, row_bytes, max_memory, device=y.device)
        pullback_rows(y, [out[n] for n in names], cotangent, d_model, chunk, take, progress)
    if detached:
        verify_frozen(point, names[0], target, root, start, pulled, y[0].detach(), cache, valid)
    return sums


def verify_frozen(
    point: OperatingPoint,
    root_name: str,
    target: str,
    root: Float[torch.Tensor, "pos d_model"],
    start: int,
    pulled: Float[torch.Tensor, "d_model"],  # noqa: F821
    replayed: Float[torch.Tensor, "pos_replayed d_model"],
    cache: Any,
    valid: list[int],
) -> None:
    """Raise :class:`LinearizationError` unless the rows came from the prompt's exact frozen
    map, for three more replays (no backward):

    * the frozen map from ``root_name`` reproduces the model's ``target`` at the prompt;
    * the replayed map (positions ``start..``) is affine along the prompt's own activation
      ``h*``: for every row ``u_i`` (one output dimension at every valid target),
      ``u_iᵀ J h* = u_iᵀ (F(h*) − F(0))``, ``d_model`` projections at once; a coefficient left
      live makes it fail;
    * where positions before ``start`` were left out, the replayed map's linear part equals
      the whole prompt's along ``h*``."""
    tol = tolerance(root.dtype)
    local = [t - start for t in valid]

    def replay(x: torch.Tensor, first: int = 0) -> torch.Tensor:
        return point.replay(x, [target], input_hook=root_name, start_pos=first)[target]

    def refuse(what: str, err: float) -> LinearizationError:
        layer, layer_err = point.locate_break(tol)
        where = (
            f"; linearity first breaks at blocks.{layer} ({layer_err:.2e})"
            if layer is not None
            else ""
        )
        return LinearizationError(
            f"the frozen map from {root_name} to {target} {what} (relative error {err:.2e} > "
            f"{tol:.0e}{where}): a nonlinearity is not frozen where the model reads it. Fit the "
            f"ordinary lens (detached=False) instead.",
            layer=layer,
            error=err,
        )

    with torch.no_grad(), point.computing():
        if start:  # the whole prompt at h*, at h*'s replayed part alone, and at zero: one pass
            padded = torch.cat([torch.zeros_like(root[:start]), root[start:]])
            whole, part, zero_out = replay(torch.stack([root, padded, torch.zeros_like(root)]))
        else:
            whole = replayed
        err = relative_error(whole[valid], cache[target][0].to(whole.dtype)[valid])
        if not err <= tol:
            raise refuse("does not reproduce the model", err)
        zero = torch.zeros_like(root[start:])
        constant = replay(zero, start)[0] if start or point.may_add_constant() else zero
        linear = (replayed - constant)[local]
        err = relative_error(pulled, linear.double().sum(0).cpu())
        if not err <= tol:
            raise refuse("is not linear", err)
        if start:
            err = relative_error(linear, (part - zero_out)[valid])
            if not err <= tol:
                raise refuse(
                    "replayed from the first valid position differs from the whole prompt's", err
                )


# ---- one input's readout, exactly decomposed --------------------------------------------------


def readout_functional(
    model: Any,
    v: Float[torch.Tensor, "d_model"],  # noqa: F821
    token: int,
) -> tuple[Float[torch.Tensor, "d_model"], float]:  # noqa: F821
    """The lens readout of ``token`` (its logit before any soft cap) at the transported vector
    ``v`` as ``g · v + c``: the final norm's coefficients frozen at ``v``'s own statistics (as
    the readout computes them), so the readout is affine and any split of ``v`` splits it."""
    sites = [site for site in find_sites(model) if site.name.startswith("ln_final.")]
    dtype = model_dtype(model) or torch.float32
    leaf = v.detach().to(dtype).clone().requires_grad_(True)
    with (
        analysis_mode(model),
        torch.enable_grad(),
        hooks_on(model, site_hooks(model, sites, {}, "record")),
    ):
        logit = model.unembed(model.ln_final(leaf[None, None]))[0, 0, token]
        (g,) = torch.autograd.grad(logit, leaf)
    return g.double(), float(logit.detach().double() - g.double() @ leaf.detach().double())


# ---- the lens class: TransformerLens' where it has one ---------------------------------------


@dataclass
class JacobianLensReadout:
    """Per-layer top-k lens logits of one prompt (TransformerLens' ``JacobianLensReadout``
    fields, for :class:`CompatibleJacobianLens`)."""

    lens_topk_values: dict[int, Float[torch.Tensor, "pos k"]]
    lens_topk_indices: dict[int, Int[torch.Tensor, "pos k"]]
    model_topk_values: Float[torch.Tensor, "pos k"]
    model_topk_indices: Int[torch.Tensor, "pos k"]
    tokens: Int[torch.Tensor, "seq"]  # noqa: F821
    positions: list[int]
    use_jacobian: bool = True


class CompatibleJacobianLens:
    """TransformerLens' ``JacobianLens`` fields, ``save``/``load`` format, ``merge``,
    ``transport`` and ``readout``, for TransformerLens versions before 3.9 and for the
    ``HookedTransformer`` (whose readout TransformerLens' class refuses)."""

    def __init__(
        self,
        jacobians: dict[int, Float[torch.Tensor, "d_model d_model"]],
        *,
        n_prompts: int,
        d_model: int,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if not jacobians:
            raise ValueError("jacobians must contain at least one layer")
        for layer, matrix in jacobians.items():
            if tuple(matrix.shape) != (d_model, d_model):
                raise ValueError(
                    f"jacobians[{layer}] has shape {tuple(matrix.shape)}, expected "
                    f"({d_model}, {d_model})"
                )
        self.jacobians = {int(k): v.detach().float().cpu() for k, v in jacobians.items()}
        self.n_prompts = int(n_prompts)
        self.d_model = int(d_model)
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.estimator: str = self.metadata.get("estimator", ESTIMATORS[False])

    @property
    def source_layers(self) -> list[int]:
        return sorted(self.jacobians)

    def __repr__(self) -> str:
        layers = self.source_layers
        return (
            f"JacobianLens(layers={layers[0]}..{layers[-1]} ({len(layers)}), "
            f"d_model={self.d_model}, n_prompts={self.n_prompts})"
        )

    def save(self, path: str, *, dtype: torch.dtype = torch.float16) -> None:
        """The reference artifact format (``J``, ``n_prompts``, ``source_layers``, ``d_model``,
        plus ``metadata``), loadable by TransformerLens' class."""
        payload: dict[str, Any] = {
            "J": {layer: m.to(dtype) for layer, m in self.jacobians.items()},
            "n_prompts": self.n_prompts,
            "source_layers": self.source_layers,
            "d_model": self.d_model,
        }
        if self.metadata:
            payload["metadata"] = self.metadata
        torch.save(payload, path)

    @classmethod
    def load(cls, path: str) -> "CompatibleJacobianLens":
        """An artifact (``J``) or a fit checkpoint (``jacobian_sum``, ``n_done``)."""
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if "J" in payload:
            return cls(
                {int(k): v for k, v in payload["J"].items()},
                n_prompts=int(payload.get("n_prompts", 0)),
                d_model=int(payload["d_model"]),
                metadata=payload.get("metadata"),
            )
        if "jacobian_sum" in payload:
            n = int(payload["n_done"])
            sums = {int(k): v.double() / max(n, 1) for k, v in payload["jacobian_sum"].items()}
            d_model = next(iter(sums.values())).shape[0]
            meta = dict(payload.get("metadata") or {}, converted_from="jacobian_lens_checkpoint")
            return cls(sums, n_prompts=n, d_model=d_model, metadata=meta)
        raise ValueError(f"{path} is neither a Jacobian lens artifact ('J') nor a checkpoint")

    @classmethod
    def merge(cls, lenses: Sequence["CompatibleJacobianLens"]) -> "CompatibleJacobianLens":
        """Lenses of disjoint prompt slices, averaged by prompt count; provenance must agree."""
        if not lenses:
            raise ValueError("cannot merge an empty sequence of lenses")
        first = lenses[0]
        same = {k: v for k, v in first.metadata.items() if k != "n_prompts"}
        for other in lenses[1:]:
            if other.source_layers != first.source_layers or other.d_model != first.d_model:
                raise ValueError("lenses being merged must share source_layers and d_model")
            if {k: v for k, v in other.metadata.items() if k != "n_prompts"} != same:
                raise ValueError("lenses being merged must share provenance apart from n_prompts")
        total = sum(lens.n_prompts for lens in lenses)
        merged = {
            layer: sum(lens.jacobians[layer].double() * lens.n_prompts for lens in lenses) / total
            for layer in first.source_layers
        }
        return cls(
            merged, n_prompts=total, d_model=first.d_model, metadata=dict(same, n_prompts=total)
        )

    def transport(self, residual: Float[torch.Tensor, "... d_model"], layer: int) -> torch.Tensor:
        """``J[layer] h`` for every vector, float32."""
        if layer not in self.jacobians:
            raise ValueError(
                f"layer {layer} is not in this lens's source layers {self.source_layers}"
            )
        return residual.float() @ self.jacobians[layer].to(residual.device).T

    @torch.no_grad()
    def readout(
        self,
        model: Any,
        input: str | torch.Tensor,
        *,
        layers: Sequence[int] | None = None,
        positions: Sequence[int] | None = None,
        use_jacobian: bool = True,
        top_k: int = 10,
    ) -> JacobianLensReadout:
        """Per-layer logits of one prompt: each layer's residual transported (or not, the
        logit lens) and read through the model's own final norm and unembedding."""
        tokens = to_tokens(model, input)
        final = model.cfg.n_layers - 1
        layers = [
            normalize_index(layer, model.cfg.n_layers)
            for layer in (self.source_layers + [final] if layers is None else layers)
        ]
        n_pos = tokens.shape[-1]
        positions = [p % n_pos for p in (range(n_pos) if positions is None else positions)]
        wanted = {resid_post(layer) for layer in layers if layer != final}
        logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name in wanted)
        model_logits = logits[0, positions].float()
        model_top = model_logits.topk(top_k, dim=-1)
        values, indices = {}, {}
        for layer in layers:
            if layer == final:
                top = model_top
            else:
                h = cache[resid_post(layer)][0, positions]
                h = self.transport(h, layer) if use_jacobian else h.float()
                top = read_logits(model, h).float().topk(top_k, dim=-1)
            values[layer], indices[layer] = top.values.cpu(), top.indices.cpu()
        return JacobianLensReadout(
            values,
            indices,
            model_top.values.cpu(),
            model_top.indices.cpu(),
            tokens[0].cpu(),
            positions,
            use_jacobian,
        )


def read_logits(model: Any, residual: Float[torch.Tensor, "... d_model"]) -> torch.Tensor:
    """Vectors of the last block's output basis read as the model reads it: its final norm,
    its unembedding and its output transform (logit scale, soft cap): TransformerLens'
    ``logit_readout`` for a bridge where TransformerLens has it, else the soft cap by hand."""
    try:
        from transformer_lens.tools.analysis.logit_lens import logit_readout
    except ImportError:
        logit_readout = None
    if logit_readout is not None and type(model).__name__ == "TransformerBridge":
        return logit_readout(model, residual, apply_ln=True).values
    dtype = model_dtype(model) or torch.float32
    logits = model.unembed(model.ln_final(residual.to(dtype)))
    cap = getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0
    return logits if cap <= 0 else cap * torch.tanh(logits / cap)


def lens_class(model: Any) -> type:
    """TransformerLens' ``JacobianLens`` for a ``TransformerBridge`` (TransformerLens ≥ 3.9);
    the compatible class for a ``HookedTransformer`` (whose readout TransformerLens' class
    refuses) or an older TransformerLens."""
    try:
        from transformer_lens.tools.analysis import JacobianLens
    except ImportError:
        return CompatibleJacobianLens
    return JacobianLens if type(model).__name__ == "TransformerBridge" else CompatibleJacobianLens


# ---- fitting ---------------------------------------------------------------------------------


def fit_jacobian_lens(
    model: Any,
    prompts: Sequence[str | torch.Tensor],
    *,
    detached: bool = False,
    source_layers: Sequence[int] | None = None,
    max_seq_len: int = 128,
    skip_first_positions: int = 16,
    corpus: str = "unnamed",
    max_memory: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
) -> Any:
    """Fit a Jacobian lens: TransformerLens' ``JacobianLens`` estimator, batched.

    Args:
        model: a ``TransformerBridge`` or ``HookedTransformer`` (float32 for the
            highest-fidelity fit); returned untouched.
        prompts: prompt strings or token-id tensors. A prompt of at most
            ``skip_first_positions + 1`` tokens has no valid position: skipped, with a warning.
        detached: ``False`` (default): the ordinary lens, equal to ``JacobianLens.fit`` with
            the same prompts and options. ``True``: the lens of each prompt's frozen map (norm
            scales, patterns, gates, routers, scans frozen at the prompt's own values),
            verified per prompt, for every family lens_linear linearizes.
        source_layers: block outputs to fit (default every block but the last; negative
            indices count from the end).
        max_seq_len: prompts are cut to this many tokens.
        skip_first_positions: leading positions left out of the sources and targets.
        corpus: a name for the prompts, kept in the lens's metadata.
        max_memory: the memory budget in bytes (:mod:`lens_linear.memory`): each chunk of
            backward rows takes at most half of it.
        checkpoint: a file written atomically after every prompt (the reference
            implementation's running-sum format, readable by ``JacobianLens.load``); a fit
            given an existing checkpoint of the same model, options and prompts resumes after
            its last prompt. Under ``torch.distributed`` each rank writes its own
            (``name.rank{r}-of-{w}.pt``).
        progress: a progress bar over prompts.
        metadata: extra provenance for the lens's metadata.

    Under ``torch.distributed`` (gloo on CPUs, NCCL on GPUs, initialized by the caller) each
    rank fits every ``world_size``-th prompt and the sums are all-reduced: every rank returns
    the lens of all prompts, equal to a single-process fit (sums are kept in float64).

    Returns:
        TransformerLens' ``JacobianLens`` for a bridge (:class:`CompatibleJacobianLens` for a
        ``HookedTransformer`` or a TransformerLens before 3.9), with
        ``metadata["estimator"]`` ``"jacobian_lens"`` or ``"detached_jacobian_lens"``.

    Example:
        >>> lens = fit_jacobian_lens(model, prompts, detached=True)
        >>> lens.readout(model, "The Eiffel Tower is in the city of").top_tokens(model.tokenizer)
    """
    require_tl_model(model)
    n_layers = model.cfg.n_layers
    if n_layers < 2:
        raise ValueError("a Jacobian lens needs at least two blocks (sources below the last)")
    layers = sorted(
        {source_layer(model, layer) for layer in (source_layers or range(n_layers - 1))}
    )
    if isinstance(prompts, (str, torch.Tensor)):
        prompts = [prompts]
    if not isinstance(skip_first_positions, int) or skip_first_positions < 0:
        raise ValueError(
            f"skip_first_positions must be a non-negative int, got {skip_first_positions!r}"
        )
    if not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise ValueError(f"max_seq_len must be an int of at least 2, got {max_seq_len!r}")
    if not isinstance(corpus, str) or not corpus.strip():
        raise ValueError("corpus must be a non-empty name for the prompts")
    options = dict(
        detached=detached, max_seq_len=max_seq_len, skip_first_positions=skip_first_positions
    )
    meta = fit_metadata(model, layers, corpus, options, metadata)
    rank, world = distributed_rank()
    mine = list(range(rank, len(prompts), world))
    state = FitState.start(
        None if checkpoint is None else rank_path(Path(checkpoint), rank, world),
        layers,
        model.cfg.d_model,
        meta,
    )
    if state.next_index:  # a resumed fit: the prompts done must be the same prompts
        state.check_prompts(
            to_tokens(model, prompts[i], max_len=max_seq_len) for i in mine[: state.next_index]
        )
    bar = tqdm(
        total=len(mine),
        initial=state.next_index,
        desc="fitting Jacobian lens",
        disable=not progress,
    )
    with bar:
        for k in range(state.next_index, len(mine)):
            tokens = to_tokens(model, prompts[mine[k]], max_len=max_seq_len).to(model_device(model))
            if tokens.shape[-1] <= skip_first_positions + 1:
                warnings.warn(
                    f"prompt {mine[k]} skipped: {tokens.shape[-1]} tokens, none valid "
                    f"(needs more than skip_first_positions + 1 = {skip_first_positions + 1})",
                    stacklevel=2,
                )
            else:
                found = prompt_transports(
                    model,
                    tokens,
                    layers,
                    detached=detached,
                    skip_first_positions=skip_first_positions,
                    max_memory=max_memory,
                )
                state.add(found)
            state.advance(tokens)
            bar.update()
    sums, n_done = state.reduced(model_device(model))
    if n_done == 0:
        raise ValueError(
            "every prompt was too short to have a valid position: nothing was fitted "
            f"(a prompt needs more than skip_first_positions + 1 = {skip_first_positions + 1} tokens)"
        )
    meta["n_prompts"] = n_done
    return lens_class(model)(
        {layer: (sums[layer] / n_done).float() for layer in layers},
        n_prompts=n_done,
        d_model=model.cfg.d_model,
        metadata=meta,
    )


def fit_metadata(
    model: Any,
    layers: list[int],
    corpus: str,
    options: dict[str, Any],
    extra: dict[str, Any] | None,
) -> dict[str, Any]:
    """Provenance in TransformerLens' keys (so its ``validate_model``, ``readout`` and
    ``merge`` read it), the estimator named."""
    meta = {
        "model_name": getattr(model.cfg, "model_name", None),
        "model_revision": model_revision(model),
        "transformer_lens_version": version("transformer-lens"),
        "lens_linear_version": version("lens_linear"),
        "model_system": type(model).__name__,
        "estimator": ESTIMATORS[bool(options["detached"])],
        "processing": {"compatibility_mode": False, "weight_basis": "raw_huggingface"},
        "hook_convention": HOOK_CONVENTION,
        "corpus": corpus,
        "n_prompts": 0,
        "fit_dtype": str(model_dtype(model)).removeprefix("torch."),
        "target_layer": model.cfg.n_layers - 1,
        "source_layers": list(layers),
        "max_seq_len": options["max_seq_len"],
        "skip_first_positions": options["skip_first_positions"],
    }
    clash = sorted(set(meta) & set(extra or {}))
    if clash:
        raise ValueError(f"metadata cannot override the fit's own provenance keys: {clash}")
    return {**(extra or {}), **meta}


def distributed_rank() -> tuple[int, int]:
    """``(rank, world_size)`` under an initialized ``torch.distributed``, else ``(0, 1)``."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_path(path: Path, rank: int, world: int) -> Path:
    return path if world == 1 else path.with_name(f"{path.stem}.rank{rank}-of-{world}{path.suffix}")


@dataclass
class FitState:
    """The running sums of a fit and where it stands, saved atomically after every prompt
    in the reference implementation's checkpoint schema (``jacobian_sum``, ``n_done``,
    ``next_idx``, ``source_layers``, ``target_layer``, ``skip_first``, ``metadata``), plus a
    digest of the prompts done, so a resumed fit is the same fit."""

    path: Path | None
    sums: dict[int, torch.Tensor]
    n_done: int
    next_index: int
    digest: str
    metadata: dict[str, Any]

    @classmethod
    def start(
        cls, path: Path | None, layers: list[int], d_model: int, meta: dict[str, Any]
    ) -> "FitState":
        fresh = cls(
            path,
            {  # the running sums live on the CPU, whatever the model's device
                layer: torch.zeros(d_model, d_model, dtype=torch.float64, device="cpu")
                for layer in layers
            },
            0,
            0,
            hashlib.sha256().hexdigest(),
            meta,
        )
        if path is None or not path.exists():
            return fresh
        saved = torch.load(path, map_location="cpu", weights_only=True)
        kept = {k: v for k, v in saved.get("metadata", {}).items() if k != "n_prompts"}
        if kept != {k: v for k, v in meta.items() if k != "n_prompts"}:
            raise ValueError(
                f"checkpoint {path} belongs to another fit (model, options or corpus differ): "
                f"remove it or pass another checkpoint path"
            )
        return cls(
            path,
            {int(k): v.double() for k, v in saved["jacobian_sum"].items()},
            int(saved["n_done"]),
            int(saved["next_idx"]),
            saved["prompt_digest"],
            meta,
        )

    def check_prompts(self, done: Any) -> None:
        digest = hashlib.sha256().hexdigest()
        for tokens in done:
            digest = _chained(digest, tokens)
        if digest != self.digest:
            raise ValueError(
                f"checkpoint {self.path} was written for other prompts than these (its first "
                f"{self.next_index} differ): remove it or pass the prompts it was fitted on"
            )

    def add(self, found: dict[int, torch.Tensor]) -> None:
        for layer, matrix in found.items():
            self.sums[layer] += matrix
        self.n_done += 1

    def advance(self, tokens: torch.Tensor) -> None:
        """One more prompt done (fitted or skipped), checkpointed."""
        self.next_index += 1
        self.digest = _chained(self.digest, tokens)
        if self.path is not None:
            self.save()

    def save(self) -> None:
        payload = {
            "jacobian_sum": self.sums,
            "n_done": self.n_done,
            "next_idx": self.next_index,
            "source_layers": sorted(self.sums),
            "target_layer": self.metadata["target_layer"],
            "skip_first": self.metadata["skip_first_positions"],
            "prompt_digest": self.digest,
            "metadata": dict(self.metadata, n_prompts=self.n_done),
        }
        partial = self.path.with_name(self.path.name + ".partial")
        torch.save(payload, partial)
        os.replace(partial, self.path)  # atomic: a stop leaves the old or the new one whole

    def reduced(self, device: torch.device) -> tuple[dict[int, torch.Tensor], int]:
        """The sums and prompt count of every rank (all-reduced under ``torch.distributed``)."""
        rank, world = distributed_rank()
        if world == 1:
            return self.sums, self.n_done
        dist = torch.distributed
        on = device if dist.get_backend() == "nccl" else torch.device("cpu")
        layers = sorted(self.sums)
        flat = torch.cat(
            [self.sums[layer].flatten() for layer in layers]
            + [torch.tensor([float(self.n_done)], dtype=torch.float64)]
        ).to(on)
        dist.all_reduce(flat)
        flat = flat.cpu()
        size = self.sums[layers[0]].numel()
        sums = {
            layer: flat[i * size : (i + 1) * size].view_as(self.sums[layer])
            for i, layer in enumerate(layers)
        }
        return sums, int(flat[-1])


def _chained(digest: str, tokens: torch.Tensor) -> str:
    return hashlib.sha256(digest.encode() + tokens.cpu().long().numpy().tobytes()).hexdigest()


# ---- lenses side by side on one input ---------------------------------------------------------

OWN_MAP = "this input's own map (detached)"


@torch.no_grad()
def lens_table(
    lcache: Any,
    lenses: dict[str, Any] | None = None,
    *,
    token: int | None = None,
    pos: int | None = None,
) -> list[dict]:
    """Each source layer's residual at ``pos`` read as the model's output through each lens:
    the probability and rank of ``token`` and the top token, one row per layer and lens.

    The logit lens (``"logit lens"``) reads block ``layer``'s output as if it were the last
    block's; a Jacobian lens first carries it there (``lens.transport``), so comparing them
    layer by layer shows how much of a readout's early answer (or its absence) is the
    transport. ``lenses`` maps names to fitted lenses (their common source layers are read);
    ``None`` compares with this input's own transport through its frozen map
    (:meth:`~lens_linear.LinearCache.transport`, every layer below the last), the lens a
    detached fit on this input alone would give. ``token`` defaults to the model's own top
    prediction at ``pos`` (default the cache's position).

    Rows: ``{"layer", "lens", "probability", "rank", "top_token"}`` (rank 0: the top token).
    """
    model = lcache.model
    top = lcache.top_predictions(1, pos=pos)[0]  # also checks pos
    token = top.token_id if token is None else int(token)
    pos = lcache.pos if pos is None else pos % lcache.n_pos
    transports: dict[str, Callable] = {"logit lens": lambda h, layer: h}
    layers = set(range(model.cfg.n_layers - 1))
    if lenses is None:
        own = lcache.transports(sorted(layers))  # one set of backward passes for every layer
        transports[OWN_MAP] = lambda h, layer: h.double() @ own[layer].to(h.device).T
    for name, lens in (lenses or {}).items():
        transports[name] = lens.transport
        layers &= set(lens.source_layers)
    rows = []
    for layer in sorted(layers):
        h = lcache.activations[resid_post(layer)][0, pos]
        for name, transport in transports.items():
            logits = read_logits(model, transport(h, layer)[None, None])[0, 0].double()
            rows.append(
                {
                    "layer": layer,
                    "lens": name,
                    "probability": float(logits.softmax(-1)[token]),
                    "rank": int((logits > logits[token]).sum()),
                    "top_token": token_strings(model, [int(logits.argmax())])[0],
                }
            )
    return rows
