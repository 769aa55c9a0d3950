"""Write the notebooks (no outputs: CI executes them on the default model).

Run ``python notebooks/build.py`` after editing the cells below."""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

SETUP = "import torch\nimport lens_linear as ll\nfrom lens_linear import render\n\nmodel = ll.load_model()  # SmolLM2-135M, offline"

NOTEBOOKS = {
    "1_quickstart.ipynb": [
        "# Quickstart: one prompt as an exact linear system\n\nFor one input, freezing the norm scales, "
        "attention patterns and MLP gates at their values leaves the output unchanged and makes the map "
        "from input embeddings to the output embedding linear. Its Jacobian reconstructs the output to "
        "float rounding; the ordinary Jacobian does not. This notebook reproduces the paper's first "
        "results on SmolLM2.",
        SETUP,
        'lcache = ll.run_with_linear_cache(model, "The bridge out of Marin is the")\nlcache  # prediction, '
        "reconstruction error and each token's contribution",
        "## Reconstruction (figure 3)\nThe detached Jacobian reproduces the output embedding; the ordinary one is off by order one.",
        'print(f"detached {lcache.reconstruction_error():.1e}, ordinary {lcache.reconstruction_error(detached=False):.2f}")'
        "  # the ordinary one from one Jacobian-vector product: its matrix is not formed\n"
        "render.reconstruction_figure(lcache)",
        "## Which input tokens matter\n`J_i x_i` is the exact share of input token `i`; projected on the "
        "predicted token's unembedding it is that token's share of the logit.",
        "render.token_contributions(lcache)",
        "render.token_contributions(lcache, lcache.top_predictions(1)[0].token_id)",
        "## Singular vectors as tokens (figures 4-5)\nEach `J_i` is low rank; its leading left singular "
        "vector, read through the unembedding, names what the token pushes the prediction towards.",
        "render.spectra_figure(lcache)",
        "render.singular_tokens(lcache)",
        "## Layer by layer (figure 6)\nEvery layer's Jacobian from one set of passes: the stable rank of "
        "blocks, attention and MLPs, and how early the last layer's leading directions appear.",
        "lcache.jacobians(sum(render.layer_hooks(model).values(), []))\nrender.stable_rank_figure(lcache)",
        "render.alignment_figure(lcache)",
    ],
    "2_attention_circuits.ipynb": [
        "# Attention circuits and induction heads\n\nWith the pattern frozen, an attention layer is a sum of "
        "`FactoredMatrix` terms `A[h, q, k] W_V^h W_O^h`. Induction heads attend from a repeated token to "
        "the token after its first copy and copy it: a positive copying score.",
        SETUP,
        "report = ll.induction_heads(model, seq_len=50)\nreport",
        "top = report.top[0]\ntokens = report.tokens\nlcache = ll.run_with_linear_cache(model, tokens, check=False)\n"
        "render.attention_patterns(lcache, top.layer)",
        "## The attention Jacobian of one head\nFrom the residual stream at the attended token to the "
        "head's output at the query (norm frozen); its eigenvalues through `W_E` and `W_U` measure copying.",
        "S = (tokens.shape[-1] - 1) // 2\nq = tokens.shape[-1] - 5\nfm = lcache.attention_jacobian(top.layer, q, q - S + 1, "
        'head=top.head, include_norm=True)\nprint(fm.shape, "copying score", float(lcache.attention.copying_score(fm)))',
        "## What freezing the pattern leaves out\nThe full Jacobian is the OV term plus the QK term "
        "(the pattern's own response); rotary attention takes the autograd route.",
        "# Jacobians act on column vectors (J @ dx), like lcache.jacobian; circuits (ov_circuit) are TL's x @ M\n"
        "ov = lcache.attention_jacobian(top.layer, q, q - S + 1).AB\nqk = lcache.attention.qk_term(top.layer, q, q - S + 1)\n"
        'print(f"|OV| = {ov.norm():.3f}, |QK| = {qk.norm():.3f}")',
    ],
    "3_ioi_patching.ipynb": [
        "# IOI: activation patching and its Jacobian prediction\n\nPatching the clean run's residual "
        "stream into the corrupted run, layer by layer and position by position, shows where the "
        "indirect object's name moves to the final position. One backward pass through the frozen map "
        "predicts the whole table.",
        SETUP
        + "\nfrom lens_linear.patching import activation_patching, predicted_patching, prompt_pairs",
        'pairs = prompt_pairs(model, "After John and Mary went to the store, Mary gave a bottle of milk to",\n'
        '                     "After John and Mary went to the store, John gave a bottle of milk to", " John", " Mary")\n'
        'real = activation_patching(model, pairs, "resid_pre")\nreal',
        "render.patching_figure(real)",
        "## Per head",
        'heads = activation_patching(model, pairs, "head")\nrender.patching_figure(heads)',
        "## Predicted from gradients\nThe default prediction (for a residual sweep) integrates the "
        "ordinary gradient over 4 points from the corrupted to the clean input and reruns its largest "
        "5% of entries as real patches (marked in `pred.certified`); `detached=True` is the frozen map's prediction, exact for "
        "patching through the corrupted run's frozen map. Both compared here with real patching.",
        'for options in [{}, {"detached": True}]:\n'
        '    pred = predicted_patching(model, pairs, "resid_pre", **options)\n'
        "    corr = torch.corrcoef(torch.stack([pred.values.flatten(), real.values.flatten()]))[0, 1]\n"
        '    print(f"{pred.method}: correlation with real patching {corr:.3f}")\nrender.patching_figure(pred)',
        "## Edges: which component feeds which\nEvery edge of TransformerLens' residual-stream graph "
        "(writers: embedding, heads, MLPs; readers: each head's query, key and value input, each MLP, the "
        "logits), scored by EAP-IG (the default; `detached=True` scores each edge exactly through the "
        "frozen map). SmolLM2 uses grouped-query attention, which TransformerLens' own edge sweep refuses.",
        "from lens_linear.circuits import edge_attribution, grow_circuit\n"
        "edges = edge_attribution(model, pairs)\nprint(edges)\nrender.circuit_figure(edges, k=30)",
        "## How much of the behaviour does a circuit carry?\nKeep the strongest edges, give every other "
        "reader the corrupted run's writes (TransformerLens' `faithfulness`), and grow the circuit until "
        "it recovers 80% of the clean − corrupted gap.",
        "curve = grow_circuit(model, pairs, edges, target=0.8)\ncurve",
    ],
    "4_steering.ipynb": [
        "# Steering with a concept's frozen map\n\nThe concept prompt's detached Jacobian, applied to a new "
        "prompt's embeddings and mixed into the residual stream at one layer (the paper's equation 16), "
        "pulls generation towards the concept. `lam = 1` is ordinary generation.",
        SETUP + "\nfrom lens_linear.patching import steer",
        'concept, prompt = "The Golden Gate", "Here is a painting of the"\n'
        'target = model.to_single_token(" Bridge")\nfor lam in (1.0, 0.75, 0.5):\n'
        "    out = steer(model, concept, prompt, layer=15, lam=lam, max_new_tokens=8)\n"
        "    rank = int((out.first_logits > out.first_logits[target]).sum())\n"
        "    print(f\"lam={lam}: rank of ' Bridge' {rank:5d}  {out.text!r}\")",
        "## The concept's own prediction\nWhat the concept prompt predicts, and which of its tokens carry it.",
        "concept_cache = ll.run_with_linear_cache(model, concept)\nprint(concept_cache.top_predictions(3))\n"
        "concept_cache.jacobian()  # the figure draws each token's J_i x_i\nrender.token_contributions(concept_cache)",
    ],
    "5_jacobian_lens.ipynb": [
        "# The Jacobian lens, and each prompt's exact linear map\n\nThe logit lens reads the output of "
        "block `l` as if it were the last block's. The Jacobian lens (TransformerLens' `JacobianLens`) "
        "first carries it there with one `[d_model, d_model]` matrix per layer: the Jacobian from block "
        "`l`'s output to the last block's output, summed over positions and averaged over a corpus. "
        "The *detached* lens averages instead each prompt's frozen map (norm scales, attention patterns "
        "and gates frozen at the prompt's own values): that map is exactly linear, so each prompt's "
        "transport is not a local approximation but the prompt's own linear map, verified as it is "
        "computed, and the detached lens is the average of exact maps.",
        "import plotly.graph_objects as go\n\nimport lens_linear as ll\nfrom lens_linear import render\n"
        "from lens_linear.jacobian_lens import read_logits\n\nmodel = ll.load_model()  # SmolLM2-135M, offline",
        "## Fitting\nThree prompts here, so the lenses are noisy (a real lens takes thousands). Each prompt costs `d_model` "
        "backward rows, batched; the first `skip_first_positions` positions (attention sinks) and the "
        "last are left out of sources and targets, as in TransformerLens.",
        "prompts = [\n"
        '    "The Golden Gate Bridge is a suspension bridge spanning the Golden Gate, the strait connecting San '
        'Francisco Bay and the Pacific Ocean. It links the city of San Francisco",\n'
        '    "Photosynthesis is the process by which green plants, algae and some bacteria use the energy of '
        'sunlight to turn carbon dioxide and water into sugars and oxygen",\n'
        '    "In 1969 the Apollo 11 mission landed the first two people on the Moon. Neil Armstrong stepped out '
        'of the lunar module, followed by Buzz Aldrin",\n'
        "]\n"
        'fit = dict(skip_first_positions=16, corpus="notebook", progress=False)\n'
        "lens = ll.fit_jacobian_lens(model, prompts, **fit)  # = JacobianLens.fit on the same prompts\n"
        "detached = ll.fit_jacobian_lens(model, prompts, detached=True, **fit)  # each prompt's frozen map\n"
        'print(lens, lens.metadata["estimator"], detached.metadata["estimator"])',
        "## TransformerLens' readout\n`lens.readout` is TransformerLens' own: each layer's residual "
        "transported, then read through the final norm and unembedding; `use_jacobian=False` reads the "
        "same residuals through the logit lens.",
        'prompt = "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars. It is the most '
        'famous landmark in the city of"\n'
        "tops = {\n"
        "    use: lens.readout(model, prompt, positions=[-1], top_k=3, use_jacobian=use).top_tokens(model.tokenizer, k=3)\n"
        "    for use in (True, False)\n"
        "}\n"
        'print("layer  Jacobian lens                 logit lens")\n'
        "for layer in [*range(0, model.cfg.n_layers - 1, 4), model.cfg.n_layers - 1]:  # the last: the model's output\n"
        "    jacobian, logit = (' '.join(map(repr, tops[use][layer][0])) for use in (True, False))\n"
        '    print(f"{layer:5d}  {jacobian:30s}{logit}")',
        "## Three lenses side by side\nThe probability of the model's own next token read from every "
        "layer: through the logit lens, the Jacobian lens and the detached lens (hover for each "
        "reading's top token and the token's rank).",
        "lcache = ll.run_with_linear_cache(model, prompt)\nanswer = lcache.top_predictions(1)[0]\nprint(answer)\n"
        'render.lens_figure(lcache, {"Jacobian lens": lens, "detached Jacobian lens": detached})',
        "## This input's own transport\n`lcache.transport(layer)` is this prompt's transport through "
        "its own frozen map: the matrix a detached fit on this prompt alone gives (checked below), "
        "verified as it is computed. `transport_fraction` says how much of a corpus lens's transport "
        "of this prompt's residuals that map explains (1: exactly).",
        "layer = 20\nT = lcache.transport(layer)  # float64 [d_model, d_model]\n"
        "alone = ll.fit_jacobian_lens(model, [prompt], detached=True, source_layers=[layer], skip_first_positions=0, progress=False)\n"
        'print(T.shape, T.dtype, f"vs a detached fit on this prompt alone: {(alone.jacobians[layer].double() - T).abs().max():.1e}")\n'
        'for name, corpus_lens in (("Jacobian lens", lens), ("detached Jacobian lens", detached)):\n'
        '    print(f"{name}: fraction explained by this prompt\'s own map {lcache.transport_fraction(corpus_lens, [layer])[layer]:.3f}")',
        "## Who writes the lens's answer\n`lens_contributions` splits the lens's readout of a token at "
        "one layer (its logit, the final norm frozen at the transported vector) exactly: by the "
        "component that wrote it into the residual stream (embedding, each attention head and MLP, the "
        "readout's own bias), or by input position (the frozen map's `J⁺_i x_i`, its bias term last).",
        "parts = lcache.lens_contributions(layer, answer.token_id, lens=lens)\n"
        'h = lcache.activation(f"blocks.{layer}.hook_resid_post")\n'
        "readout = float(read_logits(model, lens.transport(h, layer))[answer.token_id].detach())\n"
        'print(f"sum of parts {sum(parts.values()):.4f}, lens readout {readout:.4f}")\n'
        "top = sorted(parts.items(), key=lambda kv: -abs(kv[1]))[:10]\n"
        "go.Figure(go.Bar(x=[k for k, _ in top], y=[v for _, v in top])).update_layout(\n"
        '    title=f"Jacobian-lens logit of {answer.token!r} from block {layer}: the largest components",\n'
        '    yaxis_title="logit", template="plotly_white")',
        'by_pos = lcache.lens_contributions(layer, answer.token_id, lens=lens, by="position")\n'
        'labels = [f"{i}: {t}" for i, t in enumerate(lcache.str_tokens)] + ["bias"]\n'
        'print(f"sum over positions {float(by_pos.sum()):.4f}")\n'
        "go.Figure(go.Bar(x=labels, y=by_pos.tolist())).update_layout(\n"
        '    title=f"Jacobian-lens logit of {answer.token!r} from block {layer}, by input position",\n'
        '    yaxis_title="logit", template="plotly_white")',
        "## Saving, loading, checkpoints, several processes\n`lens.save` writes the reference "
        "artifact format (float16 by default, provenance under `metadata`), which "
        "`JacobianLens.load` reads. `checkpoint=` writes the running sums after every prompt "
        "(atomically, in the reference checkpoint schema, which `JacobianLens.load` also reads); "
        "a fit given an existing checkpoint of the same model, options and prompts resumes after "
        "its last prompt.",
        "import tempfile\nfrom pathlib import Path\n\nfrom transformer_lens.tools.analysis import JacobianLens\n\n"
        "folder = Path(tempfile.mkdtemp())\n"
        'detached.save(str(folder / "detached.pt"))\n'
        'loaded = JacobianLens.load(str(folder / "detached.pt"))\n'
        'print(loaded, loaded.metadata["estimator"], loaded.metadata["corpus"])\n'
        "# stopped after two prompts, then resumed: the third prompt alone is fitted the second time\n"
        "last = model.cfg.n_layers - 2  # one source layer: a short backward\n"
        'resume = dict(fit, detached=True, source_layers=[last], checkpoint=folder / "fit.pt")\n'
        "ll.fit_jacobian_lens(model, prompts[:2], **resume)\n"
        "resumed = ll.fit_jacobian_lens(model, prompts, **resume)\n"
        'print(resumed.n_prompts, f"{(resumed.jacobians[last] - detached.jacobians[last]).abs().max():.1e}")',
        "### Several processes\nUnder `torch.distributed` (gloo on CPUs, NCCL on GPUs, initialized by the caller, e.g. "
        "under `torchrun`), each rank fits every `world_size`-th prompt and the sums are "
        "all-reduced in float64: every rank returns the lens of all prompts, equal to a "
        "single-process fit. With `checkpoint=`, each rank writes its own file "
        "(`fit.rank0-of-4.pt`, ...).\n\n"
        "```python\n"
        "# torchrun --nproc-per-node 4 fit.py\n"
        'torch.distributed.init_process_group("gloo")\n'
        'lens = ll.fit_jacobian_lens(model, corpus_prompts, detached=True, checkpoint="fit.pt")\n'
        'if torch.distributed.get_rank() == 0:\n    lens.save("smollm2_detached.pt")\n'
        "```",
    ],
}


def main() -> None:
    here = Path(__file__).parent
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook(
            cells=[new_markdown_cell(c) if c.startswith("#") else new_code_cell(c) for c in cells]
        )
        nb.metadata["kernelspec"] = {
            "name": "python3",
            "display_name": "Python 3",
            "language": "python",
        }
        nbformat.write(nb, here / name)


if __name__ == "__main__":
    main()
