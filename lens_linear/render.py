"""Pictures of a linearized run: circuitsvis components, plotly figures, one self-contained report.

Figures draw what a :class:`~lens_linear.cache.LinearCache` (the ``lcache`` argument) has
already computed and say what to compute first otherwise (a figure never starts minutes of
work behind your back); :func:`report` computes everything it shows. Every renderer keeps the
numbers it drew in ``.data``, so what is on screen can be checked against the cache. This
module reads the cache through its public methods only (the cache imports nothing from here
but :func:`summary_html`, lazily).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Sequence

import circuitsvis as cv
import plotly.graph_objects as go
import torch

from lens_linear._validation import normalize_index
from lens_linear.jacobian_lens import fit_jacobian_lens, lens_table
from lens_linear.patching import PatchingTable
from lens_linear.tokens import single_token, token_strings

LinearCache = Any  # lens_linear.cache.LinearCache, which imports this module lazily


class NotComputedError(ValueError):
    """A figure asked for something the cache has not computed; the message says how."""


def _need(lcache: LinearCache, hook: str, detached: bool, todo: str) -> torch.Tensor:
    if not lcache.is_computed(hook, detached=detached):
        raise NotComputedError(
            f"this figure needs the {'detached' if detached else 'ordinary'} Jacobian of "
            f"{hook!r} at position {lcache.pos}, not computed yet: run `{todo}` first"
        )
    return lcache.jacobian(hook, detached=detached)


def layer_hooks(model: Any) -> dict[str, list[str]]:
    """Every layer's block, attention and MLP outputs (the stable-rank figure's hooks)."""
    n = model.cfg.n_layers
    return {
        "block": [f"blocks.{l}.hook_resid_post" for l in range(n)],
        "attention": [f"blocks.{l}.hook_attn_out" for l in range(n)],
        "mlp": [f"blocks.{l}.hook_mlp_out" for l in range(n)],
    }


def _with_data(rendered: Any, **data: Any) -> Any:
    rendered.data = data
    return rendered


# ---- circuitsvis ---------------------------------------------------------------------
def attention_patterns(lcache: LinearCache, layer: int) -> Any:
    """Every head's frozen attention pattern of ``layer`` (circuitsvis ``attention_heads``)."""
    layer = normalize_index(layer, lcache.model.cfg.n_layers)
    pattern = lcache.attention.pattern(layer)  # [heads, q, k]
    names = [f"L{layer}H{h}" for h in range(pattern.shape[0])]
    return _with_data(
        cv.attention.attention_heads(
            attention=pattern.float(),
            tokens=lcache.str_tokens,
            attention_head_names=names,
            mask_upper_tri=True,
        ),
        tokens=lcache.str_tokens,
        pattern=pattern,
        layer=layer,
    )


def token_contributions(lcache: LinearCache, token: str | int | None = None) -> Any:
    """Input tokens colored by their exact share of the output: ``‖J_i x_i‖``, or with
    ``token`` the signed logit ``J_i x_i · W_U[:, token]`` it adds to that next token."""
    _need(lcache, lcache.output, True, "lcache.jacobian()")
    parts = lcache.contributions()  # [pos, d_model]
    if token is None:
        values, label = parts.norm(dim=-1), "‖J_i x_i‖"
    else:
        index = token if isinstance(token, int) else single_token(lcache.model, token)
        values = parts @ lcache.model.W_U[:, index].to(parts)
        label = f"logit of {lcache.model.tokenizer.decode([index]) if lcache.model.tokenizer else index!r}"
    return _with_data(
        cv.tokens.colored_tokens(tokens=lcache.str_tokens, values=values.float()),
        tokens=lcache.str_tokens,
        values=values,
        label=label,
    )


def singular_tokens(lcache: LinearCache, n_tokens: int = 5) -> Any:
    """Each input token's leading singular vector of ``J_i``, decoded: the ``n_tokens`` output tokens
    it raises most, colored by their unembedding weight (one row per input token)."""
    _need(lcache, lcache.output, True, "lcache.jacobian()")
    rows, shown, values = [], [], []
    for i, tok in enumerate(lcache.str_tokens):
        top = lcache.decode(input_pos=i, n_triplets=1, n_tokens=n_tokens)[0]
        rows.append(
            {
                "token": tok,
                "sigma": top.value,
                "output": top.output.tokens,
                "scores": top.output.scores,
            }
        )
        shown += [f"[{tok}] ", *top.output.tokens, "\n"]
        values += [0.0, *top.output.scores, 0.0]
    return _with_data(cv.tokens.colored_tokens(tokens=shown, values=values), rows=rows)


# ---- plotly --------------------------------------------------------------------------
def reconstruction_figure(lcache: LinearCache) -> go.Figure:
    """The output embedding against its detached and ordinary reconstructions (paper fig. 3)."""
    _need(lcache, lcache.output, True, "lcache.jacobian()")
    y = lcache.activation().reshape(-1).double()
    fig = go.Figure()
    for detached, name in ((False, "ordinary Jacobian"), (True, "detached Jacobian")):
        rec = lcache.reconstruction(detached=detached).double()
        err = lcache.reconstruction_error(detached=detached)
        fig.add_trace(
            go.Scattergl(
                x=y.tolist(),
                y=rec.tolist(),
                mode="markers",
                marker=dict(size=4, opacity=0.6),
                name=f"{name} (error {err:.1e})",
            )
        )
    lo, hi = float(y.min()), float(y.max())
    fig.add_trace(
        go.Scatter(
            x=[lo, hi], y=[lo, hi], mode="lines", line=dict(dash="dot", color="gray"), name="y = x"
        )
    )
    fig.update_layout(
        title="Output embedding vs reconstruction Σ J_i x_i + bias",
        xaxis_title="output embedding y*",
        yaxis_title="reconstruction",
        template="plotly_white",
    )
    return fig


def spectra_figure(lcache: LinearCache) -> go.Figure:
    """Singular values of each input token's Jacobian ``J_i`` (paper figs. 4B and 5)."""
    jac = _need(lcache, lcache.output, True, "lcache.jacobian()")
    fig = go.Figure()
    for i, tok in enumerate(lcache.str_tokens):
        s = torch.linalg.svdvals(jac[i].double())
        fig.add_trace(go.Scatter(y=s.tolist(), mode="lines", name=f"{i}: {tok!r}"))
    fig.update_layout(
        title="Singular values of J_i per input token",
        xaxis_title="index",
        yaxis_title="singular value",
        yaxis_type="log",
        template="plotly_white",
    )
    return fig


def stable_rank_figure(lcache: LinearCache) -> go.Figure:
    """Stable rank of every layer's block, attention and MLP Jacobian, all input positions
    side by side (paper fig. 6C/D)."""
    groups = layer_hooks(lcache.model)
    todo = "lcache.jacobians(sum(ll.render.layer_hooks(model).values(), []))"
    fig = go.Figure()
    for label, hooks in groups.items():
        for h in hooks:
            _need(lcache, h, True, todo)
        ranks = [lcache.stable_rank(h) for h in hooks]
        fig.add_trace(
            go.Scatter(x=list(range(len(hooks))), y=ranks, mode="lines+markers", name=label)
        )
    fig.update_layout(
        title="Stable rank ‖J‖²_F / ‖J‖²_2 by layer",
        xaxis_title="layer",
        yaxis_title="stable rank",
        template="plotly_white",
    )
    return fig


def alignment_figure(lcache: LinearCache, n_triplets: int = 3) -> go.Figure:
    """``|⟨u_j(layer), u_j(last layer)⟩|`` of the top left singular vectors (paper fig. 6B)."""
    hooks = layer_hooks(lcache.model)["block"]
    for h in hooks:
        _need(lcache, h, True, "lcache.jacobians()")
    align = lcache.alignment(hooks, n_triplets=n_triplets)  # [layers, n_triplets]
    fig = go.Figure(
        [
            go.Scatter(
                x=list(range(len(hooks))),
                y=align[:, j].tolist(),
                mode="lines+markers",
                name=f"u{j + 1}",
            )
            for j in range(align.shape[1])
        ]
    )
    fig.update_layout(
        title="Projection of each layer's top singular vectors onto the last layer's",
        xaxis_title="layer",
        yaxis_title="|⟨u_j(layer), u_j(last)⟩|",
        template="plotly_white",
    )
    return fig


def patching_figure(result: PatchingTable) -> go.Figure:
    """A patching table as a heat map: layer × position, or layer × head (× position: one
    panel per head is too many, so positions are summed)."""
    values = result.values
    if values.ndim == 3:  # head_by_pos: [layer, head, pos]
        values = values.sum(-1)
    columns = "position" if result.axes[1] == "pos" else result.axes[1]
    if columns == "position" and result.str_tokens:
        x = [f"{i}: {t}" for i, t in enumerate(result.str_tokens[: values.shape[1]])]
    else:
        x = [f"{columns[0].upper()}{i}" for i in range(values.shape[1])]
    rows = result.layers or list(range(values.shape[0]))
    bound = float(values.abs().max()) or 1.0
    fig = go.Figure(
        go.Heatmap(
            z=values.tolist(),
            x=x,
            y=[f"L{l}" for l in rows],
            colorscale="RdBu",
            zmid=0,
            zmin=-bound,
            zmax=bound,
            colorbar=dict(title="normalized"),
        )
    )
    fig.update_layout(
        title=f"Activation patching: {result.sweep} (clean {result.clean:+.2f}, "
        f"corrupted {result.corrupted:+.2f})",
        xaxis_title=columns,
        yaxis_title="layer",
        template="plotly_white",
    )
    return fig


def circuit_figure(scores: Any, k: int = 40) -> go.Figure:
    """The ``k`` strongest edges of an :func:`~lens_linear.circuits.edge_attribution` result,
    summed over positions, as a graph: layers bottom to top (the embedding below, the logits
    above), heads across, each layer's MLP above its heads; line width ∝ |score|, blue
    positive and red negative; hover shows the numbers. A key or value reader of a
    grouped-query layer is drawn at its key-value head, just below the query heads."""
    total = scores.scores.sum(0)  # [writer, reader]
    flat = total.flatten()
    top = torch.topk(flat.abs(), min(k, int((flat != 0).sum()) or 1)).indices
    n_layers = max(la for _, la, _ in scores.readers if la is not None) + 1
    heads = {
        la: 1 + max(h for kind, l2, h in scores.writers if kind == "attn_head_out" and l2 == la)
        for la in range(n_layers)
    }

    def place(kind: str, layer: int | None, head: int | None) -> tuple[float, float, str]:
        if kind == "embed":
            return 0.5, 0.0, "embed"
        if kind == "logits":
            return 0.5, 2 * n_layers + 1.0, "logits"
        if kind in ("mlp_out", "mlp_in"):
            return 0.5, 2 * layer + 2.0, f"MLP{layer}"
        n = heads[layer]
        if kind in ("k_input", "v_input"):
            n_kv = 1 + max(h for kd, la, h in scores.readers if kd == kind and la == layer)
            if n_kv != n:
                return (head + 0.5) / n_kv, 2 * layer + 0.7, f"L{layer}KV{head}"
        return (head + 0.5) / n, 2 * layer + 1.0, f"L{layer}H{head}"

    bound = float(flat.abs()[top].max()) or 1.0
    fig = go.Figure()
    used: dict[str, tuple[float, float]] = {}
    for i in top.tolist():
        w, r = divmod(i, total.shape[1])
        x0, y0, a = place(*scores.writers[w])
        x1, y1, b = place(*scores.readers[r])
        used[a], used[b] = (x0, y0), (x1, y1)
        value = float(flat[i])
        reads = scores.readers[r][0].split("_")[0]
        fig.add_trace(
            go.Scatter(
                x=[x0, x1],
                y=[y0, y1],
                mode="lines",
                line=dict(
                    width=1 + 9 * abs(value) / bound, color="#2166ac" if value > 0 else "#b2182b"
                ),
                opacity=0.75,
                hoverinfo="text",
                text=f"{a} → {b} ({reads}): {value:+.4g}",
                showlegend=False,
            )
        )
    names = sorted(used, key=lambda n: (used[n][1], used[n][0]))
    fig.add_trace(
        go.Scatter(
            x=[used[n][0] for n in names],
            y=[used[n][1] for n in names],
            mode="markers+text",
            text=names,
            textposition="middle right",
            marker=dict(size=9, color="#444"),
            hoverinfo="text",
            showlegend=False,
        )
    )
    fig.update_layout(
        title=f"Circuit: the {len(top)} strongest edges ({scores.method}; clean {scores.clean:+.2f}, "
        f"corrupted {scores.corrupted:+.2f})",
        xaxis=dict(visible=False, range=[-0.05, 1.15]),
        yaxis=dict(
            title="layer",
            tickvals=[2 * la + 1 for la in range(n_layers)],
            ticktext=[f"L{la}" for la in range(n_layers)],
        ),
        template="plotly_white",
        height=max(400, 40 * n_layers),
    )
    return fig


def lens_figure(
    lcache: LinearCache,
    lenses: dict[str, Any] | None = None,
    *,
    token: int | None = None,
    pos: int | None = None,
) -> go.Figure:
    """The probability of ``token`` (default the model's own prediction) read from each
    layer through the logit lens and each lens, one line per lens (hover: the top token and
    the token's rank); the model's own probability dashed. ``lenses`` maps names to fitted
    lenses; ``None`` reads through this input's own transport of every layer
    (:func:`~lens_linear.jacobian_lens.lens_table`), which computes ``lcache.transport`` for each
    layer not yet computed: ``d_model`` backward rows per layer (fitted lenses cost nothing)."""
    rows = lens_table(lcache, lenses, token=token, pos=pos)
    pos = lcache.pos if pos is None else pos % lcache.n_pos
    token = lcache.top_predictions(1, pos=pos)[0].token_id if token is None else int(token)
    name = token_strings(lcache.model, [token])[0]
    fig = go.Figure()
    for lens in dict.fromkeys(r["lens"] for r in rows):
        mine = [r for r in rows if r["lens"] == lens]
        fig.add_trace(
            go.Scatter(
                x=[r["layer"] for r in mine],
                y=[r["probability"] for r in mine],
                customdata=[[r["top_token"], r["rank"]] for r in mine],
                hovertemplate="layer %{x}: p = %{y:.3g}, rank %{customdata[1]}"
                "<br>top token %{customdata[0]}<extra></extra>",
                mode="lines+markers",
                name=lens,
            )
        )
    own = float(lcache.logits[pos].double().softmax(-1)[token])
    fig.add_hline(
        y=own, line=dict(dash="dot", color="gray"), annotation_text=f"model output {own:.3g}"
    )
    fig.update_layout(
        title=f"Probability of {name!r} at position {pos}, read from each layer",
        xaxis_title="layer (block output)",
        yaxis_title=f"p({name!r})",
        yaxis_type="log",
        template="plotly_white",
    )
    return fig


# ---- notebook summary ----------------------------------------------------------------
def summary_html(lcache: LinearCache) -> str:
    """Prediction, reconstruction errors and token contributions as a small HTML block."""
    esc = html.escape
    preds = " ".join(
        f"<code>{esc(repr(p.token))}</code> {p.prob:.3f}" for p in lcache.top_predictions(5)
    )
    lines = [
        f"<b>LinearCache</b> {esc(str(lcache.model.cfg.model_name))}, {lcache.n_pos} tokens, "
        f"output at position {lcache.pos} ({esc(repr(lcache.str_tokens[lcache.pos]))})",
        f"next token: {preds}",
    ]
    if lcache.is_computed():
        errs = f"detached {lcache.reconstruction_error():.1e}"
        if lcache.is_computed(detached=False):
            errs += f", ordinary {lcache.reconstruction_error(detached=False):.1e}"
        lines.append(f"reconstruction error: {errs}")
        norms = lcache.contributions().norm(dim=-1)
        top = float(norms.max()) or 1.0
        spans = "".join(
            f'<span title="{float(v):.3g}" style="background: rgba(220, 80, 40, {float(v) / top:.2f}); '
            f'padding: 1px 2px; margin: 1px; border-radius: 3px">{esc(t)}</span>'
            for t, v in zip(lcache.str_tokens, norms)
        )
        lines.append(f"contribution ‖J_i x_i‖: {spans}")
    else:
        lines.append("Jacobian not computed yet: <code>lcache.jacobian()</code>")
    return '<div class="lens-linear-summary">' + "<br>".join(lines) + "</div>"


# ---- report --------------------------------------------------------------------------
def _circuitsvis_js() -> str:
    path = Path(cv.__file__).parent / "dist" / "cdn" / "iife.js"
    return path.read_text(encoding="utf-8").replace("</script>", "")


def _own_prompt_lenses(lcache: LinearCache) -> dict[str, Any]:
    """An ordinary and a detached Jacobian lens fitted on the cache's own prompt (every
    position a source and a target): what the report's lens figure compares."""
    fit = dict(
        skip_first_positions=0,
        max_seq_len=max(2, lcache.n_pos),
        max_memory=lcache.max_memory,
        progress=False,
    )
    return {
        "Jacobian lens (this prompt)": fit_jacobian_lens(lcache.model, [lcache.tokens], **fit),
        "detached Jacobian lens (this prompt)": fit_jacobian_lens(
            lcache.model, [lcache.tokens], detached=True, **fit
        ),
    }


def report(
    lcache: LinearCache,
    path: str | Path,
    layers: bool = True,
    patching: Sequence[PatchingTable] = (),
    attention_layers: Sequence[int] | None = None,
    circuit: Any = None,
) -> Path:
    """Write one self-contained HTML file (every script inlined: it opens with no network)
    with the figures and circuitsvis components above; computes what they need.

    With ``layers``, the layer figures and :func:`lens_figure` of an ordinary and a detached
    Jacobian lens fitted on this prompt alone (every position a source and a target). With
    ``circuit`` (an :func:`~lens_linear.circuits.edge_attribution` result), its
    :func:`circuit_figure`."""
    from plotly.offline import get_plotlyjs

    lcache.jacobian()
    figures = [reconstruction_figure(lcache), spectra_figure(lcache)]
    if layers:
        lcache.jacobians(sum(layer_hooks(lcache.model).values(), []))
        figures += [stable_rank_figure(lcache), alignment_figure(lcache)]
        if lcache.model.cfg.n_layers > 1 and lcache.n_pos > 1:  # a lens needs both
            figures.append(lens_figure(lcache, _own_prompt_lenses(lcache)))
    figures += [patching_figure(r) for r in patching]
    if circuit is not None:
        figures.append(circuit_figure(circuit))
    n_layers = lcache.model.cfg.n_layers
    attention_layers = [0, n_layers - 1] if attention_layers is None else attention_layers
    top = lcache.top_predictions(1)[0]
    views = [
        ("Token contributions ‖J_i x_i‖", token_contributions(lcache)),
        (f"Contributions to the logit of {top.token!r}", token_contributions(lcache, top.token_id)),
        ("Leading singular vector of each J_i, read as output tokens", singular_tokens(lcache)),
    ]
    views += [
        (f"Attention patterns, layer {l}", attention_patterns(lcache, l)) for l in attention_layers
    ]
    js = _circuitsvis_js()
    body = [f"<h1>lens_linear report</h1>{summary_html(lcache)}"]
    body += [
        f'<div class="figure">{fig.to_html(full_html=False, include_plotlyjs=False)}</div>'
        for fig in figures
    ]
    for title, view in views:
        body.append(
            f'<h3>{html.escape(title)}</h3><div class="circuitsvis">{view.local_src.replace(js, "")}</div>'
        )
    meta = {"figures": len(figures), "components": len(views)}
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>lens_linear report</title>"
        f"<script>{get_plotlyjs()}</script><script>{js}</script>"
        f"<style>body {{ font-family: sans-serif; margin: 24px; }} .figure {{ margin: 12px 0; }}</style></head>"
        f"<body data-expected='{json.dumps(meta)}'>{''.join(body)}</body></html>"
    )
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path
