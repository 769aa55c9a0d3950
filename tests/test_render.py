"""Renderers and figures show the cache's own numbers; the report renders in headless Chromium."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import PROMPT, cached_tiny, newest_tl_only, rel

import lens_linear as ll
from lens_linear import render
from lens_linear.circuits import edge_attribution
from lens_linear.jacobian_lens import fit_jacobian_lens, lens_table
from lens_linear.patching import activation_patching, prompt_pairs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(
    os.environ.get("LENS_LINEAR_ARTIFACTS", Path(__file__).parent.parent / "artifacts")
)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lcache(request):
    lc = ll.run_with_linear_cache(cached_tiny("bridge", request.param), PROMPT)
    lc.jacobian()  # the figures draw what is computed (the check no longer computes it)
    lc.jacobian(detached=False)
    lc.jacobians(sum(render.layer_hooks(lc.model).values(), []))
    return lc


def arr(values):
    """A figure's trace data as float64 (plotly keeps Python floats)."""
    return torch.tensor(
        [list(v) for v in values]
        if len(values) and hasattr(values[0], "__len__")
        else list(values),
        dtype=torch.float64,
    )


def test_attention_patterns_show_every_head_of_the_frozen_pattern(lcache):
    view = render.attention_patterns(lcache, 1)
    expected = lcache.point.values["blocks.1.attn.hook_pattern"][0]
    assert torch.equal(view.data["pattern"], expected) and view.data["tokens"] == lcache.str_tokens
    assert view.data["pattern"].shape[0] == lcache.model.cfg.n_heads
    for tok in lcache.str_tokens:
        assert json.dumps(tok)[1:-1] in view.cdn_src
    with pytest.raises(IndexError, match="layer"):
        render.attention_patterns(lcache, 99)


def test_token_contributions_are_exact_shares_of_the_output_and_its_logit(lcache):
    view = render.token_contributions(lcache)
    assert torch.equal(view.data["values"], lcache.contributions().norm(dim=-1))
    top = lcache.top_predictions(1)[0]
    signed = render.token_contributions(lcache, top.token_id).data["values"]
    model, bias = lcache.model, lcache.bias_term()
    logit = (
        signed.sum()
        + bias @ model.W_U[:, top.token_id]
        + (model.b_U[top.token_id] if getattr(model, "b_U", None) is not None else 0)
    )
    assert abs(float(logit - lcache.logits[lcache.pos, top.token_id])) <= 1e-4 * float(
        lcache.logits[lcache.pos].abs().max()
    )


def test_singular_tokens_decode_each_tokens_leading_direction(lcache):
    view = render.singular_tokens(lcache, n_tokens=3)
    assert [r["token"] for r in view.data["rows"]] == lcache.str_tokens
    for i, row in enumerate(view.data["rows"]):
        top = lcache.decode(input_pos=i, n_triplets=1, n_tokens=3)[0]
        assert row["output"] == top.output.tokens and row["sigma"] == top.value


def test_figures_plot_the_cache_data(lcache):
    fig = render.reconstruction_figure(lcache)
    y = lcache.activation().reshape(-1).double()
    plain, detached = fig.data[0], fig.data[1]
    assert rel(arr(detached.x), y) == 0 and rel(arr(detached.y), y) <= 1e-5
    assert rel(arr(plain.y), y) >= 1e-2  # the plain Jacobian does not reconstruct
    spectra = render.spectra_figure(lcache)
    assert len(spectra.data) == lcache.n_pos
    assert rel(arr(spectra.data[2].y), torch.linalg.svdvals(lcache.jacobian()[2].double())) <= 1e-12
    ranks = render.stable_rank_figure(lcache)
    assert [t.name for t in ranks.data] == ["block", "attention", "mlp"]
    assert list(ranks.data[2].y) == [
        lcache.stable_rank(h) for h in render.layer_hooks(lcache.model)["mlp"]
    ]
    align = render.alignment_figure(lcache, n_triplets=2)
    expected = lcache.alignment(render.layer_hooks(lcache.model)["block"], n_triplets=2)
    assert (
        rel(arr(align.data[1].y), expected[:, 1]) <= 1e-6 and abs(align.data[0].y[-1] - 1) <= 1e-5
    )


def test_circuit_figure_draws_the_strongest_edges():
    """One line per edge, the k largest by magnitude of the scores summed over positions,
    each hover naming its writer, reader and score; the nodes at their layers."""
    model = ll.tiny_model("llama", n_layers=2)  # grouped-query: key/value readers are KV heads
    pairs = prompt_pairs(model, "Hello there, friend!", "Hello where, friend!", "f", "x")
    scores = edge_attribution(model, pairs, detached=False, progress=False)
    fig = render.circuit_figure(scores, k=12)
    lines = [t for t in fig.data if t.mode == "lines"]
    total = scores.scores.sum(0).flatten()
    want = sorted(total.abs().tolist(), reverse=True)[:12]
    got = sorted((abs(float(t.text.rsplit(": ", 1)[1])) for t in lines), reverse=True)
    assert len(lines) == 12 and got == pytest.approx(want, rel=1e-3)
    widths = [t.line.width for t in lines]
    assert max(widths) == pytest.approx(10.0) and min(widths) >= 1.0
    assert any("KV" in t.text for t in lines) or all(
        "(k)" not in t.text and "(v)" not in t.text for t in lines
    )


def test_patching_figure_is_the_table():
    model = cached_tiny("bridge", "llama")
    pairs = prompt_pairs(model, "Hello there, friend!", "Hello where, friend!", "a", "c")
    for sweep in ("resid_pre", "head"):
        result = activation_patching(model, pairs, sweep, progress=False)
        fig = render.patching_figure(result)
        assert rel(arr(fig.data[0].z), result.values) <= 1e-7
        assert list(fig.data[0].y) == [f"L{l}" for l in result.layers]
        if sweep == "resid_pre":
            assert list(fig.data[0].x) == [f"{i}: {t}" for i, t in enumerate(pairs.str_tokens)]


def test_lens_table_reads_each_layer_as_the_model_reads_its_output():
    model = ll.tiny_model("gpt2", n_layers=4)
    lc = ll.run_with_linear_cache(model, PROMPT)
    fit = dict(skip_first_positions=0, progress=False)
    lenses = {
        "ordinary": fit_jacobian_lens(model, [lc.tokens], **fit),
        "detached": fit_jacobian_lens(model, [lc.tokens], detached=True, **fit),
    }
    _, cache = model.run_with_cache(lc.tokens)
    tables = {}
    for token, pos in ((None, None), (7, 2)):
        rows = tables[pos] = lens_table(lc, lenses, token=token, pos=pos)
        assert [(r["layer"], r["lens"]) for r in rows] == [
            (layer, name) for layer in range(3) for name in ("logit lens", "ordinary", "detached")
        ]
        at = lc.pos if pos is None else pos
        token = lc.top_predictions(1)[0].token_id if token is None else token
        for r in rows:
            if r["lens"] != "logit lens":
                continue
            h = cache[f"blocks.{r['layer']}.hook_resid_post"][0, at]
            with torch.no_grad():  # the logit lens by hand: final norm, unembedding, softmax
                probs = model.unembed(model.ln_final(h[None, None]))[0, 0].double().softmax(-1)
            assert r["probability"] == float(probs[token])
            assert r["rank"] == int((probs > probs[token]).sum())
            assert r["top_token"] == model.tokenizer.decode([int(probs.argmax())])
    # this input's own map is the detached lens fitted on this input alone
    own = lens_table(lc)
    assert [r["lens"] for r in own[:2]] == ["logit lens", "this input's own map (detached)"]
    detached = {r["layer"]: r for r in tables[None] if r["lens"] == "detached"}
    for r in own[1::2]:
        assert abs(r["probability"] / detached[r["layer"]]["probability"] - 1) <= 1e-5
    fig = render.lens_figure(lc, lenses, token=7, pos=2)
    assert [t.name for t in fig.data] == ["logit lens", "ordinary", "detached"]
    for trace in fig.data:
        mine = [r for r in rows if r["lens"] == trace.name]
        assert list(trace.x) == [0, 1, 2] and list(trace.y) == [r["probability"] for r in mine]
        assert [list(c) for c in trace.customdata] == [[r["top_token"], r["rank"]] for r in mine]
    assert len(render.lens_figure(lc).data) == 2  # the logit lens and this input's own map


def test_figures_say_what_to_compute_first():
    lc = ll.run_with_linear_cache(cached_tiny("bridge", "llama"), PROMPT, check=False)
    with pytest.raises(render.NotComputedError, match=r"run `lcache.jacobian\(\)` first"):
        render.reconstruction_figure(lc)
    with pytest.raises(render.NotComputedError, match="run `lcache.jacobian"):
        render.token_contributions(lc)
    assert "not computed yet" in lc._repr_html_()
    lc.jacobian()
    render.reconstruction_figure(lc)  # the ordinary reconstruction is one product: no matrix needed
    assert not lc.is_computed(detached=False)
    with pytest.raises(render.NotComputedError, match="layer_hooks"):
        render.stable_rank_figure(lc)
    with pytest.raises(render.NotComputedError, match=r"lcache.jacobians\(\)"):
        render.alignment_figure(lc)


def test_repr_html_summarizes_prediction_errors_and_contributions(lcache):
    page = lcache._repr_html_()
    assert repr(lcache.top_predictions(1)[0].token).replace("'", "&#x27;") in page
    assert f"detached {lcache.reconstruction_error():.1e}" in page
    assert f"ordinary {lcache.reconstruction_error(detached=False):.1e}" in page
    norms = lcache.contributions().norm(dim=-1)
    assert f'title="{float(norms[0]):.3g}"' in page


def check_in_chromium(path: Path, screenshot: Path) -> dict:
    """Open a report with no network; return console errors, what rendered, pixel variance."""
    from io import BytesIO

    import numpy as np
    from PIL import Image
    from playwright.sync_api import sync_playwright

    if CHROMIUM is None:
        pytest.fail(
            "the report must be checked in a browser here (CI or LENS_LINEAR_REQUIRE_BROWSER is set) but no "
            "chromium was found: install Debian's chromium (`apt-get install chromium`; .ci/run does)"
        )
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.route(
                "**/*",
                lambda route: (
                    route.continue_() if route.request.url.startswith("file:") else route.abort()
                ),
            )
            page.goto(path.resolve().as_uri())
            expected = json.loads(page.get_attribute("body", "data-expected"))
            page.wait_for_function(
                f"document.querySelectorAll('.plotly-graph-div .main-svg').length >= {expected['figures']}",
                timeout=30000,
            )
            page.wait_for_function(
                "[...document.querySelectorAll('.circuitsvis > div[id^=circuits-vis]')]"
                ".every(d => d.querySelector('*') !== null)",
                timeout=30000,
            )
            found = {
                "figures": page.eval_on_selector_all(
                    ".plotly-graph-div",
                    "els => els.filter(e => e.querySelector('.main-svg')).length",
                ),
                "components": page.eval_on_selector_all(
                    ".circuitsvis > div[id^=circuits-vis]",
                    "els => els.filter(e => e.children.length > 0).length",
                ),
                "text": page.inner_text("body"),
                "titles": page.eval_on_selector_all(
                    ".plotly-graph-div .gtitle", "els => els.map(e => e.textContent)"
                ),
                "legends": page.eval_on_selector_all(
                    ".plotly-graph-div .legendtext", "els => els.map(e => e.textContent)"
                ),
            }
            png = page.screenshot(full_page=True)
        finally:
            browser.close()
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    screenshot.write_bytes(png)
    pixels = np.asarray(Image.open(BytesIO(png)).convert("L"), dtype=np.float64)
    return {
        **found,
        "expected": expected,
        "errors": errors,
        "variance": float(pixels.var()),
        "size": pixels.shape,
    }


BROWSER_REQUIRED = bool(os.environ.get("CI") or os.environ.get("LENS_LINEAR_REQUIRE_BROWSER"))
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and not BROWSER_REQUIRED,
    reason="no chromium here (in CI, where CI is set, this test fails instead)",
)


@needs_chromium
def test_report_opens_offline_in_headless_chromium(lcache, tmp_path):
    pairs = prompt_pairs(lcache.model, "Hello there, friend!", "Hello where, friend!", "a", "c")
    result = activation_patching(lcache.model, pairs, "resid_pre", progress=False)
    circuit = edge_attribution(lcache.model, pairs, progress=False)
    path = render.report(lcache, tmp_path / "report.html", patching=[result], circuit=circuit)
    text = path.read_text()
    assert (
        "<script src" not in text
    )  # every script inlined; any network request is aborted and fails the test
    seen = check_in_chromium(path, ARTIFACTS / f"report-{lcache.model.cfg.model_name}.png")
    assert seen["errors"] == []
    assert seen["figures"] == seen["expected"]["figures"] == 7
    assert seen["components"] == seen["expected"]["components"] == 5
    assert any(t.startswith("Circuit: the") for t in seen["titles"]), seen["titles"]
    assert all(t.strip() in seen["text"] for t in lcache.str_tokens if t.strip())
    # the lens figure drew its three lenses
    assert any(t.endswith("read from each layer") for t in seen["titles"]), seen["titles"]
    lenses = ["logit lens", "Jacobian lens (this prompt)", "detached Jacobian lens (this prompt)"]
    assert all(name in seen["legends"] for name in lenses), seen["legends"]
    assert seen["variance"] > 100, "the screenshot is blank"


@newest_tl_only
@needs_chromium
def test_cli_report_on_smollm2_renders(tmp_path, capsys):
    from lens_linear.cli import main

    path = tmp_path / "smollm2.html"
    # --no-layers: the layer figures are checked on the tiny models (with them this run takes ~140 s)
    assert main(["analyze", "The bridge out of Marin", "--no-layers", "--report", str(path)]) == 0
    assert f"report    {path}" in capsys.readouterr().out
    seen = check_in_chromium(path, ARTIFACTS / "report-smollm2.png")
    assert seen["errors"] == []
    assert seen["figures"] == seen["expected"]["figures"] == 2
    assert seen["components"] == seen["expected"]["components"] == 5
    assert "Bridge" in seen["text"] or " bridge" in seen["text"]
    assert seen["variance"] > 100, "the screenshot is blank"
