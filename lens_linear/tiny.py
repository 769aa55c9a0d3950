"""Tiny random models of many architectures, for tests, notebooks and quick experiments.

Random initialisation sets biases to 0 and norm weights to 1, which hides bias bugs, so
every bias and norm weight is perturbed. The models share a character-level tokenizer
built locally, so ``to_tokens`` works without the model hub.
"""

from __future__ import annotations

import string
from typing import Any, Callable

import torch

from lens_linear.models import resolve_backend, wrap_bridge

VOCAB = 128
_SIZES = dict(d_model=64, n_layers=2, n_heads=4, d_head=16, d_mlp=128, n_ctx=64)


def char_tokenizer() -> Any:
    """A character-level fast tokenizer (vocab < 128) with BOS/EOS/PAD tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<bos>", "<eos>", "<pad>"]
    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        name_or_path="lens-linear-char",
        add_bos_token=True,
    )


def _hf_configs(n_layers: int = 2) -> dict[str, Callable[[], Any]]:
    import transformers as tf

    s = dict(_SIZES, n_layers=n_layers)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=s["d_model"],
        intermediate_size=s["d_mlp"],
        num_hidden_layers=s["n_layers"],
        num_attention_heads=s["n_heads"],
        max_position_embeddings=s["n_ctx"],
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    return {
        "gpt2": lambda: tf.GPT2Config(
            vocab_size=VOCAB,
            n_embd=s["d_model"],
            n_layer=s["n_layers"],
            n_head=s["n_heads"],
            n_positions=s["n_ctx"],
            bos_token_id=1,
            eos_token_id=2,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        ),
        "llama": lambda: tf.LlamaConfig(num_key_value_heads=2, **common),
        "mistral": lambda: tf.MistralConfig(num_key_value_heads=2, head_dim=s["d_head"], **common),
        "qwen3": lambda: tf.Qwen3Config(num_key_value_heads=2, head_dim=s["d_head"], **common),
        "gemma3": lambda: tf.Gemma3TextConfig(
            num_key_value_heads=2, head_dim=s["d_head"], sliding_window=16, **common
        ),
        "phi3": lambda: tf.Phi3Config(num_key_value_heads=2, **common),
        "gpt_neox": lambda: tf.GPTNeoXConfig(rotary_pct=0.5, use_parallel_residual=True, **common),
        "olmo2": lambda: tf.Olmo2Config(num_key_value_heads=2, **common),
    }


def _hooked_configs(n_layers: int = 2) -> dict[str, dict[str, Any]]:
    s = dict(_SIZES, d_vocab=VOCAB, n_layers=n_layers)
    return {
        "gpt2": dict(
            s, act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard"
        ),
        "llama": dict(
            s,
            act_fn="silu",
            normalization_type="RMS",
            positional_embedding_type="rotary",
            gated_mlp=True,
            n_key_value_heads=2,
            final_rms=True,
            rotary_dim=s["d_head"],
        ),
        "gpt_neox": dict(
            s,
            act_fn="gelu",
            normalization_type="LN",
            positional_embedding_type="rotary",
            parallel_attn_mlp=True,
            rotary_dim=s["d_head"] // 2,
        ),
        "solu": dict(
            s, act_fn="solu_ln", normalization_type="LN", positional_embedding_type="standard"
        ),
    }


def tiny_architectures(backend: str = "bridge") -> list[str]:
    """Names accepted by :func:`tiny_model` for a backend."""
    return sorted(_hf_configs() if backend == "bridge" else _hooked_configs())


def perturb_(module: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Add noise to every bias and norm weight (every 1-D or ``b``/``b_*``/``bias`` parameter)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.ndim == 1 or leaf in ("b", "bias") or leaf.startswith("b_"):
                p.add_(
                    scale
                    * torch.randn(p.shape, generator=gen, dtype=torch.float64, device="cpu").to(p)
                )
    return module


def tiny_hf_model(
    arch: str = "gpt2", seed: int = 0, dtype: torch.dtype = torch.float32, n_layers: int = 2
) -> Any:
    """The Hugging Face model behind ``tiny_model(arch, "bridge")`` (same seed, same weights)."""
    from transformers import AutoModelForCausalLM

    table = _hf_configs(n_layers)
    if arch not in table:
        raise ValueError(
            f"unknown tiny architecture {arch!r}; choose from {', '.join(sorted(table))}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = table[arch]()
        hf_model = AutoModelForCausalLM.from_config(config)
    config.architectures = [type(hf_model).__name__]  # the bridge picks its adapter from this
    perturb_(hf_model, seed=seed)
    return hf_model.to(dtype).eval()


def tiny_model(
    arch: str = "gpt2",
    backend: str = "bridge",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    n_layers: int = 2,
) -> Any:
    """A small random model (2 layers by default, d_model 64) with perturbed biases and norm
    weights.

    Args:
        arch: one of :func:`tiny_architectures` for the backend.
        backend: ``"bridge"`` (a Hugging Face model from its config class, wrapped by
            TransformerBridge) or ``"hooked"`` (a HookedTransformer config, TL < 4).
        seed: initialisation seed; the global RNG is left untouched.
        dtype: parameter dtype.
        n_layers: number of blocks (a Jacobian lens needs at least 3 to chain layers).
    """
    backend = resolve_backend(backend)
    table = _hf_configs(n_layers) if backend == "bridge" else _hooked_configs(n_layers)
    if arch not in table:
        raise ValueError(
            f"unknown tiny architecture {arch!r} for backend {backend!r}; "
            f"choose from {', '.join(sorted(table))}"
        )
    tokenizer = char_tokenizer()
    if backend == "bridge":
        hf_model = tiny_hf_model(arch, seed, dtype, n_layers)
        return wrap_bridge(hf_model, tokenizer, f"tiny-{arch}", dtype).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        cfg = HookedTransformerConfig(
            **table[arch], model_name=f"tiny-{arch}", seed=seed, dtype=dtype, device="cpu"
        )
        model = HookedTransformer(cfg, tokenizer=tokenizer)
    perturb_(model, seed=seed)
    return model.to(dtype).eval()
