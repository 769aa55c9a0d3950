"""Circuits: edge attribution, exact through the frozen map, and EAP / EAP-IG.

The graph is TransformerLens' (``tools.analysis.attribution_patching``): at each position,
*writers* (the embedding, each attention head, each MLP) add into the residual stream and
*readers* (each head's query, key and value input, each MLP's input, the logits) read it; an
edge joins a writer to every reader after it. An edge's score is

    ``δ_writer · g_reader``

with ``δ_writer`` the writer's clean − corrupted change as written into the residual stream
and ``g_reader`` the metric's gradient with respect to that reader's own copy of the stream,
in the corrupted run (the denoising convention of ``attribution_patch``). Three gradients:

* ``detached=True`` (``"frozen-map edges"``): the corrupted run's frozen map. It is
  affine, so each score is *exactly* the metric change of patching that edge alone through
  it (path patching: the writer's clean change reaches this reader and no other), and a
  writer's edges add up to its node score. The frozen map has no query–key path (patterns
  are constants), so every query and key edge is zero there.
* ``detached=False, ig_steps=1`` (``"attribution patching"``, EAP): the ordinary gradient,
  equal to ``attribution_patch(..., EdgeAttributionConfig(granularity="edge"))``.
* ``detached=False, ig_steps=k`` (``"EAP-IG"``, the default with ``k = 4``): reader
  gradients integrated along the straight path of input embeddings from the corrupted to the
  clean prompt, by the trapezoidal rule on ``k`` runs
  (:func:`~lens_linear.patching.integration_points`).

Per-head readers come from one batched pullback per layer (each head's share of the
gradient at ``hook_q``/``hook_k``/``hook_v`` carried back to the block's input), so no
per-head copy of the residual stream is made, grouped-query attention needs no special case
(a key or value reader is a key-value head) and neither do norms after the head sum (a
head's write is its output through the block's own, linearized, output map: exact for the
frozen map, where that norm's scale is a constant).

:func:`circuit_faithfulness` measures a circuit by ablating every edge outside it
(TransformerLens' ``faithfulness``), :func:`grow_circuit` grows one from the top edges until
it recovers a target share of the gap, and ``render.circuit_figure`` draws the strongest edges.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Sequence

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from lens_linear._validation import require_tl_model
from lens_linear.hooks.contexts import analysis_mode
from lens_linear.hooks.freeze import site_hooks
from lens_linear.hooks.operating_point import OperatingPoint
from lens_linear.hooks.run import Hook, run_to
from lens_linear.hooks.sites import INPUT_HOOK, find_sites
from lens_linear.jacobian import pullback_rows
from lens_linear.memory import chunk_size, patterns_fit, sequence_bytes
from lens_linear.patching import (
    Metric,
    PromptPairs,
    check_gap,
    integration_points,
    interpolated_input,
)


def _transformer_lens_classes() -> tuple[Any, Any, Any] | None:
    """TransformerLens' ``Node``, ``AttributionResult`` and ``FaithfulnessResult`` where its
    ``Node`` has the reader kinds and ``faithfulness`` exists (TransformerLens ≥ 4.3), else
    ``None``."""
    try:
        from transformer_lens.tools.analysis.attribution_patching import (
            AttributionResult,
            FaithfulnessResult,
            Node,
        )

        Node(kind="logits", position=0, layer=0)
    except (ImportError, ValueError, TypeError):
        return None
    return Node, AttributionResult, FaithfulnessResult


_TL = _transformer_lens_classes()

if _TL is not None:
    Node, AttributionResult, FaithfulnessResult = _TL
else:  # pragma: no cover - exercised on the TransformerLens 3.9 leg

    @dataclass(frozen=True)
    class Node:  # type: ignore[no-redef]
        """TransformerLens 4.3's graph node (writers ``embed``, ``attn_head_out``, ``mlp_out``;
        readers ``q_input``, ``k_input``, ``v_input``, ``mlp_in``, ``logits``), for older
        TransformerLens versions."""

        kind: str
        position: int
        layer: int | None = None
        head: int | None = None

        def __post_init__(self) -> None:
            heads = ("attn_head_out", "q_input", "k_input", "v_input")
            if self.kind not in heads + ("embed", "mlp_out", "mlp_in", "logits"):
                raise ValueError(f"unknown node kind {self.kind!r}")
            if (self.layer is None) != (self.kind == "embed") or (self.head is None) == (
                self.kind in heads
            ):
                raise ValueError(
                    f"malformed {self.kind} node: layer={self.layer}, head={self.head}"
                )

    @dataclass
    class AttributionResult:  # type: ignore[no-redef]
        """TransformerLens 4.3's ``AttributionResult``, for older TransformerLens versions."""

        node_scores: dict
        edge_scores: dict = field(default_factory=dict)

        def top_nodes(self, k: int = 10) -> list[tuple[Node, float]]:
            """The ``k`` nodes with the largest effect magnitude, strongest first."""
            ranked = sorted(self.node_scores.items(), key=lambda kv: abs(kv[1]), reverse=True)
            return ranked[:k]

        def top_edges(self, k: int = 10) -> list[tuple[Node, Node, float]]:
            """The ``k`` edges with the largest effect magnitude, strongest first."""
            ranked = sorted(self.edge_scores.items(), key=lambda kv: abs(kv[1]), reverse=True)
            return [(w, r, s) for (w, r), s in ranked[:k]]

    @dataclass
    class FaithfulnessResult:  # type: ignore[no-redef]
        """TransformerLens 4.3's ``FaithfulnessResult``, for older TransformerLens versions."""

        recovered: float
        full_metric: float
        corrupt_metric: float
        circuit_size: int
        total_edges: int
        edge_class_recovered: dict = field(default_factory=dict)
        edge_class_counts: dict = field(default_factory=dict)


# a writer or reader at no particular position: (kind, layer, head)
Component = tuple[str, int | None, int | None]


@dataclass
class EdgeAttribution(AttributionResult):  # type: ignore[misc, valid-type]
    """TransformerLens' ``AttributionResult`` (``node_scores``, ``edge_scores``, ``top_nodes``,
    ``top_edges``), plus what it was computed by and the dense scores.

    ``scores[p, w, r]`` is the edge from ``writers[w]`` to ``readers[r]`` at position ``p``
    (zero where the writer comes after the reader); ``node_scores`` holds each writer's sum
    over its edges, as TransformerLens' edge sweep does.
    """

    method: str = ""
    clean: float = 0.0
    corrupted: float = 0.0
    scores: Float[torch.Tensor, "pos writer reader"] | None = None
    writers: list[Component] = field(default_factory=list)
    readers: list[Component] = field(default_factory=list)

    def top_edges(self, k: int = 10) -> list[tuple[Any, Any, float]]:
        """The ``k`` edges with the largest effect magnitude, strongest first (from the dense
        scores: no sort of every edge)."""
        exists = _existing(self.scores, self.edge_scores.upstream)
        flat = torch.where(exists, self.scores.abs(), -1.0).flatten()
        k = min(k, int(exists.sum()))
        top = torch.topk(flat, k).indices.tolist() if k else []
        return [(*self.edge_scores.nodes(i), float(self.scores.view(-1)[i])) for i in top]

    def __repr__(self) -> str:
        top = ", ".join(f"{_short(w)}→{_short(r)} {s:+.3g}" for w, r, s in self.top_edges(3))
        return (
            f"EdgeAttribution({self.method}, {len(self.edge_scores)} edges, clean={self.clean:+.3f}, "
            f"corrupted={self.corrupted:+.3f}; largest {top})"
        )


def _upstream_mask(n_writers: int, upstream: Sequence[int], device: Any) -> torch.Tensor:
    """``[writer, reader]``: True where the edge exists (the writer is before the reader)."""
    ups = torch.tensor(list(upstream), device=device)
    return torch.arange(n_writers, device=device)[:, None] < ups[None]


def _existing(scores: torch.Tensor, upstream: Sequence[int]) -> torch.Tensor:
    """``[pos, writer, reader]``: True where the edge exists."""
    return _upstream_mask(scores.shape[1], upstream, scores.device)[None].expand_as(scores)


class EdgeScores(Mapping):
    """Dense edge scores as TransformerLens' ``{(writer, reader): score}``, in its order
    (position by position, each reader's writers in order), read on access: a long prompt's
    graph has tens of millions of edges, too many for a dict."""

    def __init__(
        self,
        scores: torch.Tensor,
        writers: list[Component],
        readers: list[Component],
        upstream: list[int],
    ) -> None:
        self.scores, self.writers, self.readers, self.upstream = scores, writers, readers, upstream
        self._w = {c: i for i, c in enumerate(writers)}
        self._r = {c: i for i, c in enumerate(readers)}

    def __len__(self) -> int:
        return self.scores.shape[0] * sum(self.upstream)

    def _index(self, key: Any) -> tuple[int, int, int]:
        try:
            w, r = key
            wi, ri = self._w[(w.kind, w.layer, w.head)], self._r[(r.kind, r.layer, r.head)]
        except (KeyError, TypeError, ValueError, AttributeError):
            raise KeyError(key) from None
        if (
            w.position != r.position
            or not 0 <= w.position < len(self.scores)
            or wi >= self.upstream[ri]
        ):
            raise KeyError(key)
        return w.position, wi, ri

    def __getitem__(self, key: Any) -> float:
        return float(self.scores[self._index(key)])

    def __contains__(self, key: object) -> bool:
        try:
            self._index(key)
        except KeyError:
            return False
        return True

    def _position(self, p: int) -> Iterator[tuple[tuple[Any, Any], float]]:
        values = self.scores[p].tolist()
        w_nodes = [Node(kind=k, position=p, layer=la, head=h) for k, la, h in self.writers]
        for r, (k, la, h) in enumerate(self.readers):
            reader = Node(kind=k, position=p, layer=la, head=h)
            for w in range(self.upstream[r]):
                yield (w_nodes[w], reader), values[w][r]

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for p in range(len(self.scores)):
            yield from (key for key, _ in self._position(p))

    def items(self) -> Iterator[tuple[tuple[Any, Any], float]]:  # type: ignore[override]
        """``((writer, reader), score)`` in order, a position's scores read at once."""
        for p in range(len(self.scores)):
            yield from self._position(p)

    def nodes(self, flat_index: int) -> tuple[Any, Any]:
        """The ``(writer, reader)`` of an index into the flattened ``scores``."""
        p, rest = divmod(flat_index, len(self.writers) * len(self.readers))
        w, r = divmod(rest, len(self.readers))
        (wk, wl, wh), (rk, rl, rh) = self.writers[w], self.readers[r]
        return Node(kind=wk, position=p, layer=wl, head=wh), Node(
            kind=rk, position=p, layer=rl, head=rh
        )


def _short(node: Any) -> str:
    """``L3H1@7``, ``MLP2@7``, ``embed@7``, ``logits@7``; a reader adds what it reads:
    ``L3H1.v@7``, ``MLP2.in@7``."""
    where = {"embed": "embed", "logits": "logits"}.get(node.kind)
    if where is None:
        mlp = node.kind.startswith("mlp")
        where = f"MLP{node.layer}" if mlp else f"L{node.layer}H{node.head}"
        suffix = {"q_input": ".q", "k_input": ".k", "v_input": ".v", "mlp_in": ".in"}
        where += suffix.get(node.kind, "")
    return f"{where}@{node.position}"


@dataclass(frozen=True)
class _Layout:
    """The graph of a model: its writers and readers in TransformerLens' order, and for
    each reader the number of writers before it (writers come first to last)."""

    writers: list[Component]
    readers: list[Component]
    upstream: list[int]  # reader r reads writers[: upstream[r]]
    parallel: bool

    @classmethod
    def of(cls, q_heads: list[int], kv_heads: list[int], parallel: bool) -> "_Layout":
        writers: list[Component] = [("embed", None, None)]
        readers: list[Component] = []
        upstream: list[int] = []
        for layer, (nq, nkv) in enumerate(zip(q_heads, kv_heads)):
            for kind, n in (("q_input", nq), ("k_input", nkv), ("v_input", nkv)):
                readers += [(kind, layer, h) for h in range(n)]
                upstream += [len(writers)] * n
            heads = [("attn_head_out", layer, h) for h in range(nq)]
            readers.append(("mlp_in", layer, None))
            upstream.append(len(writers) + (0 if parallel else nq))
            writers += heads + [("mlp_out", layer, None)]
        readers.append(("logits", len(q_heads) - 1, None))
        upstream.append(len(writers))
        return cls(writers, readers, upstream, parallel)

    def mask(self, device: torch.device) -> torch.Tensor:
        """``[writer, reader]``: True where the edge exists."""
        return _upstream_mask(len(self.writers), self.upstream, device)


def _names(model: Any) -> tuple[list[dict[str, str]], str, bool]:
    """The hook names each layer's readers and writers live at, the final residual, and
    whether the MLP reads the block's input (parallel attention and MLP)."""
    n = model.cfg.n_layers
    parallel = bool(getattr(model.cfg, "parallel_attn_mlp", False))
    layers = []
    for layer in range(n):
        b = f"blocks.{layer}"
        names = {
            "pre": f"{b}.hook_resid_pre",
            "mid": f"{b}.hook_resid_pre" if parallel else f"{b}.hook_resid_mid",
            "q": f"{b}.attn.hook_q",
            "k": f"{b}.attn.hook_k",
            "v": f"{b}.attn.hook_v",
            "z": f"{b}.attn.hook_z",
            "attn_out": f"{b}.hook_attn_out",
            "mlp_out": f"{b}.hook_mlp_out",
        }
        missing = [h for h in names.values() if h not in model.hook_dict]
        if missing:
            raise ValueError(
                f"edge attribution reads each block's attention (queries, keys, values, heads) and "
                f"MLP at TransformerLens' hook points; this model has no {missing[0]} (a block "
                f"without attention or MLP, such as a state-space mixer, has no such edges). "
                f"Use predicted_patching for node-level attribution instead."
            )
        layers.append(names)
    return layers, f"blocks.{n - 1}.hook_resid_post", parallel


DEFAULT_EDGES = (False, 4)  # detached, ig_steps: EAP-IG, the best measured for finding circuits


def edge_attribution(
    model: Any,
    pairs: PromptPairs,
    *,
    metric: Metric | None = None,
    detached: bool | None = None,
    ig_steps: int | None = None,
    max_memory: int | None = None,
    progress: bool = True,
) -> EdgeAttribution:
    """Score every edge of TransformerLens' residual-stream graph (see the module docstring).

    Returns an :class:`EdgeAttribution`, which is TransformerLens' ``AttributionResult``
    keyed by its ``Node``, its ``method`` naming the route:

    * default (``detached`` and ``ig_steps`` left out): EAP-IG over 4 points
      (``detached=False, ig_steps=4``). Measured on SmolLM2 (``benchmarks/faithfulness.py``),
      circuits grown from its top edges recover 80% of the IOI gap with 398 edges, against
      11,984 for attribution patching and 982,793 (of 989,114) for the frozen map, whose query
      and key edges are all zero;
    * ``detached=False`` (``ig_steps=1``): attribution patching, the scores of
      ``attribution_patch`` with ``EdgeAttributionConfig(granularity="edge")`` for the same
      metric (which TransformerLens computes for multi-head, pre-norm models; grouped-query
      attention and norms after the head sum work here too);
    * ``detached=True``: exact for the frozen map, each edge the effect of patching it alone
      through the corrupted run's frozen coefficients;
    * ``ig_steps = k > 1`` (``detached=False`` only: the frozen map is affine, so its gradient
      is the same at every point of the path): EAP-IG over ``k`` points.

    Pairs are processed in chunks sized to ``max_memory`` (a progress bar over chunks and
    integration points); edges are read from the dense ``scores`` on access, so a long
    prompt's tens of millions of edges are never a dict; past
    the recording budget a pair's frozen map is replayed from its operating point, with the
    patterns kept as queries and keys, as in :func:`~lens_linear.patching.predicted_patching`.
    """
    require_tl_model(model)
    if detached is None and ig_steps is None:
        detached, ig_steps = DEFAULT_EDGES
    detached, ig_steps = bool(detached), 1 if ig_steps is None else ig_steps
    if not isinstance(ig_steps, int) or ig_steps < 1:
        raise ValueError(f"ig_steps must be a positive integer, got {ig_steps!r}")
    if detached and ig_steps > 1:
        raise ValueError(
            "ig_steps > 1 (EAP-IG) integrates the ordinary gradient: pass detached=False. The "
            "frozen map is affine, so its gradient is the same along the whole path and "
            "detached=True is already exact with ig_steps=1."
        )
    metric = metric or pairs.mean_logit_diff
    names, final, parallel = _names(model)
    n_pairs, n_pos = pairs.corrupted.shape
    dtype = next(model.parameters()).dtype
    # graph + pullbacks, of every integration point but the first (one batch)
    per_pair = 4 * max(1, ig_steps - 1) * sequence_bytes(model.cfg, n_pos, dtype, batch=1)
    chunk = chunk_size(n_pairs, per_pair, max_memory, device=pairs.clean.device)
    while detached and chunk > 1 and not patterns_fit(model, n_pos, chunk, max_memory):
        chunk = max(1, chunk // 2)
    replay = detached and not patterns_fit(model, n_pos, 1, max_memory)
    with analysis_mode(model):
        clean_m, corrupt_m, clean_vals, _, corrupt_final = _end_runs(model, pairs, names, metric)
        check_gap(clean_m, corrupt_m)
        layout = _layout_of(names, clean_vals, parallel)
        # the metric may mix pairs: a chunk sees the others' logits, as constants
        others = corrupt_final if chunk < n_pairs else None
        total = None
        starts = range(0, n_pairs, chunk)
        bar = tqdm(
            total=len(starts) * ig_steps, desc="edge attribution", disable=not progress, leave=False
        )
        for start in starts:
            part = pairs.rows(start, start + chunk)
            freeze: list[Hook] = []
            if replay:  # patterns kept as queries and keys: each pair's own operating point
                point = OperatingPoint.record(
                    model, part.corrupted, names_filter=[], max_memory=max_memory
                )[0]
                freeze = point.hooks("replay")
            elif detached:
                freeze = site_hooks(model, find_sites(model), {}, "record")
            clean_part = {h: v[start : start + len(part.answers)] for h, v in clean_vals.items()}
            scores = _chunk_scores(
                model,
                part,
                names,
                final,
                layout,
                metric,
                freeze,
                clean_part,
                ig_steps,
                others,
                start,
                bar,
            )
            total = scores if total is None else total + scores
        bar.close()
    method = (
        "frozen-map edges" if detached else ("EAP-IG" if ig_steps > 1 else "attribution patching")
    )
    return _result(total, layout, method, clean_m, corrupt_m)


def _end_runs(
    model: Any, pairs: PromptPairs, names: list[dict[str, str]], metric: Metric
) -> tuple[float, float, dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """One plain run of the clean and corrupted prompts together: their metrics, the values
    of each (input, heads, keys, attention and MLP outputs) and the corrupted final logits."""
    wanted = [INPUT_HOOK] + [n[k] for n in names for k in ("z", "k", "attn_out", "mlp_out")]
    vals: dict[str, torch.Tensor] = {}
    hooks = [(h, lambda v, hook, h=h: vals.__setitem__(h, v.detach().clone())) for h in wanted]
    with torch.no_grad():
        final = pairs.final_logits(model, torch.cat([pairs.clean, pairs.corrupted]), hooks)
    n = len(pairs.answers)
    clean, corrupt = {h: v[:n] for h, v in vals.items()}, {h: v[n:] for h, v in vals.items()}
    return float(metric(final[:n])), float(metric(final[n:])), clean, corrupt, final[n:]


def _chunk_scores(
    model: Any,
    pairs: PromptPairs,
    names: list[dict[str, str]],
    final: str,
    layout: _Layout,
    metric: Metric,
    freeze: Sequence[Hook],
    clean: dict[str, torch.Tensor],
    ig_steps: int,
    others: torch.Tensor | None,
    row: int,
    bar: Any,
) -> torch.Tensor:
    """``[pos, writer, reader]`` scores of these pairs (summed over them). Two runs whatever
    ``ig_steps``: the corrupted end (whose values give the writers' changes), then every other
    integration point as a copy of the pairs in one batch (a short prompt's run costs its
    Python and hooks more than its arithmetic)."""
    points = integration_points(ig_steps)
    deltas = None
    reader_grads = None
    n = len(pairs.answers)
    for group in [points[:1], points[1:]] if len(points) > 1 else [points]:
        run = _GradientRun(model, pairs, names, final, freeze, clean[INPUT_HOOK], group)
        run.backward(metric, others, row)
        if deltas is None:
            deltas = run.writer_deltas(clean)
        grads = run.reader_gradients()  # [reader, copies · n, pos, d]: weighted already
        grads = grads.reshape(grads.shape[0], len(group), n, *grads.shape[2:]).sum(1)
        reader_grads = grads if reader_grads is None else reader_grads + grads
        run.release()
        bar.update(len(group))
    mask = pairs.mask.to(deltas.dtype)[None, :, :, None]  # positions a patch may touch
    scores = torch.einsum("wbpd,rbpd->pwr", deltas * mask, reader_grads.to(deltas.dtype))
    return scores * layout.mask(scores.device)[None]


class _GradientRun:
    """One corrupted forward with a zero leaf added at every hook the graph reads, and the
    metric's backward: one copy of the pairs per integration point ``(alpha, weight)``, its
    inputs moved ``alpha`` of the way to the clean ones, the metric the copies' weighted sum."""

    def __init__(
        self,
        model: Any,
        pairs: PromptPairs,
        names: list[dict[str, str]],
        final: str,
        freeze: Sequence[Hook],
        clean_input: torch.Tensor,
        points: Sequence[tuple[float, float]],
    ) -> None:
        self.model, self.pairs, self.names, self.final = model, pairs, names, final
        self.points = list(points)
        alphas = [alpha for alpha, _ in points]
        # scores in the model's precision, at least float32 (a long prompt's writers and
        # readers take writers · pos · d_model each)
        self.work = torch.promote_types(next(model.parameters()).dtype, torch.float32)
        self.leaves: dict[str, torch.Tensor] = {}
        self.outs: dict[str, torch.Tensor] = {}
        self.vals: dict[str, torch.Tensor] = {}

        def attach(value: torch.Tensor, hook: Any, name: str) -> torch.Tensor:
            if name == INPUT_HOOK and any(alphas):
                value = interpolated_input(value, clean_input, alphas)
            self.vals[name] = value.detach()
            leaf = torch.zeros_like(value, requires_grad=True)
            self.leaves[name] = leaf
            self.outs[name] = value + leaf
            return self.outs[name]

        hooked = sorted({h for n in names for h in n.values()} | {final, INPUT_HOOK})
        self.hooks = list(freeze) + [(h, lambda v, hook, h=h: attach(v, hook, h)) for h in hooked]

    def release(self) -> None:
        """Drop the run's graph now (its hooks refer back to it: a cycle the collector would
        free only later, one graph per integration point)."""
        self.leaves.clear()
        self.outs.clear()
        self.vals.clear()
        self.grads = {}
        self.hooks = []

    def backward(self, metric: Metric, others: torch.Tensor | None, row: int) -> float:
        n, k = len(self.pairs.answers), len(self.points)
        with torch.enable_grad():
            final = self.pairs.final_logits(
                self.model, self.pairs.corrupted.repeat(k, 1), self.hooks
            )
            value = 0
            for c, (_, weight) in enumerate(self.points):
                copy = final[c * n : (c + 1) * n]
                if others is not None:
                    copy = torch.cat([others[:row], copy, others[row + n :]])
                value = value + weight * metric(copy)
            wanted = [n[k] for n in self.names for k in ("q", "k", "v", "mlp_out")] + [self.final]
            grads = torch.autograd.grad(
                value, [self.leaves[h] for h in wanted], retain_graph=True, allow_unused=True
            )
        self.grads = {
            h: torch.zeros_like(self.leaves[h]) if g is None else g for h, g in zip(wanted, grads)
        }
        return float(value.detach())

    def reader_gradients(self) -> Float[torch.Tensor, "reader batch pos d_model"]:
        """Each reader's gradient, in :class:`_Layout` order: a head's query, key or value
        input is the block input's gradient through that head alone (its share of the
        gradient at ``hook_q``/``hook_k``/``hook_v``, pulled back in one batched pass)."""
        rows = []
        with torch.enable_grad():
            for n in self.names:
                outs = [self.outs[n[k]] for k in ("q", "k", "v")]
                per_head = [self.grads[n[k]] for k in ("q", "k", "v")]
                counts = [g.shape[2] for g in per_head]
                total = sum(counts)

                def cotangent(rows_: slice, per_head=per_head, counts=counts) -> list[torch.Tensor]:
                    """Row ``r`` keeps reader ``r``'s head of its gradient, zero elsewhere."""
                    out, offset = [], 0
                    for g, c in zip(per_head, counts):
                        rows = torch.arange(rows_.start, rows_.stop, device=g.device) - offset
                        onehot = rows[:, None] == torch.arange(c, device=g.device)  # [row, head]
                        out.append(g[None] * onehot[:, None, None, :, None].to(g.dtype))
                        offset += c
                    return out

                pre = self.leaves[n["pre"]]
                got = pre.new_zeros(total, *pre.shape)

                def take(rows_: slice, grads: Sequence[torch.Tensor], got=got) -> None:
                    got[rows_] = grads[0]

                if any(g.abs().max() > 0 for g in per_head):
                    pullback_rows(outs, [pre], cotangent, total, total, take, keep_graph=True)
                rows.append(got)
                mlp = torch.autograd.grad(
                    self.outs[n["mlp_out"]],
                    self.leaves[n["mid"]],
                    grad_outputs=self.grads[n["mlp_out"]],
                    retain_graph=True,
                    allow_unused=True,
                )[0]
                rows.append((torch.zeros_like(pre) if mlp is None else mlp)[None])
        rows.append(self.grads[self.final][None])
        return torch.cat([r.to(self.work) for r in rows])

    def writer_deltas(
        self, clean: dict[str, torch.Tensor]
    ) -> Float[torch.Tensor, "writer batch pos d_model"]:
        """Each writer's clean − corrupted change as written into the residual stream: the
        input's, each MLP's output, and each head's ``Δz`` through the block's output map
        (``hook_z`` → ``hook_attn_out``, linearized here: exact where it is linear, as
        ``z W_O`` is, and for the frozen map, whose post-attention norm scale is frozen)."""
        rows = [(clean[INPUT_HOOK] - self.vals[INPUT_HOOK].to(clean[INPUT_HOOK]))[None]]
        with torch.enable_grad():
            for n in self.names:
                z = self.leaves[n["z"]]
                dz = (clean[n["z"]] - self.vals[n["z"]].to(clean[n["z"]])).to(z)
                heads = dz.shape[2]
                out = self.outs[n["attn_out"]]
                u = torch.zeros_like(out, requires_grad=True)
                (jt_u,) = torch.autograd.grad(out, z, grad_outputs=u, create_graph=True)
                per_head = torch.zeros(heads, *dz.shape, dtype=dz.dtype, device=dz.device)
                for h in range(heads):
                    per_head[h, :, :, h] = dz[:, :, h]
                (writes,) = torch.autograd.grad(
                    jt_u, u, grad_outputs=per_head, is_grads_batched=True
                )
                rows.append(writes)
                mlp = n["mlp_out"]
                rows.append((clean[mlp] - self.vals[mlp].to(clean[mlp]))[None])
        return torch.cat([r.to(self.work) for r in rows])


def _result(
    scores: torch.Tensor, layout: _Layout, method: str, clean: float, corrupted: float
) -> EdgeAttribution:
    """Dense scores as TransformerLens' result: edges read on access (:class:`EdgeScores`),
    each writer's node score its edges' sum."""
    scores = scores.cpu()
    sums = scores.sum(-1).tolist()  # [pos][writer]
    nodes = {
        Node(kind=k, position=p, layer=la, head=h): sums[p][w]
        for p in range(scores.shape[0])
        for w, (k, la, h) in enumerate(layout.writers)
    }
    return EdgeAttribution(
        node_scores=nodes,
        edge_scores=EdgeScores(scores, layout.writers, layout.readers, layout.upstream),
        method=method,
        clean=clean,
        corrupted=corrupted,
        scores=scores,
        writers=layout.writers,
        readers=layout.readers,
    )


# ---- circuit faithfulness ------------------------------------------------------------------


EDGE_CLASSES = {
    "q_input": "into_qk",
    "k_input": "into_qk",
    "v_input": "into_v",
    "mlp_in": "into_mlp",
    "logits": "into_logits",
}


def circuit_faithfulness(
    model: Any,
    pairs: PromptPairs,
    circuit: Sequence[tuple[Any, Any]] | Sequence[tuple[Any, Any, float]],
    *,
    ablation: str = "corrupt",
    mean_tokens: torch.Tensor | None = None,
    metric: Metric | None = None,
    detached: bool = False,
    by_class: bool = True,
) -> Any:
    """The fraction of the clean − corrupted gap a circuit recovers when every edge outside it
    is ablated: TransformerLens' ``faithfulness`` (its ``FaithfulnessResult``), for edges as
    ``(writer, reader)`` pairs or the ``(writer, reader, score)`` triples ``top_edges`` gives.

    The clean prompt runs with each reader's input rebuilt from its circuit writers' live
    outputs and every other writer's replacement: the corrupted run's (``ablation="corrupt"``)
    or its mean over ``mean_tokens`` (``"mean"``). Each head's query, key and value input is
    rebuilt on its own copy of the stream (one batch: the pairs, repeated once per reader of a
    layer), so grouped-query attention works. ``detached=True`` runs the same ablation through
    the corrupted run's frozen map (its coefficients replayed): the prediction of the frozen
    map, normalized by the real gap. Refused (``ValueError``) where a layer's heads do not add
    up to its attention output (a norm after the head sum), as TransformerLens refuses.
    ``by_class`` adds TransformerLens' per-class breakdown (one more run per class kept).
    """
    ablate = _Ablation(model, pairs, ablation, mean_tokens, metric, detached)
    kept = _circuit_mask(circuit, ablate.layout, pairs.clean.shape[1])
    recovered = ablate.recovered(kept)
    exists = ablate.layout.mask(kept.device)[None].expand_as(kept)
    class_names = list(dict.fromkeys(EDGE_CLASSES.values()))
    by_reader_class = [
        torch.tensor([EDGE_CLASSES[k] == c for k, _, _ in ablate.layout.readers], device="cpu")
        for c in class_names
    ]
    counts = {c: int((exists & m[None, None]).sum()) for c, m in zip(class_names, by_reader_class)}
    per_class = {}
    for c, m in zip(class_names, by_reader_class):
        if not by_class or not (kept & m[None, None]).any():
            per_class[c] = recovered
        else:
            per_class[c] = ablate.recovered(kept & ~m[None, None])
    return FaithfulnessResult(
        recovered=recovered,
        full_metric=ablate.clean,
        corrupt_metric=ablate.corrupted,
        circuit_size=int(kept.sum()),
        total_edges=int(exists.sum()),
        edge_class_recovered=per_class,
        edge_class_counts=counts,
    )


class _Ablation:
    """What every ablate-outside run of one set of pairs shares: the clean and corrupted
    metrics, the graph, the replacement writes, the frozen coefficients where ``detached``."""

    def __init__(
        self,
        model: Any,
        pairs: PromptPairs,
        ablation: str,
        mean_tokens: torch.Tensor | None,
        metric: Metric | None,
        detached: bool,
    ) -> None:
        require_tl_model(model)
        if ablation not in ("corrupt", "mean"):
            raise ValueError(f"ablation must be 'corrupt' or 'mean', got {ablation!r}")
        if (ablation == "mean") != (mean_tokens is not None):
            raise ValueError("mean ablation needs mean_tokens (and only mean ablation takes them)")
        self.model, self.pairs = model, pairs
        self.metric = metric or pairs.mean_logit_diff
        self.names, self.final, parallel = _names(model)
        with analysis_mode(model):
            self.clean, self.corrupted, clean_vals, corrupt_vals, _ = _end_runs(
                model, pairs, self.names, self.metric
            )
            check_gap(self.clean, self.corrupted)
            self.layout = _layout_of(self.names, corrupt_vals, parallel)
            _check_heads_add_up(model, self.names, clean_vals)
            if mean_tokens is not None:
                if mean_tokens.ndim != 2 or mean_tokens.shape[1] != pairs.clean.shape[1]:
                    raise ValueError(
                        f"mean_tokens must be [n, {pairs.clean.shape[1]}] token ids (the pairs' "
                        f"length), got {tuple(mean_tokens.shape)}"
                    )
                writers = [INPUT_HOOK] + [n[k] for n in self.names for k in ("z", "mlp_out")]
                with torch.no_grad():
                    seen = run_to(model, mean_tokens, capture=writers, detach=True)
                corrupt_vals = {h: v.mean(0, keepdim=True) for h, v in seen.items()}
            self.replacement = _writes(model, self.names, corrupt_vals)
            self.base: list[Hook] = []
            if detached:
                point = OperatingPoint.record(model, pairs.corrupted, names_filter=[])[0]
                self.base = point.hooks("replay")

    def recovered(self, kept: torch.Tensor) -> float:
        """The recovered fraction with the edges of ``kept`` ``[pos, writer, reader]`` kept."""
        with analysis_mode(self.model):
            value = _ablated_metric(
                self.model,
                self.pairs,
                self.names,
                self.final,
                self.layout,
                kept,
                self.replacement,
                self.metric,
                self.base,
            )
        return (value - self.corrupted) / (self.clean - self.corrupted)


def _layout_of(
    names: list[dict[str, str]], vals: dict[str, torch.Tensor], parallel: bool
) -> _Layout:
    q = [vals[n["z"]].shape[2] for n in names]
    kv = [vals[n["k"]].shape[2] for n in names]
    return _Layout.of(q, kv, parallel)


def _head_writes(
    model: Any, layer: int, z: torch.Tensor
) -> Float[torch.Tensor, "batch pos head d_model"]:
    """Each head's write into the residual stream, ``z_h W_O^h`` (the output bias is no head's)."""
    w_o = model.blocks[layer].attn.W_O
    return torch.einsum("bphd,hdm->bphm", z.to(w_o.dtype), w_o)


def _check_heads_add_up(
    model: Any, names: list[dict[str, str]], got: dict[str, torch.Tensor]
) -> None:
    """Refuse a layer whose attention output (in the run of ``got``) is not its heads'
    ``z W_O`` plus a constant."""
    for layer, n in enumerate(names):
        rest = got[n["attn_out"]] - _head_writes(model, layer, got[n["z"]]).sum(2).to(
            got[n["attn_out"]]
        )
        rest = rest - rest.mean(dim=(0, 1), keepdim=True)
        err = float(rest.norm() / got[n["attn_out"]].norm().clamp_min(1e-30))
        if err > 1e-3:
            raise ValueError(
                f"blocks.{layer}'s attention output is not the sum of its heads' z W_O (a norm or "
                f"scale after the head sum; relative difference {err:.2g}), so a head's edge cannot "
                f"be ablated on its own. Edge scores (edge_attribution) still work here."
            )


def _writes(
    model: Any, names: list[dict[str, str]], vals: dict[str, torch.Tensor]
) -> list[torch.Tensor]:
    """Every writer's write ``[batch, pos, d_model]``, in :class:`_Layout` order."""
    out = [vals[INPUT_HOOK]]
    for layer, n in enumerate(names):
        heads = _head_writes(model, layer, vals[n["z"]])
        out += [heads[:, :, h] for h in range(heads.shape[2])] + [vals[n["mlp_out"]]]
    return out


def _circuit_mask(circuit: Sequence[Any], layout: _Layout, n_pos: int) -> torch.Tensor:
    """``[pos, writer, reader]``: True for the circuit's edges; refuses an edge not in the graph."""
    w_index = {c: i for i, c in enumerate(layout.writers)}
    r_index = {c: i for i, c in enumerate(layout.readers)}
    kept = torch.zeros(
        n_pos, len(layout.writers), len(layout.readers), dtype=torch.bool, device="cpu"
    )
    for entry in circuit:
        if len(entry) not in (2, 3):
            raise ValueError(
                f"a circuit holds (writer, reader) or (writer, reader, score), got {entry!r}"
            )
        w, r = entry[0], entry[1]
        wi, ri = w_index.get((w.kind, w.layer, w.head)), r_index.get((r.kind, r.layer, r.head))
        if (
            wi is None
            or ri is None
            or w.position != r.position
            or not 0 <= w.position < n_pos
            or wi >= layout.upstream[ri]
        ):
            raise ValueError(
                f"the edge {w} → {r} is not in this model's graph (a stale or mistyped circuit)"
            )
        kept[w.position, wi, ri] = True
    return kept


def _ablated_metric(
    model: Any,
    pairs: PromptPairs,
    names: list[dict[str, str]],
    final: str,
    layout: _Layout,
    kept: torch.Tensor,
    replacement: list[torch.Tensor],
    metric: Metric,
    base: Sequence[Hook],
) -> float:
    """One run of the clean prompts, every reader's input rebuilt: circuit writers live, the
    rest replaced. Copy 0 is the run; copies ``1 …`` carry one attention reader of the current
    layer each, the last copy the MLP reader, and copy 0 takes each reader's output from its
    copy."""
    n = len(pairs.answers)
    readers_at = [
        [i for i, (k, la, _) in enumerate(layout.readers) if la == layer and k != "logits"]
        for layer in range(len(names))
    ]
    n_copies = 1 + max(len(r) for r in readers_at)  # attention readers + the MLP reader
    excluded = layout.mask(kept.device)[None] & ~kept  # [pos, w, r]
    excluded = excluded.to(replacement[0].device, replacement[0].dtype)
    live: list[torch.Tensor] = []

    def correction(readers: list[int], dtype: torch.dtype) -> torch.Tensor:
        """``Σ_excluded (replacement − live)`` for each reader: ``[reader, n, pos, d]``."""
        k = len(live)
        diff = torch.stack(
            [replacement[w].to(dtype) - live[w].to(dtype) for w in range(k)]
        )  # [w, n, p, d]
        return torch.einsum("pwr,wnpd->rnpd", excluded[:, :k, readers].to(dtype), diff)

    def copy(value: torch.Tensor, c: int) -> torch.Tensor:
        return value[c * n : (c + 1) * n]

    def block_input(value: torch.Tensor, hook: Any, layer: int) -> torch.Tensor:
        value = value.clone()
        if layer == 0:
            live.append(copy(value, 0).clone())
        attn = [r for r in readers_at[layer] if layout.readers[r][0] != "mlp_in"]
        fix = correction(attn, value.dtype)
        for i in range(len(attn)):
            value[(1 + i) * n : (2 + i) * n] = copy(value, 0) + fix[i]
        if layout.parallel:
            mlp_input(value, None, layer, inplace=True)
        return value

    def mlp_input(
        value: torch.Tensor, hook: Any, layer: int, inplace: bool = False
    ) -> torch.Tensor:
        value = value if inplace else value.clone()
        mlp = [r for r in readers_at[layer] if layout.readers[r][0] == "mlp_in"]
        fix = correction(mlp, value.dtype)
        value[(n_copies - 1) * n :] = copy(value, 0) + fix[0]
        return value

    def take(value: torch.Tensor, hook: Any, layer: int, kind: str) -> torch.Tensor:
        value = value.clone()
        for i, r in enumerate(r for r in readers_at[layer] if layout.readers[r][0] == kind):
            head = layout.readers[r][2]
            value[:n, :, head] = copy(value, 1 + readers_at[layer].index(r))[:, :, head]
        return value

    def heads_out(value: torch.Tensor, hook: Any, layer: int) -> None:
        writes = _head_writes(model, layer, copy(value, 0))
        live.extend(writes[:, :, h] for h in range(writes.shape[2]))

    def mlp_out(value: torch.Tensor, hook: Any, layer: int) -> torch.Tensor:
        value = value.clone()
        value[:n] = copy(value, n_copies - 1)
        live.append(copy(value, 0).clone())
        return value

    def logits_input(value: torch.Tensor, hook: Any) -> torch.Tensor:
        value = value.clone()
        value[:n] = copy(value, 0) + correction([len(layout.readers) - 1], value.dtype)[0]
        return value

    hooks: list[Hook] = list(base)
    for layer, nm in enumerate(names):
        hooks.append((nm["pre"], partial(block_input, layer=layer)))
        if not layout.parallel:
            hooks.append((nm["mid"], partial(mlp_input, layer=layer)))
        hooks += [(nm[k], partial(take, layer=layer, kind=f"{k}_input")) for k in ("q", "k", "v")]
        hooks.append((nm["z"], partial(heads_out, layer=layer)))
        hooks.append((nm["mlp_out"], partial(mlp_out, layer=layer)))
    hooks.append((final, logits_input))
    with torch.no_grad():
        logits = pairs.final_logits(model, pairs.clean.repeat(n_copies, 1), hooks)
    return float(metric(logits[:n]))


@dataclass
class CircuitCurve:
    """Faithfulness of the top-``k`` edges for growing ``k``: ``recovered[i]`` for ``sizes[i]``,
    and the smallest circuit found that reaches ``target`` (``None`` if none does)."""

    sizes: list[int]
    recovered: list[float]
    target: float
    circuit: list[tuple[Any, Any, float]] | None

    def __repr__(self) -> str:
        points = ", ".join(f"{k}: {r:.3f}" for k, r in zip(self.sizes, self.recovered))
        found = f"{len(self.circuit)} edges" if self.circuit is not None else "not reached"
        return f"CircuitCurve(target {self.target}: {found}; {points})"


def grow_circuit(
    model: Any,
    pairs: PromptPairs,
    scores: EdgeAttribution,
    *,
    target: float = 0.9,
    sizes: Sequence[int] | None = None,
    ablation: str = "corrupt",
    mean_tokens: torch.Tensor | None = None,
    metric: Metric | None = None,
    progress: bool = True,
) -> CircuitCurve:
    """Grow a circuit from the highest-scoring edges (by magnitude) until it recovers
    ``target`` of the gap under :func:`circuit_faithfulness`: the recovered fraction at each of
    ``sizes`` (default 1, 2, 5, 10, 20, 50, … up to every edge, stopping at the first size that
    reaches the target), then a bisection between the last size below it and that one (the
    curve need not be monotone: the size found reaches the target, a smaller one may too).
    One clean and one corrupted run, then one batched run per size."""
    ablate = _Ablation(model, pairs, ablation, mean_tokens, metric, detached=False)
    dense = scores.scores.to(torch.float64)
    exists = ablate.layout.mask(dense.device)[None].expand_as(dense)
    if dense.shape[1:] != exists.shape[1:]:
        raise ValueError("these scores were computed on another model's graph")
    order = torch.argsort(
        torch.where(exists, dense.abs(), -1.0).flatten(), descending=True, stable=True
    )
    total = int(exists.sum())
    order = order[:total]
    if sizes is None:
        sizes, k = [], 1
        while k < total:
            sizes += [s for s in (k, 2 * k, 5 * k) if s < total]
            k *= 10
        sizes.append(total)

    def measure(k: int) -> float:
        kept = torch.zeros(dense.numel(), dtype=torch.bool, device="cpu")
        kept[order[:k]] = True
        return ablate.recovered(kept.view_as(dense))

    done: dict[int, float] = {}
    reached = None
    for k in tqdm(sizes, desc="growing a circuit", disable=not progress, leave=False):
        done[k] = measure(k)
        if done[k] >= target:
            reached = k
            break
    if reached is not None:
        below = max([k for k in done if k < reached], default=0)
        while reached - below > 1:  # a size that reaches it, between the two (bisection)
            mid = (below + reached) // 2
            done[mid] = measure(mid)
            below, reached = (below, mid) if done[mid] >= target else (mid, reached)
    circuit = None
    if reached is not None:
        n_w, n_r = dense.shape[1], dense.shape[2]
        circuit = []
        for i in order[:reached].tolist():
            p, rest = divmod(i, n_w * n_r)
            w, r = divmod(rest, n_r)
            writer = Node(
                kind=scores.writers[w][0],
                position=p,
                layer=scores.writers[w][1],
                head=scores.writers[w][2],
            )
            reader = Node(
                kind=scores.readers[r][0],
                position=p,
                layer=scores.readers[r][1],
                head=scores.readers[r][2],
            )
            circuit.append((writer, reader, float(dense.view(-1)[i])))
    sizes_done = sorted(done)
    return CircuitCurve(sizes_done, [done[k] for k in sizes_done], target, circuit)
