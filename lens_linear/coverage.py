"""Which architectures lens_linear linearizes exactly, measured on the installed TransformerLens.

``python -m lens_linear.coverage`` enumerates every architecture adapter the installed
TransformerLens bridge registers, keeps the decoder-only language models that
``transformers`` builds from a config, and for each builds a tiny random model (2 layers,
hidden 64, 4 experts where it has them; biases and norm weights perturbed) and records:

* whether it boots (else TransformerLens' error);
* in float32 and float64: whether ``run_with_linear_cache`` verifies it, the reconstruction
  error, and the Jacobian's error against :func:`lens_linear.reference.hf_frozen` (the
  Hugging Face model itself run with its coefficients detached by kind; no lens_linear code),
  or the reason it is refused;
* whether the model came back untouched (parameters, hooks) after every call;
* which analyses apply (attention circuits need softmax attention in every block).

It writes ``docs/architectures.md`` and ``docs/architectures.json``; ``--check`` fails (exit
1) when a family the committed JSON lists as exact is not any more, or when any family's
Jacobian disagrees with the reference while the library accepted it.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from lens_linear._compat import (
    module_hook_count,
    set_attn_implementation,
    set_experts_implementation,
)
from lens_linear._validation import LinearizationError
from lens_linear.tiny import char_tokenizer, perturb_

log = logging.getLogger(__name__)

PROMPT = "Hello world"
SIZE = dict(
    d_model=64,
    d_mlp=128,
    n_layers=2,
    n_heads=4,
    n_kv=2,
    d_head=16,
    vocab=128,
    n_ctx=64,
    n_experts=4,
    top_k=2,
    d_expert=32,
)

# (field names, value): every field of the config class that exists among the names gets the value
GENERIC: list[tuple[tuple[str, ...], Any]] = [
    (("hidden_size", "n_embd", "d_model", "dim", "hidden_dim"), SIZE["d_model"]),
    (
        (
            "intermediate_size",
            "ffn_dim",
            "n_inner",
            "d_ff",
            "ffn_hidden_size",
            "intermediate_size_mlp",
        ),
        SIZE["d_mlp"],
    ),
    (("num_hidden_layers", "n_layer", "num_layers", "n_layers"), SIZE["n_layers"]),
    (("num_attention_heads", "n_head", "num_heads", "attention_heads", "n_heads"), SIZE["n_heads"]),
    (
        (
            "num_key_value_heads",
            "num_kv_heads",
            "n_kv_heads",
            "num_query_groups",
            "multi_query_group_num",
        ),
        SIZE["n_kv"],
    ),
    (("head_dim", "kv_channels", "attention_head_dim"), SIZE["d_head"]),
    (("vocab_size",), SIZE["vocab"]),
    (
        (
            "max_position_embeddings",
            "n_positions",
            "max_seq_len",
            "context_length",
            "seq_length",
            "max_sequence_length",
        ),
        SIZE["n_ctx"],
    ),
    (
        ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"),
        SIZE["n_experts"],
    ),
    (("num_experts_per_tok", "moe_k", "moe_top_k"), SIZE["top_k"]),
    (("moe_intermediate_size", "expert_intermediate_size"), SIZE["d_expert"]),
    (("shared_expert_intermediate_size", "moe_shared_expert_intermediate_size"), SIZE["d_expert"]),
    (("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"), 1),
    (("rotary_dim",), 8),
    (("bos_token_id",), 1),
    (("eos_token_id",), 2),
    (("pad_token_id",), 3),
    (("kv_lora_rank",), 16),
    (("q_lora_rank",), 32),
    (("qk_rope_head_dim",), 8),
    (("qk_nope_head_dim",), 8),
    (("v_head_dim",), 16),
    (("first_k_dense_replace", "num_dense_layers"), 1),  # block 0 dense, block 1 MoE
    (("n_group", "topk_group"), 1),
    (("index_n_heads",), SIZE["n_heads"]),
    (("index_head_dim",), SIZE["d_head"]),
    (("index_topk",), 16),
    # state-space / recurrent sizes
    (("state_size", "ssm_state_size", "mamba_d_state"), 8),
    (("mamba_n_heads", "mamba_num_heads", "n_mamba_heads"), 8),
    (("mamba_d_head", "mamba_head_dim", "mamba_headdim"), 16),
    (("mamba_n_groups", "n_groups", "mamba_ngroups"), 1),
    (("chunk_size", "mamba_chunk_size"), 16),
    (("time_step_rank",), 8),
    (("lru_width",), SIZE["d_model"]),
    (("linear_num_key_heads", "linear_num_value_heads"), 4),
    (("linear_key_head_dim", "linear_value_head_dim"), 16),
    (("adapter_rank",), 8),
    (("mamba_d_ssm",), 2 * SIZE["d_model"]),
    (("use_mamba_kernels", "use_mem_eff_path"), False),
]

DROP = object()  # an override value that removes a generic field

# where the generic table is not enough (checked one by one): arch -> extra kwargs
OVERRIDES: dict[str, dict[str, Any]] = {
    "GPTNeoForCausalLM": dict(attention_types=[[["global", "local"], 1]], window_size=16),
    "OPTForCausalLM": dict(word_embed_proj_dim=64),
    "Mamba2ForCausalLM": dict(
        num_heads=8, head_dim=16, expand=2
    ),  # num_heads·head_dim = expand·hidden
    "FalconForCausalLM": dict(new_decoder_architecture=False, multi_query=True),
    "RecurrentGemmaForCausalLM": dict(block_types=["recurrent", "attention"]),
    "Zamba2ForCausalLM": dict(
        layers_block_type=["linear_attention", "hybrid"],
        n_mamba_heads=8,
        num_mem_blocks=1,
        hybrid_layer_ids=DROP,
        mamba_headdim=DROP,
        head_dim=DROP,
        attention_head_dim=DROP,
        kv_channels=DROP,
        num_query_groups=DROP,
    ),
    "RwkvForCausalLM": dict(attention_hidden_size=SIZE["d_model"]),
    "JambaForCausalLM": dict(
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        mamba_d_state=8,
        mamba_dt_rank=8,
    ),
    "Llama4ForCausalLM": dict(
        interleave_moe_layer_step=1,
        no_rope_layers=[1, 0],
        moe_layers=[0, 1],
        attention_chunk_size=16,
    ),
    "Lfm2ForCausalLM": dict(layer_types=["conv", "full_attention"], full_attn_idxs=[1]),
    "GptOssForCausalLM": dict(layer_types=["sliding_attention", "full_attention"]),
    "BambaForCausalLM": dict(attn_layer_indices=[1]),
    "GraniteMoeHybridForCausalLM": dict(
        layer_types=["linear_attention", "full_attention"], position_embedding_type="rope"
    ),
    "Lfm2MoeForCausalLM": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
}

# adapters registered for HF names that need remote code or are not decoder-only LMs
# why a family is still refused: in each an exact linearization exists (every operation is a
# norm, softmax, gated unit or linear recurrence), but no rule freezes it yet
NOT_YET = {
    "HrmTextForCausalLM": (
        "two block stacks (`L_blocks`, `H_blocks`) iterated in cycles: the bridge exposes no "
        "single `blocks`, so the map's input, block outputs and sites (all defined per block "
        "of one stack) are undefined; refused at setup. An exact map exists (every operation "
        "is a norm, softmax or gated MLP); it needs sites and block outputs per stack and "
        "cycle."
    ),
    "CodeGenForCausalLM": (
        "TransformerLens' bridge does not boot it (`CodeGenAttention` has no `embed_positions`)."
    ),
}

EXCLUDE_REASONS = {
    "encoder": "bidirectional encoder (BERT/RoBERTa incl. BertLMHeadModel, ViT/DeiT, audio encoders)",
    "encoder_decoder": "encoder-decoder seq2seq (T5, BART, Marian, ...)",
    "multimodal": "multimodal ForConditionalGeneration (vision/audio tower + text decoder)",
    "headless": "base model without an LM head (BloomModel)",
    "remote_code": "no transformers class: needs trust_remote_code (hub code) or a third-party package",
    "tl_native": "TransformerLens-native or legacy TL architecture, not a transformers model",
    "diffusion": "diffusion LM (bidirectional denoiser), not autoregressive; also remote code",
    "alias": "another registered name for an adapter already probed under its transformers name",
}
ENCODERS = {
    "BertForMaskedLM",
    "RobertaForMaskedLM",
    "HubertForCTC",
    "HubertModel",
    "Wav2Vec2ForCTC",
    "Wav2Vec2ForPreTraining",
    "Wav2Vec2Model",
    "ViTModel",
    "ViTForImageClassification",
    "DeiTModel",
    "DeiTForImageClassification",
    "ASTForAudioClassification",
}
ENCODER_DECODERS = {
    "BartForConditionalGeneration",
    "BlenderbotForConditionalGeneration",
    "LEDForConditionalGeneration",
    "LongT5ForConditionalGeneration",
    "M2M100ForConditionalGeneration",
    "MBartForConditionalGeneration",
    "MT5ForConditionalGeneration",
    "MarianMTModel",
    "PegasusForConditionalGeneration",
    "SwitchTransformersForConditionalGeneration",
    "T5ForConditionalGeneration",
    "T5GemmaForConditionalGeneration",
    "T5Gemma2ForConditionalGeneration",
    "T5WithLMHeadModel",
}
TL_NATIVE = {
    "TransformerLensNative",
    "TransformerLensPretrain",
    "NanoGPTForCausalLM",
    "MinGPTForCausalLM",
    "NeelSoluOldForCausalLM",
    "GPT2LMHeadCustomModel",
}
DIFFUSION = {"LLaDAModelLM", "LLaDA2MoeModelLM", "DreamModel", "GiddForDiffusionLM", "BD3LM"}


# ---------------------------------------------------------------------------- enumeration
def causal_classes() -> dict[str, str]:
    """HF class name -> model_type, for every causal-LM class transformers maps."""
    from transformers.models.auto import modeling_auto as ma

    out: dict[str, str] = {}
    for model_type, names in ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        for name in names if isinstance(names, (list, tuple)) else [names]:
            out.setdefault(name, model_type)
    return out


def hf_class_name(arch: str, causal: dict[str, str]) -> str | None:
    """The transformers class behind a registered name (exact, else case-insensitive)."""
    import transformers

    if hasattr(transformers, arch):
        return arch
    lower = {name.lower(): name for name in causal}
    return lower.get(arch.lower())


def enumerate_adapters() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(kept, excluded): one row per registered HF architecture name."""
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    causal = causal_classes()
    kept, excluded, seen = [], [], {}
    # names transformers knows as causal LMs first, so an alias maps onto an already-kept row
    order = sorted(
        SUPPORTED_ARCHITECTURES,
        key=lambda a: (hf_class_name(a, causal) not in causal, hf_class_name(a, causal) != a, a),
    )
    for arch in order:
        adapter = SUPPORTED_ARCHITECTURES[arch].__name__
        hf_name = hf_class_name(arch, causal)
        row = dict(arch=arch, adapter=adapter, hf_class=hf_name)
        if arch in TL_NATIVE:
            reason = "tl_native"
        elif arch in DIFFUSION:
            reason = "diffusion"
        elif adapter in seen:
            reason = "alias"
            row["alias_of"] = seen[adapter]
        elif arch == "BertLMHeadModel" or arch in ENCODERS:
            reason = "encoder"
        elif arch in ENCODER_DECODERS:
            reason = "encoder_decoder"
        elif hf_name is None:
            reason = "remote_code"
        elif "ConditionalGeneration" in hf_name:
            reason = "multimodal"
        elif hf_name not in causal:
            reason = "headless"
        else:
            reason = None
            seen[adapter] = arch
        if reason:
            excluded.append(dict(row, reason=reason))
        else:
            kept.append(row)
    return sorted(kept, key=lambda r: r["arch"]), sorted(
        excluded, key=lambda r: (r["reason"], r["arch"])
    )


# ---------------------------------------------------------------------------- tiny configs
def _shrink_list(value: list, n: int) -> list:
    """A per-layer list cut to ``n`` layers, keeping distinct kinds where there are any
    (a hybrid's first attention layer, say): the first entry, then the first different one."""
    if all(isinstance(v, str) for v in value):
        picked = [value[0]]
        for v in value[1:]:
            if len(picked) < n and v not in picked:
                picked.append(v)
        return (picked + value[1:])[:n] if len(picked) < n else picked
    if (
        all(isinstance(v, int) for v in value)
        and sorted(value) == list(value)
        and len(set(value)) == len(value)
    ):
        return [v for v in value if v < n] or [n - 1]  # layer indices
    return list(value[:n])


def tiny_config(arch: str) -> Any:
    """A small config (2 layers, hidden 64, 4 heads, 2 KV heads, vocab 128, 4 experts) for the
    transformers class ``arch``: generic field names first, then :data:`OVERRIDES`."""
    import transformers

    causal = causal_classes()
    cls = getattr(transformers, hf_class_name(arch, causal) or arch)
    config_cls = cls.config_class
    default = config_cls()
    fields = default.to_dict()
    aliases = set(getattr(default, "attribute_map", {}))
    fields.update({k: getattr(default, k) for k in aliases})
    n_layers_default = next(
        (
            fields[k]
            for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
            if isinstance(fields.get(k), int)
        ),
        None,
    )
    kwargs: dict[str, Any] = {}
    for names, value in GENERIC:
        for name in names:
            if name in fields and not (name == "q_lora_rank" and fields[name] is None):
                kwargs[name] = value
    if fields.get("sliding_window") is not None:
        kwargs["sliding_window"] = 16
    read_only = {n for n in dir(config_cls) if isinstance(getattr(config_cls, n, None), property)}
    read_only |= {
        k for k, target in getattr(default, "attribute_map", {}).items() if target in read_only
    }
    for name, value in fields.items():  # per-layer lists (layer_types, mlp_only_layers, ...)
        if (
            name not in read_only
            and name not in aliases
            and isinstance(value, list)
            and value
            and n_layers_default
            and name not in kwargs
            and (
                len(value) == n_layers_default
                or name.endswith(
                    ("layer_types", "_idxs", "layers_block_type", "block_types", "layer_ids")
                )
            )
        ):
            kwargs[name] = _shrink_list(value, SIZE["n_layers"])
    if (
        "qk_rope_head_dim" in kwargs and "head_dim" in kwargs
    ):  # multi-head latent attention: rotary dim
        kwargs["head_dim"] = kwargs["qk_rope_head_dim"]
    if (
        "kv_lora_rank" in kwargs and "num_key_value_heads" in kwargs
    ):  # MLA expands the latent to every head
        kwargs["num_key_value_heads"] = SIZE["n_heads"]
    kwargs.update(OVERRIDES.get(arch, {}))
    kwargs = {k: v for k, v in kwargs.items() if v is not DROP}
    kwargs = {k: v for k, v in kwargs.items() if k not in read_only}
    return config_cls(**kwargs)


def tiny_hf(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """A tiny random Hugging Face model of ``arch`` with perturbed biases and norm weights."""
    import transformers

    cls = getattr(transformers, hf_class_name(arch, causal_classes()) or arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = tiny_config(arch)
        set_attn_implementation(config, "eager")  # an explicit softmax (some cannot switch later)
        set_experts_implementation(config, "eager")  # grouped products have no float64 kernel
        hf = cls(config)
    config.architectures = [arch]  # the bridge picks its adapter from this
    return perturb_(hf, seed=seed).to(dtype).eval()


# ---------------------------------------------------------------------------- measuring
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
FLOAT32_ROUNDING = (
    1e-6  # float64 disagreement explained by float32 arithmetic inside the model (f32 exact)
)
MIXERS = (
    "mixer",
    "conv",
    "linear_attn",
    "time_mix",
    "mamba",
)  # hook names of recurrent / state-space mixers


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _snapshot(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list[int], list[int]]:
    """Parameters and buffers (copies), hooks per hook point, PyTorch hooks per module."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    points = [len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in model.hook_dict.values()]
    modules = [module_hook_count(m) for m in model.modules()]
    return state, points, modules


def _untouched(model: torch.nn.Module, before: tuple) -> bool:
    state, points, modules = _snapshot(model)
    return (
        state.keys() == before[0].keys()
        and all(torch.equal(state[k], before[0][k]) for k in state)
        and points == before[1]
        and modules == before[2]
    )


def _family(model: Any) -> str:
    names = list(model.hook_dict)
    if any(n.endswith("mlp.hook_router_scores") for n in names):
        kind = "mixture of experts"
    else:
        kind = "dense"
    attention = sum(
        any(n.startswith(f"blocks.{i}.") and n.endswith("hook_pattern") for n in names)
        for i in range(model.cfg.n_layers)
    )
    if attention < model.cfg.n_layers or any(
        f".{m}." in n or f".{m}_" in n for n in names for m in MIXERS
    ):
        kind = "hybrid/recurrent" + (" + experts" if kind == "mixture of experts" else "")
    return kind


def _one_dtype(arch: str, dtype: torch.dtype) -> dict[str, Any]:
    """Linearize the tiny model of ``arch`` in ``dtype`` and compare with the reference."""
    import lens_linear as ll
    from lens_linear.models import wrap_bridge
    from lens_linear.reference import full_precision, hf_frozen

    out: dict[str, Any] = {}
    try:
        model = wrap_bridge(
            tiny_hf(arch, dtype=dtype), char_tokenizer(), f"tiny-{arch}", dtype
        ).eval()
        reference_model = tiny_hf(
            arch, dtype=dtype
        )  # an independent copy: the bridge wraps its own
    except Exception as exc:  # noqa: BLE001 - the table records every failure
        return dict(status="no model", reason=_first_line(exc))
    try:  # transformers installs its output-capturing hooks on the first forward: warm up first
        with torch.no_grad():
            tokens = model.to_tokens(PROMPT)
            model.run_with_cache(tokens)
            out["forward_gap"] = _relative(
                model(tokens), reference_model(tokens).logits
            )  # bridge vs HF
    except Exception as exc:  # noqa: BLE001
        return dict(
            status="no model", reason=_first_line(exc), family=_family(model), untouched=True
        )
    before = _snapshot(model)
    try:
        with (
            full_precision()
        ):  # both sides: in the input's precision (HF casts float64 down to float32 in places)
            lcache = ll.run_with_linear_cache(model, PROMPT, progress=False)
            out["reconstruction"] = lcache.reconstruction_error()
            ours = lcache.jacobian()
            try:
                jac = torch.autograd.functional.jacobian(
                    lambda x: hf_frozen(reference_model, x, tokens=tokens[0])[-1], lcache.x
                )
            except Exception as exc:  # noqa: BLE001 - the reference, not the library, failed
                out.update(
                    status="no reference",
                    reason=_first_line(exc),
                    untouched=_untouched(model, before),
                    family=_family(model),
                )
                return out
        out["reference"] = _relative(jac.transpose(0, 1), ours)
        with (
            full_precision()
        ):  # the long-prompt path: patterns kept as queries and keys where that verifies
            kept = ll.run_with_linear_cache(model, PROMPT, progress=False, store_patterns=False)
            out["qk_layers"] = len(kept.point.frozen_attention)
            out["attn_layers"] = sum(site.kind == "attn" for site in kept.point.sites)
            out["qk_reference"] = _relative(jac.transpose(0, 1), kept.jacobian())
        out["reference"] = max(out["reference"], out["qk_reference"])
        if out["reconstruction"] > TOLERANCE[dtype]:
            out["status"] = (
                "inexact"  # verified by projections, yet the full check fails: never expected
            )
        elif out["reference"] <= TOLERANCE[dtype]:
            out["status"] = "exact"
        elif dtype == torch.float64 and out["reference"] <= FLOAT32_ROUNDING:
            out["status"] = (
                "reference rounding"  # the HF model computes part of it in float32 (see README)
            )
        else:
            out["status"] = "disagrees"
    except LinearizationError as exc:
        out.update(status="refused", reason=_first_line(exc))
    except Exception as exc:  # noqa: BLE001
        out.update(status="error", reason=_first_line(exc))
    out["untouched"] = _untouched(model, before)
    out["family"] = _family(model)
    return out


def _first_line(exc: BaseException, n: int = 400) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {(text[0] if text else '')[:n]}"


def measure(arch: str) -> dict[str, Any]:
    """One row of the table: float32 and float64 results and the overall status."""
    t0 = time.time()
    row: dict[str, Any] = dict(arch=arch)
    for dtype in (torch.float32, torch.float64):
        row[str(dtype).removeprefix("torch.")] = _one_dtype(arch, dtype)
    f32, f64 = row["float32"], row["float64"]
    row["family"] = f32.get("family", f64.get("family", "?"))
    if f32["status"] == "exact" and f64["status"] in ("exact", "no model", "error"):
        row["status"] = "exact"  # float64 where the Hugging Face model runs in it
    elif f32["status"] == "exact" and f64["status"] == "reference rounding":
        row["status"] = "exact (float32)"
    elif "disagrees" in (f32["status"], f64["status"]) or "inexact" in (
        f32["status"],
        f64["status"],
    ):
        row["status"] = "DISAGREES"
    elif f32["status"] == "no reference":
        row["status"] = (
            "no reference"  # verified by the library, but the reference cannot run this family
        )
    elif f32["status"] == "no model":
        row["status"] = "no boot"
    else:
        row["status"] = "refused"
    row["untouched"] = f32.get("untouched", True) and f64.get("untouched", True)
    row["seconds"] = round(time.time() - t0, 1)
    return row


# ---------------------------------------------------------------------------- reporting
def _cell(result: dict[str, Any]) -> str:
    if "reference" in result and result["status"] != "refused":
        return f"{result['reconstruction']:.0e} / {result['reference']:.0e}"
    return result["status"]


def _analyses(row: dict[str, Any]) -> str:
    if not row["status"].startswith("exact"):
        return ""
    if row["family"].startswith("hybrid"):
        return "all but attention circuits (blocks without softmax attention)"
    return "all"


def markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    counts = collections.Counter(r["status"] for r in rows)
    exact = [r for r in rows if r["status"] == "exact"]
    kinds = collections.Counter(r["family"] for r in exact)
    attn = [r for r in exact if r["float32"].get("attn_layers")]
    v = result["versions"]
    lines = [
        "# Architectures",
        "",
        f"Generated by `python -m lens_linear.coverage` with TransformerLens {v['transformer_lens']}, "
        f"transformers {v['transformers']}, torch {v['torch']} (do not edit by hand).",
        "",
        f"Of {result['n_registered']} architecture names TransformerLens' bridge registers, {len(rows)} are "
        f"decoder-only language models that `transformers` builds from a config (the others: "
        + ", ".join(
            f"{k.replace('_', '-')} {n}"
            for k, n in collections.Counter(e["reason"] for e in result["excluded"]).most_common()
        )
        + ").",
        "",
        f"**{counts['exact']} exact** ({', '.join(f'{n} {k}' for k, n in kinds.most_common())}), "
        + (
            f"{counts['exact (float32)']} exact in float32 whose float64 agreement with the reference stops at "
            f"float32 rounding (≤ 1e-6; see the bridge gap column), "
            if counts["exact (float32)"]
            else ""
        )
        + f"{counts['refused']} refused with a reason, "
        f"{counts['no reference']} verified but without a reference, "
        f"{counts['no boot']} do not boot in TransformerLens, {counts['DISAGREES']} disagree with the reference.",
        "",
        "Long-prompt path (`store_patterns=False`) among the exact families with softmax attention: "
        f"{sum(r['float32']['qk_layers'] == r['float32']['attn_layers'] for r in attn)} keep every pattern as "
        f"queries and keys, {sum(0 < r['float32']['qk_layers'] < r['float32']['attn_layers'] for r in attn)} some, "
        f"{sum(r['float32']['qk_layers'] == 0 for r in attn)} none (their recipe does not verify: the patterns are "
        "stored); all agree with the reference.",
        "",
        "Each row is a tiny random model (2 layers, hidden 64, 4 heads, 4 experts top-2; biases and norm "
        "weights perturbed) on an 11-token prompt. *Exact* means `run_with_linear_cache` verified it and the "
        "detached Jacobian agrees with an independent reference (`lens_linear.reference.hf_frozen`: the "
        "Hugging Face model itself, its norm scales, softmax, activations and routers detached by kind, "
        "state-space mixers recomputed by a sequential scan, no lens_linear code) to 1e-5 in float32 and "
        "1e-10 in float64. Both sides run in the precision of their inputs (`lens_linear.reference."
        "full_precision`: Hugging Face's casts of float64 down to float32, in norms, softmaxes, rotary "
        "angles and scans, are skipped), so float64 agreement is not cut off at float32 rounding. "
        "Cells: reconstruction error / Jacobian "
        "error against the reference. *Untouched*: parameters, hooks and module hooks identical after the calls. "
        "*Exact (float32)*: exact in float32; in float64 the reference agrees to ≤ 1e-6 only: a frozen "
        "value differs at float32 rounding between TransformerLens' forward and Hugging Face's (the *bridge "
        "gap* column is their relative float64 logit difference; where it is 0 the difference sits in a "
        "coefficient, not the output).",
        "",
        "*q/k layers*: with `store_patterns=False` (the long-prompt path), the layers whose pattern is kept as "
        "its queries and keys (the others' recipe did not verify, so they keep the pattern); the Jacobian error "
        "cells are the larger of both paths' errors against the reference.",
        "",
        "| architecture | kind | status | float32 | float64 | bridge gap | q/k layers | untouched | analyses | reason |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        reason = r["float32"].get("reason") or r["float64"].get("reason") or ""
        if r["status"] == "exact":
            reason = r["float64"].get("reason", "")
            reason = f"float64: {reason}" if reason else ""
        reason = reason.replace("|", "\\|")
        gap = r["float64"].get("forward_gap")
        gap = "" if gap is None else f"{gap:.0e}"
        qk = r["float32"].get("qk_layers")
        qk = "" if qk is None else f"{qk}"
        lines.append(
            f"| {r['arch']} | {r['family']} | {r['status']} | {_cell(r['float32'])} | {_cell(r['float64'])} | {gap} | "
            f"{qk} | {'yes' if r['untouched'] else '**no**'} | {_analyses(r)} | {reason} |"
        )
    open_rows = [r for r in result["rows"] if r["status"] in ("refused", "no model", "error")]
    if open_rows:
        lines += ["", "## Why the others are refused", ""]
        lines += [
            f"* **{r['arch']}**: {NOT_YET.get(r['arch'], 'no freezing rule covers it yet.')}"
            for r in open_rows
        ]
    lines += ["", "Not probed (not decoder-only language models with a `transformers` class):", ""]
    grouped: dict[str, list[str]] = collections.defaultdict(list)
    for e in result["excluded"]:
        grouped[e["reason"]].append(e["arch"])
    for reason, names in sorted(grouped.items()):
        lines.append(f"* {EXCLUDE_REASONS.get(reason, reason)}: {', '.join(sorted(names))}")
    return "\n".join(lines) + "\n"


def regressions(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Families exact in ``old`` and not in ``new``, and any family that disagrees."""
    status = {r["arch"]: r["status"] for r in new["rows"]}
    lost = [
        f"{a}: was exact, now {status.get(a, 'missing')}"
        for a in (r["arch"] for r in old["rows"] if r["status"] == "exact")
        if status.get(a) != "exact"
    ]
    return (
        lost
        + [f"{a}: DISAGREES with the reference" for a, s in status.items() if s == "DISAGREES"]
        + [f"{r['arch']}: model changed by the calls" for r in new["rows"] if not r["untouched"]]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated architecture names")
    parser.add_argument("--out", default="docs/architectures.md")
    parser.add_argument(
        "--check",
        action="store_true",
        help="fail when a family exact in the committed JSON regresses (the JSON is then not rewritten)",
    )
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    from importlib.metadata import version

    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in (
        "transformers",
        "transformer_lens",
        "accelerate",
    ):  # config warnings of tiny models
        logging.getLogger(noisy).setLevel(logging.ERROR)
    kept, excluded = enumerate_adapters()
    only = [a for a in args.only.split(",") if a]
    rows = []
    for row in kept:
        if only and row["arch"] not in only:
            continue
        rows.append(measure(row["arch"]))
        r = rows[-1]
        log.info(
            f"{r['arch']:34} {r['status']:9} f32 {_cell(r['float32']):17} f64 {_cell(r['float64']):17} "
            f"{r['seconds']:5.1f} s  {r['float32'].get('reason', '')[:400]}"
        )
    result = dict(
        n_registered=len(SUPPORTED_ARCHITECTURES),
        excluded=excluded,
        rows=rows,
        versions=dict(
            transformer_lens=version("transformer-lens"),
            transformers=version("transformers"),
            torch=torch.__version__,
        ),
    )
    md, js = Path(args.out), Path(args.out).with_suffix(".json")
    problems = []
    if args.check and js.exists():
        problems = regressions(json.loads(js.read_text()), result)
    else:
        problems = regressions(result, result)
    if not only:
        md.write_text(markdown(result))
        if not problems:
            js.write_text(json.dumps(result, indent=1, default=str) + "\n")
    counts = collections.Counter(r["status"] for r in rows)
    log.info(", ".join(f"{n} {k}" for k, n in counts.most_common()))
    for p in problems:
        log.error(f"REGRESSION: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
