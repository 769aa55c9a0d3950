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
        "## Predicted by the frozen map (one backward)\nExact for patching through the corrupted run's "
        "frozen map; compared here with real patching.",
        'pred = predicted_patching(model, pairs, "resid_pre")\n'
        "corr = torch.corrcoef(torch.stack([pred.values.flatten(), real.values.flatten()]))[0, 1]\n"
        'print(f"correlation with real patching: {corr:.3f}")\nrender.patching_figure(pred)',
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
