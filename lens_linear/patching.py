"""Activation patching, its Jacobian prediction, and steering with a detached Jacobian.

* :func:`activation_patching` — patch clean activations into the corrupted run, one sweep
  (residual stream, attention/MLP outputs, heads) as a few batched forwards: the patched runs
  of a chunk share one batch, each patch's copy joining it at its own block's input, so the
  layers before a patch run once, on the unpatched prompts. ``detached=True`` runs every
  patch through the corrupted run's operating point instead (the frozen map: exactly affine).
* :func:`predicted_patching` — the same table from gradients of the corrupted run: by
  default the route measured closest to real patching (:data:`DEFAULT_PREDICTION`: the
  ordinary gradient, its largest entries certified by real patched runs, integrated along
  the input path for residual and MLP sweeps); ``detached=True`` takes the gradient of the
  frozen map, exact for it (for a metric linear in the logits); ``detached=False`` is the
  ordinary gradient (attribution patching, as
  ``transformer_lens.tools.analysis.attribution_patch``).

Metrics are written as for ``transformer_lens.patching`` (its ``patching_metric``): a
function of logits ``[batch, pos, d_vocab]`` returning a scalar, so
``lambda logits: (logits[:, -1, a] - logits[:, -1, b]).mean()`` works unchanged. Here the
``pos`` axis holds one position, each pair's last real token: a right-padded shorter pair is
read where its prompt ends, not at its padding, and only those rows are unembedded. The
default is the mean logit difference between each pair's answer and wrong answer.

Both patching functions take the same arguments and return a :class:`PatchingTable` naming
its ``method``.

* :func:`steer` — the paper's equation 16: a layer's activation mixed with the concept
  prompt's frozen map applied to the new prompt's embeddings, token by token.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable, Iterator, Sequence

import torch
from jaxtyping import Bool, Float, Int
from tqdm.auto import tqdm

from lens_linear._validation import normalize_index, require_tl_model
from lens_linear.hooks.contexts import analysis_mode, biases_zeroed
from lens_linear.hooks.freeze import site_hooks
from lens_linear.hooks.operating_point import OperatingPoint
from lens_linear.hooks.run import Hook, forward, input_embeddings, run_to
from lens_linear.hooks.sites import INPUT_HOOK, find_sites, layer_of, output_hook
from lens_linear.memory import chunk_size, patterns_fit, sequence_bytes
from lens_linear.tokens import model_device, model_dtype, single_token, to_tokens, token_strings

Metric = Callable[[Float[torch.Tensor, "n_pairs pos d_vocab"]], torch.Tensor]
"""A patching metric as ``transformer_lens.patching`` writes one: logits to a scalar. ``pos``
holds each pair's last real position (see the module docstring)."""


# sweep name → (hook in each block, axes of one patch)
SWEEPS: dict[str, tuple[str, str]] = {
    "resid_pre": ("hook_resid_pre", "pos"),
    "resid_mid": ("hook_resid_mid", "pos"),
    "resid_post": ("hook_resid_post", "pos"),
    "attn_out": ("hook_attn_out", "pos"),
    "mlp_out": ("hook_mlp_out", "pos"),
    "head": ("attn.hook_z", "head"),  # one head at every position
    "head_by_pos": ("attn.hook_z", "pos_head"),
}


@dataclass
class PromptPairs:
    """Clean and corrupted prompts of equal token counts per pair, right-padded to one length.

    Right padding is harmless under causal attention (no real token sees a later one), so
    no attention mask is needed: the metric reads each pair's last real position and
    ``mask`` keeps padding and special tokens (BOS) out of every patch.
    """

    clean: Int[torch.Tensor, "n pos"]
    corrupted: Int[torch.Tensor, "n pos"]
    answers: Int[torch.Tensor, "n"]  # correct for the clean prompt  # noqa: F821
    wrong: Int[torch.Tensor, "n"]  # correct for the corrupted prompt  # noqa: F821
    last: Int[torch.Tensor, "n"]  # position of each pair's final real token  # noqa: F821
    mask: Bool[torch.Tensor, "n pos"]  # positions a patch may touch
    str_tokens: list[str] = field(default_factory=list)  # of the first clean prompt

    def logit_diff(
        self, logits: Float[torch.Tensor, "n_pairs *pos d_vocab"]
    ) -> Float[torch.Tensor, "n_pairs"]:  # noqa: F821
        """``logit[answer] − logit[wrong]`` of each pair, read at ``pos`` −1 of a metric's
        logits ``[n_pairs, pos, d_vocab]`` (or from logits ``[n_pairs, d_vocab]``)."""
        final = logits[:, -1] if logits.ndim == 3 else logits
        rows = torch.arange(final.shape[0], device=final.device)
        return final[rows, self.answers] - final[rows, self.wrong]

    def mean_logit_diff(self, logits: Float[torch.Tensor, "n_pairs pos d_vocab"]) -> torch.Tensor:
        """The default metric: the mean of :meth:`logit_diff` over pairs."""
        return self.logit_diff(logits).mean()

    def pair(self, i: int) -> "PromptPairs":
        """Pair ``i`` alone (same padded length)."""
        return self.rows(i, i + 1)

    def rows(self, start: int, stop: int) -> "PromptPairs":
        """Pairs ``start`` to ``stop − 1`` (same padded length)."""
        part = slice(start, stop)
        return replace(
            self,
            clean=self.clean[part],
            corrupted=self.corrupted[part],
            answers=self.answers[part],
            wrong=self.wrong[part],
            last=self.last[part],
            mask=self.mask[part],
        )

    def final_logits(
        self, model: Any, tokens: Int[torch.Tensor, "batch pos"], hooks: Sequence[Hook] = ()
    ) -> Float[torch.Tensor, "batch 1 d_vocab"]:
        """A metric's logits: each pair's last real position only, ``[batch, 1, d_vocab]``
        (the batch is any number of copies of the pairs, in order). The forward stops at the
        unembedding's input, then only those rows are unembedded (a 50k-word unembedding of
        every position can cost as much as the rest of a short forward)."""
        name = output_hook(model)
        x = run_to(model, tokens, hooks, capture=[name])[name]
        rows = torch.arange(x.shape[0], device=x.device)
        return model.unembed(x[rows, self.last.repeat(x.shape[0] // len(self.last))][:, None])


def prompt_pairs(
    model: Any,
    clean: str | Sequence[str],
    corrupted: str | Sequence[str],
    answers: str | Sequence[str],
    wrong: str | Sequence[str],
) -> PromptPairs:
    """Tokenize clean/corrupted pairs (each pair must have equal token counts) and answers."""
    require_tl_model(model)
    as_list = lambda v: [v] if isinstance(v, str) else list(v)  # noqa: E731
    clean, corrupted, answers, wrong = map(as_list, (clean, corrupted, answers, wrong))
    if not len(clean) == len(corrupted) == len(answers) == len(wrong) or not clean:
        raise ValueError(
            f"need as many clean prompts, corrupted prompts, answers and wrong answers "
            f"(got {len(clean)}, {len(corrupted)}, {len(answers)}, {len(wrong)}), at least one"
        )
    device = model_device(model)
    rows_c, rows_x = [], []
    for i, (c, x) in enumerate(zip(clean, corrupted)):
        tc, tx = to_tokens(model, c)[0], to_tokens(model, x)[0]
        if len(tc) != len(tx):
            raise ValueError(
                f"pair {i}: the clean prompt has {len(tc)} tokens and the corrupted one {len(tx)}; "
                f"position-wise patching needs equal lengths (choose names or words that "
                f"tokenize alike): {c!r} vs {x!r}"
            )
        rows_c.append(tc)
        rows_x.append(tx)
    n_pos = max(len(t) for t in rows_c)
    pad = lambda rows: torch.stack([torch.cat([t, t.new_zeros(n_pos - len(t))]) for t in rows])  # noqa: E731
    clean_t, corrupt_t = pad(rows_c), pad(rows_x)
    lengths = torch.tensor([len(t) for t in rows_c], device=device)
    mask = torch.arange(n_pos, device=device)[None] < lengths[:, None]
    special = sorted(set(getattr(model.tokenizer, "all_special_ids", []) or []))
    if special:
        mask &= ~torch.isin(clean_t, torch.tensor(special, device=device))
    ids = lambda texts: torch.tensor([single_token(model, t) for t in texts], device=device)  # noqa: E731
    return PromptPairs(
        clean_t,
        corrupt_t,
        ids(answers),
        ids(wrong),
        lengths - 1,
        mask,
        token_strings(model, rows_c[0]),
    )


IOI_TEMPLATE = "After {a} and {b} went to the store, {s} gave a bottle of milk to"
IOI_NAMES = (
    "John",
    "Mary",
    "Tom",
    "James",
    "Dan",
    "Sid",
    "Martin",
    "Amy",
    "Lisa",
    "Sarah",
    "Paul",
    "Anna",
)


def ioi_pairs(
    model: Any, n_pairs: int = 4, names: Sequence[str] = IOI_NAMES, template: str = IOI_TEMPLATE
) -> PromptPairs:
    """IOI prompt pairs: clean ``… {B} gave … to`` (answer the other name, ``{A}``), corrupted
    with the repeated subject swapped (answer ``{B}``). Only names that are one token with a
    leading space are used; consecutive name pairs, both orders, as in the seed tutorial."""
    usable = [n for n in names if len(model.to_tokens(" " + n, prepend_bos=False)[0]) == 1]
    if len(usable) < 2:
        raise ValueError(
            f"fewer than two of the names {list(names)} are single tokens for this tokenizer"
        )
    pairs = [
        (usable[i % len(usable)], usable[(i + 1) % len(usable)]) for i in range(0, 2 * n_pairs, 2)
    ]
    clean, corrupt, answers, wrong = [], [], [], []
    for k in range(n_pairs):
        a, b = pairs[k // 2] if k % 2 == 0 else pairs[k // 2][::-1]
        clean.append(template.format(a=a, b=b, s=b))
        corrupt.append(template.format(a=a, b=b, s=a))
        answers.append(" " + a)
        wrong.append(" " + b)
    return prompt_pairs(model, clean, corrupt, answers, wrong)


@dataclass
class PatchingTable:
    """A patching table: ``values`` normalized (0 = corrupted, 1 = clean), ``raw`` the metric.

    ``method`` names how it was computed: ``"activation patching"`` (real patched runs),
    ``"frozen-map patching"`` (patched runs through the corrupted run's frozen map),
    ``"frozen-map prediction"`` (its exact gradient) or ``"attribution patching"`` (the
    ordinary gradient). (``transformer_lens.patching.PatchingResult`` is another thing: the
    per-example values of one sweep.)
    """

    sweep: str
    method: str
    values: Float[torch.Tensor, "layer ..."]
    raw: Float[torch.Tensor, "layer ..."]
    clean: float
    corrupted: float
    axes: tuple[str, ...]
    str_tokens: list[str]
    layers: list[int] = field(default_factory=list)  # the block of each row
    certified: Bool[torch.Tensor, "layer ..."] | None = None  # entries replaced by real patching

    def __repr__(self) -> str:
        best = torch.topk(self.values.flatten().abs(), min(3, self.values.numel())).indices
        where = [tuple(int(i) for i in torch.unravel_index(b, self.values.shape)) for b in best]
        tops = ", ".join(f"{w}={float(self.values[w]):+.3f}" for w in where)
        return (
            f"PatchingTable({self.sweep}, {self.method}, {'×'.join(self.axes)} {tuple(self.values.shape)}, "
            f"clean={self.clean:+.3f}, corrupted={self.corrupted:+.3f}; largest {tops})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "sweep": self.sweep,
            "method": self.method,
            "axes": list(self.axes),
            "values": self.values.tolist(),
            "raw": self.raw.tolist(),
            "clean": self.clean,
            "corrupted": self.corrupted,
            "str_tokens": self.str_tokens,
            "layers": self.layers,
        }


def _layers(model: Any, layers: Sequence[int] | None) -> list[int]:
    n = model.cfg.n_layers
    return [normalize_index(layer, n) for layer in (range(n) if layers is None else layers)]


def _sweep(
    model: Any, sweep: str, pairs: PromptPairs, layers: Sequence[int] | None
) -> tuple[list[str], list[tuple[int, int | None, int | None]], tuple[str, ...], tuple[int, ...]]:
    """Hook names (one per swept layer), every patch as ``(row, pos, head)`` with ``row`` an
    index into those hooks, the table's axes and its shape."""
    if sweep not in SWEEPS:
        raise ValueError(f"unknown sweep {sweep!r}; choose from {sorted(SWEEPS)}")
    leaf, kind = SWEEPS[sweep]
    hooks = [f"blocks.{layer}.{leaf}" for layer in _layers(model, layers)]
    if hooks[0] not in model.hook_dict:
        raise ValueError(f"this model has no {hooks[0]} (a parallel block has no resid_mid, say)")
    sizes = {"layer": len(hooks), "pos": pairs.clean.shape[1], "head": model.cfg.n_heads}
    axes = ("layer",) + {"pos": ("pos",), "head": ("head",), "pos_head": ("pos", "head")}[kind]
    grid = (
        torch.cartesian_prod(*[torch.arange(sizes[a], device="cpu") for a in axes])
        .reshape(-1, len(axes))
        .tolist()
    )
    patches = [
        (
            g[0],
            g[axes.index("pos")] if "pos" in axes else None,
            g[axes.index("head")] if "head" in axes else None,
        )
        for g in grid
    ]
    return hooks, patches, axes, tuple(sizes[a] for a in axes)


def _metric_per_copy(pairs: PromptPairs, metric: Metric, final: torch.Tensor) -> torch.Tensor:
    """The metric of each copy of the pairs in a batch of a metric's logits ``[copies · n, 1, d_vocab]``."""
    n = len(pairs.answers)
    return torch.stack(
        [
            torch.as_tensor(metric(final[c * n : (c + 1) * n]), device=final.device).reshape(())
            for c in range(final.shape[0] // n)
        ]
    )


def _capture(
    model: Any,
    pairs: PromptPairs,
    tokens: torch.Tensor,
    names: Sequence[str],
    metric: Metric,
    extra: Sequence[Hook] = (),
) -> tuple[float, dict[str, torch.Tensor]]:
    """The metric of a run, and its activations at ``names``."""
    acts: dict[str, torch.Tensor] = {}
    hooks = list(extra) + [
        (n, lambda v, hook, n=n: acts.__setitem__(n, v.detach().clone())) for n in names
    ]
    with torch.no_grad():
        return float(metric(pairs.final_logits(model, tokens, hooks))), acts


def _table(
    sweep: str,
    method: str,
    raw: torch.Tensor,
    clean: float,
    corrupted: float,
    axes: tuple[str, ...],
    pairs: PromptPairs,
    hooks: Sequence[str],
) -> PatchingTable:
    return PatchingTable(
        sweep=sweep,
        method=method,
        values=(raw - corrupted) / (clean - corrupted),
        raw=raw,
        clean=clean,
        corrupted=corrupted,
        axes=axes,
        str_tokens=pairs.str_tokens,
        layers=[layer_of(h) for h in hooks],
    )


def check_gap(clean: float, corrupted: float) -> None:
    """Normalized patching divides by ``clean − corrupted``: refuse a metric that does not
    separate the runs (before any patched run)."""
    if not abs(clean - corrupted) > 1e-6 * max(1.0, abs(clean), abs(corrupted)):
        raise ValueError(
            f"the metric is {clean:.6g} on the clean run and {corrupted:.6g} on the corrupted run: "
            f"with no gap between them the normalized table is undefined. Choose answers (or a "
            f"metric) that the clean and corrupted prompts separate."
        )


def _region(
    pairs: PromptPairs, patch: tuple[int, int | None, int | None], like: torch.Tensor
) -> torch.Tensor:
    """Boolean mask over one copy of the pairs ``[n, pos, (heads)]`` of what a patch replaces."""
    _, pos, head = patch
    region = torch.zeros(
        like.shape[:3] if like.ndim == 4 else like.shape[:2], dtype=torch.bool, device=like.device
    )
    cols = slice(None) if pos is None else slice(pos, pos + 1)
    if like.ndim == 4:
        region[:, cols, slice(None) if head is None else head] = True
        region &= pairs.mask[:, :, None]
    else:
        region[:, cols] = True
        region &= pairs.mask
    return region


def activation_patching(
    model: Any,
    pairs: PromptPairs,
    sweep: str = "resid_pre",
    *,
    metric: Metric | None = None,
    scale: float = 1.0,
    detached: bool = False,
    layers: Sequence[int] | None = None,
    max_memory: int | None = None,
    progress: bool = True,
) -> PatchingTable:
    """Patch ``corrupted + scale · (clean − corrupted)`` at every (layer, position / head) of a
    sweep into the corrupted run and read the metric (default: mean logit difference).

    ``detached=True`` keeps the corrupted run's norm scales, patterns and gates (replay of its
    operating point), which makes the logits exactly affine in the patch: the ground truth
    that :func:`predicted_patching` reproduces. ``layers`` sweeps only those blocks (the
    table's rows, in that order). Chunks of patched runs share one batch, sized to ``max_memory``.
    """
    require_tl_model(model)
    metric = metric or pairs.mean_logit_diff
    hooks, patches, axes, shape = _sweep(model, sweep, pairs, layers)
    with analysis_mode(model):
        clean_m, clean_acts = _capture(model, pairs, pairs.clean, hooks, metric)
        base = []
        if detached:
            point = OperatingPoint.record(model, pairs.corrupted, max_memory=max_memory)[0]
            base = point.hooks("replay")
        corrupt_m, corrupt_acts = _capture(model, pairs, pairs.corrupted, hooks, metric, base)
        check_gap(clean_m, corrupt_m)
        raw = _patched_metrics(
            model,
            pairs,
            hooks,
            patches,
            clean_acts,
            corrupt_acts,
            metric,
            scale,
            base,
            max_memory,
            progress,
            f"patching {sweep}",
        )
    raw_t = raw.reshape(shape).double().cpu()
    method = "frozen-map patching" if detached else "activation patching"
    return _table(sweep, method, raw_t, clean_m, corrupt_m, axes, pairs, hooks)


def _patched_metrics(
    model: Any,
    pairs: PromptPairs,
    hooks: Sequence[str],
    patches: Sequence[tuple[int, int | None, int | None]],
    clean_acts: dict[str, torch.Tensor],
    corrupt_acts: dict[str, torch.Tensor],
    metric: Metric,
    scale: float,
    base: Sequence[Hook],
    max_memory: int | None,
    progress: bool,
    desc: str,
) -> Float[torch.Tensor, "patch"]:  # noqa: F821
    """The metric of each patched corrupted run, chunks of patches sharing one batch."""
    n = len(pairs.answers)
    per_patch = sequence_bytes(
        model.cfg, pairs.clean.shape[1], next(model.parameters()).dtype, batch=n
    )
    chunk = chunk_size(len(patches), per_patch, max_memory, device=pairs.clean.device)
    raw = []
    grow = True
    for start in tqdm(range(0, len(patches), chunk), desc=desc, disable=not progress, leave=False):
        todo = patches[start : start + chunk]
        # copies in hook order; growing, the batch holds the unpatched prompts first and each
        # patch's copy joins at its block's input (blocks.L.hook_resid_pre), so the layers
        # before a patch run once for all patches there, not once per patch
        order = sorted(range(len(todo)), key=lambda e: hooks.index(hooks[todo[e][0]]))
        slot = {e: i for i, e in enumerate(order)}
        names = sorted({hooks[p[0]] for p in todo}, key=hooks.index)
        joins: dict[str, list[int]] = {}
        for e in order:
            joins.setdefault(f"blocks.{layer_of(hooks[todo[e][0]])}.hook_resid_pre", []).append(e)

        def join(value: torch.Tensor, hook: Any, name: str) -> torch.Tensor:
            copies = value[:n].repeat(len(joins[name]), *([1] * (value.ndim - 1)))
            return torch.cat([value, copies])

        def patch(value: torch.Tensor, hook: Any, name: str, offset: int) -> torch.Tensor:
            value = value.clone()
            target = corrupt_acts[name] + scale * (clean_acts[name] - corrupt_acts[name])
            for e, p in enumerate(todo):
                if hooks[p[0]] == name:
                    i = offset + slot[e]
                    region = _region(pairs, p, target)
                    value[i * n : (i + 1) * n][region] = target[region]
            return value

        def run(growing: bool) -> torch.Tensor:
            offset = 1 if growing else 0
            tokens = pairs.corrupted if growing else pairs.corrupted.repeat(len(todo), 1)
            grown = [(h, partial(join, name=h)) for h in joins] if growing else []
            patched = [(h, partial(patch, name=h, offset=offset)) for h in names]
            copies = {layer_of(h): len(joining) for h, joining in joins.items()}
            batch_at = {  # each block's batch once its copies have joined
                layer: n * (1 + sum(c for at, c in copies.items() if at <= layer))
                for layer in range(model.cfg.n_layers)
                if growing
            }
            with _widened(model, batch_at, n):
                final = pairs.final_logits(model, tokens, list(base) + grown + patched)
            per_copy = _metric_per_copy(pairs, metric, final)[offset:]
            return per_copy[
                torch.tensor([slot[e] for e in range(len(todo))], device=per_copy.device)
            ]

        with torch.no_grad():
            try:
                raw.append(run(grow))
            except RuntimeError:
                if not grow:
                    raise
                grow = (
                    False  # a model whose masks keep the first batch size: full batches from here
                )
                raw.append(run(False))
    return torch.cat(raw)


@contextlib.contextmanager
def _widened(model: Any, batch_at: dict[int, int], n: int) -> Iterator[None]:
    """While copies join the batch inside a forward, every other per-batch tensor a block is
    given (the attention mask and position embeddings a bridge computes once, for the first
    ``n`` rows) repeated to that block's batch ``batch_at[layer]``, in the copies' order. A
    tensor is per-batch where its first axis is ``n`` and it has at least two axes (a 1-D
    cache position of ``n`` tokens is not); with ``n = 1`` they broadcast already. The
    hooks are removed on exit, even on error."""
    if n == 1 or not batch_at:
        yield
        return

    def widen(value: Any, batch: int) -> Any:
        if isinstance(value, (tuple, list)):
            return type(value)(widen(v, batch) for v in value)
        if isinstance(value, torch.Tensor) and value.ndim >= 2 and value.shape[0] == n:
            return value.repeat(batch // n, *([1] * (value.ndim - 1)))
        return value

    def pre(module: Any, args: tuple, kwargs: dict, layer: int) -> tuple[tuple, dict]:
        batch = batch_at[layer]
        if batch == n:
            return args, kwargs
        # the first argument (or ``hidden_states``) is the residual stream: the joins grow it
        args = args[:1] + tuple(widen(a, batch) for a in args[1:])
        kwargs = {k: v if k == "hidden_states" else widen(v, batch) for k, v in kwargs.items()}
        return args, kwargs

    handles = [
        block.register_forward_pre_hook(partial(pre, layer=layer), with_kwargs=True)
        for layer, block in enumerate(model.blocks)
        if layer in batch_at
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# (detached, ig_steps, certify, certify_tolerance) of the default prediction per sweep: the
# best route measured against real patching (benchmarks/faithfulness.py). Integrating along
# the input path helps where a patch swaps a whole residual or MLP output (a large move) and
# hurts for one head or one attention output, where the gradient at the corrupted run is
# already close. Checking continues in rounds while the checked predictions say the rest are
# off by more than 1% of the table's variance: on a task where gradients fail (a one-pair
# pronoun task) it checks 15-75% of the entries; on the others, the first 5% only.
DEFAULT_PREDICTION = {
    sweep: (False, 1 if sweep in ("attn_out", "head", "head_by_pos") else 4, 0.05, 0.01)
    for sweep in SWEEPS
}


def predicted_patching(
    model: Any,
    pairs: PromptPairs,
    sweep: str = "resid_pre",
    *,
    metric: Metric | None = None,
    scale: float = 1.0,
    detached: bool | None = None,
    ig_steps: int | None = None,
    certify: int | float | None = None,
    certify_tolerance: float | None = None,
    layers: Sequence[int] | None = None,
    max_memory: int | None = None,
    progress: bool = True,
) -> PatchingTable:
    """The patching table of :func:`activation_patching` predicted from gradients of the
    corrupted run: entry = ``Σ grad · Δ`` over what the patch replaces.

    The default (all four of ``detached``, ``ig_steps``, ``certify``, ``certify_tolerance``
    left out) is the route that agreed best with real activation patching in
    ``benchmarks/faithfulness.py`` (SmolLM2, four tasks, five node families;
    :data:`DEFAULT_PREDICTION`): the ordinary gradient, integrated over 4 points
    (``ig_steps=4``) for the residual and MLP sweeps, its largest 5% of entries certified by
    real patched runs (``certify=0.05``), and further rounds of certification while the
    unchecked entries are estimated to get more than 1% of the table's variance wrong
    (``certify_tolerance=0.01``). Naming any of the four gives that route with the others at
    their plain values (``detached=False``, ``ig_steps=1``, ``certify=0``, one round).

    ``detached=True`` (``method="frozen-map prediction"``) takes the gradient with the detach
    hooks on: the corrupted run's frozen map is affine, so for a metric linear in the logits
    (the default) this equals ``activation_patching(..., detached=True)`` exactly.
    ``detached=False`` (``"attribution patching"``) is the ordinary gradient, a first-order
    estimate of real patching, equal to TransformerLens' ``attribution_patch``.

    ``ig_steps = k > 1`` integrates the gradient along the straight path of input embeddings
    from the corrupted to the clean prompt (:func:`integration_points`: the trapezoidal rule
    on ``k`` runs, both ends included), each through its own frozen map where ``detached``:
    integrated gradients, as EAP-IG does for edges.
    ``certify`` (a count, or a fraction of the entries) reruns the largest predicted entries as
    real patched runs and puts their exact values in (``table.certified`` marks them): ``certify``
    extra forwards, batched. With ``certify_tolerance``, rounds follow, each checking twice as
    many of the next largest entries, until :func:`unchecked_error` (the share of the table's
    variance the unchecked entries are estimated to get wrong, from how far the last round's
    predictions were off) is at most ``certify_tolerance``, or every entry is exact. Where
    gradients fail, this ends in real patching, entry by entry exact.

    Long prompts (``detached=True``, every pair's patterns together past the recording budget,
    :func:`~lens_linear.memory.patterns_fit` of ``max_memory``): a backward through detached
    patterns would keep ``layers · heads · n²`` values. Instead each pair's corrupted run is
    recorded with its patterns as queries and keys and replayed with the gradient on, one pair
    at a time (a progress bar over pairs): memory ``O(layers · n · d)``, the same table.
    """
    require_tl_model(model)
    if detached is None and ig_steps is None and certify is None and certify_tolerance is None:
        detached, ig_steps, certify, certify_tolerance = DEFAULT_PREDICTION.get(
            sweep, (False, 1, 0.05, 0.01)
        )
    detached, ig_steps, certify = bool(detached), ig_steps or 1, certify or 0
    if not isinstance(ig_steps, int) or ig_steps < 1:
        raise ValueError(f"ig_steps must be a positive integer, got {ig_steps!r}")
    metric = metric or pairs.mean_logit_diff
    hooks, patches, axes, shape = _sweep(model, sweep, pairs, layers)
    with analysis_mode(model):
        # integrating the ordinary gradient, the clean run is the last point's copy: its input
        # embeddings alone are computed first (the forward stops there)
        merged = ig_steps > 1 and not detached
        if merged:
            with torch.no_grad():
                clean_input = run_to(model, pairs.clean, capture=[INPUT_HOOK], detach=True)
            clean_acts = {INPUT_HOOK: clean_input[INPUT_HOOK]}
        else:
            clean_m, clean_acts = _capture(model, pairs, pairs.clean, hooks + [INPUT_HOOK], metric)
        n_pos, n_pairs = pairs.corrupted.shape[1], len(pairs.answers)
        if detached and not patterns_fit(model, n_pos, n_pairs, max_memory):
            if ig_steps > 1:
                raise ValueError(
                    "ig_steps > 1 is not available where the patterns do not fit the memory "
                    "budget (each pair replayed from its operating point): raise max_memory or "
                    "use ig_steps=1."
                )
            value, corrupt_acts, grads = _frozen_gradients_by_pair(
                model, pairs, hooks, metric, progress, max_memory
            )
        else:  # the integration points batched, as many at once as the budget holds
            points = integration_points(ig_steps)
            graph = model.cfg.n_layers * sequence_bytes(
                model.cfg, n_pos, model_dtype(model) or torch.float32, batch=n_pairs
            )
            chunk = chunk_size(len(points), graph, max_memory, device=pairs.clean.device)
            freeze = _freezing(model) if detached else []
            grads = None
            for start in range(0, len(points), chunk):
                v, acts, g = _gradients(
                    model,
                    pairs,
                    hooks,
                    metric,
                    freeze,
                    points=points[start : start + chunk],
                    clean_input=clean_acts[INPUT_HOOK],
                )
                if start == 0:  # the first point is the corrupted run
                    value, corrupt_acts = v[0], acts[0]
                if merged and start + chunk >= len(points):  # the last is the clean run
                    clean_m, clean_acts = float(v[-1]), {**acts[-1], **clean_acts}
                grads = g if grads is None else [a + b for a, b in zip(grads, g)]
        corrupt_m = float(value)
        check_gap(clean_m, corrupt_m)
        table = []
        for h, g in zip(hooks, grads):
            change = (g * scale * (clean_acts[h] - corrupt_acts[h])).sum(-1)  # [n, pos(, heads)]
            change = change * (pairs.mask if change.ndim == 2 else pairs.mask[:, :, None])
            keep = {"pos": (0,), "head": (0, 1), "pos_head": (0,)}[SWEEPS[sweep][1]]
            table.append(change.sum(keep))
        raw = corrupt_m + torch.stack(table).reshape(shape).detach().double().cpu()
        certified = torch.zeros(shape, dtype=torch.bool, device="cpu")  # as the table
        n_cert = certify if isinstance(certify, int) else round(certify * raw.numel())
        order = torch.argsort((raw - corrupt_m).abs().flatten(), descending=True)
        real_corrupt = None
        while 0 < n_cert and int(certified.sum()) < raw.numel():
            done = int(certified.sum())
            top = order[done : done + n_cert].sort().values  # in sweep order: a chunk's
            # patches share their first layers
            if real_corrupt is None:  # the real corrupted run's values (the ordinary
                real_corrupt = (  # gradient's run is that run)
                    corrupt_acts
                    if not detached
                    else _capture(model, pairs, pairs.corrupted, hooks, metric)[1]
                )
            exact = (
                _patched_metrics(
                    model,
                    pairs,
                    hooks,
                    [patches[i] for i in top.tolist()],
                    clean_acts,
                    real_corrupt,
                    metric,
                    scale,
                    [],
                    max_memory,
                    progress,
                    f"certifying {sweep}",
                )
                .double()
                .cpu()
            )
            predicted = raw.view(-1)[top].clone()
            raw.view(-1)[top] = exact
            certified.view(-1)[top] = True
            if (
                certify_tolerance is None
                or unchecked_error(raw, certified, predicted, exact, corrupt_m) <= certify_tolerance
            ):
                break
            n_cert *= 2  # check twice as many of the next largest
    method = "frozen-map prediction" if detached else "attribution patching"
    if ig_steps > 1:
        method += f", integrated over {ig_steps} points"
    if certified.any():
        method += f", top {int(certified.sum())} certified"
    out = _table(sweep, method, raw, clean_m, corrupt_m, axes, pairs, hooks)
    out.certified = certified
    return out


def unchecked_error(
    table: torch.Tensor,
    checked: torch.Tensor,
    predicted: torch.Tensor,
    exact: torch.Tensor,
    corrupted: float,
) -> float:
    """The share of ``table``'s variance its unchecked entries are estimated to get wrong,
    after a round of checks replaced ``predicted`` by ``exact``: the round's relative miss
    ``m = ‖predicted − exact‖ / ‖exact − corrupted‖`` applied to every unchecked (smaller)
    prediction's change, ``m² Σ (unchecked − corrupted)²``, over ``Σ (table − mean)²``. A
    prediction no better on the next entries than on the largest ones gives this error;
    ``1 − r²`` of the table against real patching is about it."""
    miss = (predicted - exact).norm() / (exact - corrupted).norm().clamp_min(1e-300)
    rest = table[~checked] - corrupted
    spread = (table - table.mean()).pow(2).sum().clamp_min(1e-300)
    return float(miss.pow(2) * rest.pow(2).sum() / spread)


def integration_points(steps: int) -> list[tuple[float, float]]:
    """``(alpha, weight)`` of the trapezoidal rule on ``[0, 1]`` with ``steps`` points: the
    corrupted end (``alpha = 0``), the clean end, and evenly between; one point is the
    corrupted end alone (the plain gradient)."""
    if steps == 1:
        return [(0.0, 1.0)]
    h = 1.0 / (steps - 1)
    return [(j * h, h / 2 if j in (0, steps - 1) else h) for j in range(steps)]


def interpolated_input(
    value: Float[torch.Tensor, "copies_n pos d"],
    clean_input: Float[torch.Tensor, "n pos d"],
    alphas: Sequence[float],
) -> Float[torch.Tensor, "copies_n pos d"]:
    """Input embeddings of one copy of the pairs per integration point, each moved its
    ``alpha`` of the way to ``clean_input``: ``lerp``, so the ends are the corrupted and clean
    inputs exactly; the move is a constant shift, so the gradient with respect to ``value``
    passes unchanged."""
    ones = [1] * (value.ndim - 1)
    clean = clean_input.to(value).repeat(len(alphas), *ones)
    step = torch.tensor(alphas, dtype=value.dtype, device=value.device)
    step = step.repeat_interleave(value.shape[0] // len(alphas)).reshape(-1, *ones)
    return torch.lerp(value.detach(), clean, step) + (value - value.detach())


def _gradients(
    model: Any,
    pairs: PromptPairs,
    hooks: Sequence[str],
    metric: Metric,
    freeze: Sequence[Hook],
    others: torch.Tensor | None = None,
    row: int = 0,
    points: Sequence[tuple[float, float]] = ((0.0, 1.0),),
    clean_input: torch.Tensor | None = None,
) -> tuple[
    Float[torch.Tensor, "copies"],  # noqa: F821
    tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]],
    list[torch.Tensor],
]:
    """The metric of the corrupted run under ``freeze``, its activations at ``hooks`` and the
    metric's gradient with respect to them. ``points`` (``(alpha, weight)``, the first at
    ``alpha = 0``): one copy of the pairs per point in one batch, its input embeddings moved
    ``alpha`` of the way to ``clean_input``; the gradients are their weighted sum (integrated
    gradients in one forward and one backward: a short prompt's forward costs its Python, not
    its arithmetic). Returns each copy's metric, the activations of the first copy and of the
    last (at ``alpha = 1`` the clean run's: the input is moved by ``lerp``, exact at both
    ends), and the gradients. ``others``: every pair's final logits, of which these ``pairs``
    take row ``row`` on (the metric may mix pairs; the rest are constants; one point only)."""
    n, k = len(pairs.answers), len(points)
    leaves: dict[str, torch.Tensor] = {}
    first: dict[str, torch.Tensor] = {}
    last: dict[str, torch.Tensor] = {}

    def attach(value: torch.Tensor, hook: Any, name: str) -> torch.Tensor:
        first[name] = value[:n].detach().clone()
        last[name] = value[-n:].detach().clone() if k > 1 else first[name]
        leaves[name] = torch.zeros_like(value, requires_grad=True)  # its gradient: the value's
        return value + leaves[name]

    alphas = [alpha for alpha, _ in points]
    moved: list[Hook] = []
    if clean_input is not None and any(alphas):
        moved = [(INPUT_HOOK, lambda value, hook: interpolated_input(value, clean_input, alphas))]
    with torch.enable_grad():
        final = pairs.final_logits(
            model,
            pairs.corrupted.repeat(k, 1),
            moved + list(freeze) + [(h, partial(attach, name=h)) for h in hooks],
        )
        if others is not None:
            final = torch.cat([others[:row], final, others[row + len(final) :]])
        values = _metric_per_copy(pairs, metric, final) if k > 1 else metric(final).reshape(1)
        weights = torch.tensor(
            [weight for _, weight in points], dtype=values.dtype, device=values.device
        )
        grads = torch.autograd.grad((weights * values).sum(), [leaves[h] for h in hooks])
    summed = [g.reshape(k, n, *g.shape[1:]).sum(0) for g in grads]
    return values.detach(), (first, last), summed


def _freezing(model: Any) -> list[Hook]:
    """Hooks that freeze every coefficient at its value in the run they see (the detach
    hooks, module sites included: they run through our own forward, not ``run_with_hooks``)."""
    return site_hooks(model, find_sites(model), {}, "record")


def _frozen_gradients_by_pair(
    model: Any,
    pairs: PromptPairs,
    hooks: Sequence[str],
    metric: Metric,
    progress: bool,
    max_memory: int | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
    """:func:`_gradients` of the frozen corrupted run, one pair at a time, each through its own
    operating point (patterns as queries and keys where they do not fit whole): no pattern is
    kept for the backward. Pairs are independent, so the pieces stack into the batch's."""
    final = None
    if len(pairs.answers) > 1:  # the metric may mix pairs: the others' logits, as constants
        with torch.no_grad():
            final = pairs.final_logits(model, pairs.corrupted)
    parts, frozen_final = [], []
    for i in tqdm(
        range(len(pairs.answers)), desc="predicted patching", disable=not progress, leave=False
    ):
        one = pairs.pair(i)
        point, logits, _ = OperatingPoint.record(
            model, one.corrupted, names_filter=[], max_memory=max_memory
        )
        frozen_final.append(logits[:, one.last[0]][:, None])  # the frozen map's, at x*
        parts.append(
            _gradients(model, one, hooks, metric, point.hooks("replay"), others=final, row=i)
        )
    acts = {h: torch.cat([ends[0][h] for _, ends, _ in parts]) for h in hooks}
    grads = [torch.cat([g[j] for _, _, g in parts]) for j in range(len(hooks))]
    # the corrupted value of the frozen map: the recordings' logits (the plain run's can differ
    # at float32 rounding where the model casts down inside and the frozen map does not)
    return torch.as_tensor(metric(torch.cat(frozen_final))), acts, grads


@dataclass
class SteeringResult:
    tokens: Int[torch.Tensor, "1 pos"]  # prompt and generated tokens
    text: str  # the generated continuation
    first_logits: Float[torch.Tensor, "vocab"]  # next-token logits at the first step, steered  # noqa: F821


def steer(
    model: Any,
    concept: str,
    prompt: str,
    *,
    layer: int,
    lam: float = 0.5,
    max_new_tokens: int = 10,
    max_memory: int | None = None,
) -> SteeringResult:
    """Greedy generation with ``blocks.{layer}.hook_resid_post`` replaced, at every step, by
    ``lam · f(x_new) + (1 − lam) · J⁺_concept x_new`` (the seed paper's equation 16).

    ``J⁺_concept x_new`` is the concept prompt's frozen map (its operating point, biases
    zeroed: the Jacobian's linear part) applied to the new prompt's input embeddings by
    replay, so no ``d_model × d_model`` matrix is stored. Positions are matched from the end:
    the new prompt's last token meets the concept's last token, and so on back; where the new
    sequence is longer, its earliest positions are left unsteered, and where it is shorter,
    the concept's suffix map is used (exact: frozen patterns are blind to absolute position).
    ``lam = 1`` is ordinary greedy generation.
    """
    require_tl_model(model)
    hook = f"blocks.{_layers(model, [layer])[0]}.hook_resid_post"
    with analysis_mode(model):
        concept_tokens = to_tokens(model, concept)
        point = OperatingPoint.record(
            model, concept_tokens, names_filter=[], max_memory=max_memory
        )[0]
        tokens = to_tokens(model, prompt)
        first = None
        for _ in range(max_new_tokens):
            x_new = input_embeddings(model, tokens)
            k = min(x_new.shape[0], concept_tokens.shape[1])
            with torch.no_grad(), biases_zeroed(model):
                term = point.replay(
                    x_new[-k:].unsqueeze(0), [hook], start_pos=concept_tokens.shape[1] - k
                )[hook]

            def mix(value: torch.Tensor, hook: Any) -> torch.Tensor:
                value = value.clone()
                value[:, -k:] = lam * value[:, -k:] + (1 - lam) * term
                return value

            with torch.no_grad():
                logits = forward(model, tokens, [(hook, mix)])[0, -1]
            first = logits if first is None else first
            tokens = torch.cat([tokens, logits.argmax().reshape(1, 1)], dim=1)
    new = tokens[0, -max_new_tokens:] if max_new_tokens else tokens[0, :0]
    return SteeringResult(
        tokens, model.tokenizer.decode(new.tolist()) if model.tokenizer else "", first
    )
