"""Build a model from a preset name or a Hugging Face style directory, with real or random weights."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tetriinfer.model.arch import ModelArch, token_id_list
from tetriinfer.model.hub import is_hub_id, resolve_hub_model
from tetriinfer.model.llama import LlamaForCausalLM
from tetriinfer.model.opt import OPTForCausalLM
from tetriinfer.model.parallel import SINGLE, TensorParallel, shard
from tetriinfer.model.quant import fp8_checkpoint, prepare_fp8_, quantize_model_
from tetriinfer.model.tokenizer import Tokenizer, load_tokenizer
from tetriinfer.presets import PRESETS, get_preset

log = logging.getLogger(__name__)
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Checkpoint names of the FP8 KV cache's per-tensor scales (one scalar per layer), by suffix of the
# attention module's name -> the attributes they set: compressed-tensors / llm-compressor
# (`self_attn.k_scale`, `self_attn.v_scale`), older llm-compressor and AutoFP8 (`self_attn.kv_scale`,
# both), and the projections' output scales some exporters write.
KV_SCALE_NAMES = {
    "k_scale": ("k_scale",),
    "v_scale": ("v_scale",),
    "kv_scale": ("k_scale", "v_scale"),
    "k_proj.output_scale": ("k_scale",),
    "v_proj.output_scale": ("v_scale",),
}


@dataclass
class LoadedModel:
    model: nn.Module
    arch: ModelArch
    tokenizer: Tokenizer | None
    name: str


def resolve_model(name_or_path: str) -> tuple[dict, Path | None]:
    """(HF config dict, model directory or None for a preset)."""
    if name_or_path in PRESETS:
        return get_preset(name_or_path), None
    path = Path(name_or_path).expanduser()
    if not path.exists() and is_hub_id(name_or_path):  # ORG/NAME: the HF cache, else a download
        path = resolve_hub_model(name_or_path)
    if not path.exists():
        raise FileNotFoundError(
            f"model {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor an existing directory"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {path} has no config.json")
    return with_generation_eos(json.loads((path / "config.json").read_text()), path), path


# generation_config.json's sampling settings that become a request's defaults (vLLM's
# `--generation-config auto`); max_new_tokens caps a chat reply that names no max_tokens.
GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")


def generation_defaults(source: str | Path | None) -> dict:
    """The sampling defaults the model's creator recommends: those GENERATION_DEFAULT_KEYS that a
    folder's `generation_config.json` sets ({} without the file, or for a preset)."""
    config = _generation_config(source)
    return {key: config[key] for key in GENERATION_DEFAULT_KEYS if config.get(key) is not None}


def _generation_config(folder: str | Path | None) -> dict:
    """A model folder's generation_config.json ({} without one)."""
    path = None if folder is None else Path(folder) / "generation_config.json"
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def with_generation_eos(hf_config: dict, model_dir: Path) -> dict:
    """The config with `generation_config.json`'s end-of-sequence ids added after its own: chat
    models end a turn with a token config.json may not name (Llama 3 Instruct's `<|eot_id|>`), and
    transformers' `generate` and vLLM stop on those too."""
    extra = _generation_config(model_dir).get("eos_token_id")
    eos = token_id_list(hf_config.get("eos_token_id"))
    merged = eos + [t for t in token_id_list(extra) if t not in eos]
    return hf_config if merged == eos else {**hf_config, "eos_token_id": merged}


def load_arch_and_tokenizer(name_or_path: str) -> tuple[ModelArch, Tokenizer | None]:
    """What a front end needs of a model (shapes, context, tokenizer) without building its weights."""
    hf_config, model_dir = resolve_model(name_or_path)
    arch = ModelArch.from_hf_config(hf_config)
    return arch, _tokenizer(arch, model_dir)


def _tokenizer(arch: ModelArch, model_dir: Path | None) -> Tokenizer | None:
    return load_tokenizer(model_dir, arch.bos_token_id, arch.eos_token_ids[0] if arch.eos_token_ids else None)


def model_class(arch: ModelArch) -> type[nn.Module]:
    return OPTForCausalLM if arch.is_opt else LlamaForCausalLM


def load_model(name_or_path: str, dtype: str, device: str, load_format: str, seed: int = 0,
               tp: TensorParallel = SINGLE, quantization: str | None = None) -> LoadedModel:
    """The model (this rank's shard under tensor parallelism `tp`) with its weights; with
    `quantization="fp8"` or an FP8 checkpoint, its projections in FP8 (model.quant); with the FP8
    KV cache scales the checkpoint holds (KV_SCALE_NAMES) on its attention modules."""
    hf_config, model_dir = resolve_model(name_or_path)
    arch = ModelArch.from_hf_config(hf_config)
    fp8_weights_in_checkpoint = model_dir is not None and load_format != "dummy" and fp8_checkpoint(hf_config)
    if load_format == "auto":
        load_format = "dummy" if model_dir is None else "safetensors"
    if load_format == "safetensors" and model_dir is None:
        raise ValueError(f"preset {name_or_path!r} has no weight files; use load_format='dummy'")
    weight_files = sorted(model_dir.glob("*.safetensors")) if model_dir is not None else []
    if load_format == "safetensors" and not weight_files:
        raise FileNotFoundError(f"model directory {model_dir} has no *.safetensors weight files")

    torch_dtype = TORCH_DTYPES[dtype]
    # Build directly on the target device in the target dtype; buffers that must stay float32
    # (the RoPE tables) are created with an explicit dtype, so we never call model.to(dtype).
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device(device):
            model = model_class(arch)(arch, tp)
    finally:
        torch.set_default_dtype(previous_dtype)
    if fp8_weights_in_checkpoint:
        prepare_fp8_(model)
    if load_format == "dummy":
        init_random_weights(model, seed)
    else:
        scaled = load_safetensors(model, weight_files, tp)
        if (hf_config.get("quantization_config") or {}).get("kv_cache_scheme"):
            _warn_missing_kv_scales(model, scaled, name_or_path)
    if quantization == "fp8":
        quantize_model_(model)
    model.eval().requires_grad_(False)
    return LoadedModel(model, arch, _tokenizer(arch, model_dir), name_or_path)


def init_random_weights(model: nn.Module, seed: int) -> None:
    """Small random weights (std 0.02 like HF's init; norms at 1) from a seeded generator on the
    model's device (a CPU generator would make an 8B model take minutes to build). Under tensor
    parallelism each rank draws its own shards; the replicated embeddings come first in every
    rank's order, so they are the same on all ranks."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight") or "layer_norm" in name or "layernorm" in name:
            param.data.fill_(1.0)
        elif name.endswith(".bias"):
            param.data.zero_()
        else:
            param.data.normal_(0.0, 0.02, generator=gen)


def load_safetensors(model: nn.Module, files: list[Path], tp: TensorParallel = SINGLE) -> set[str]:
    """Copy checkpoint tensors into the model, fusing q/k/v and gate/up into their stacked params;
    under tensor parallelism, this rank's slice of each split tensor. Returns the names of the
    attention modules that got a KV cache scale."""
    from safetensors import safe_open

    params = dict(model.named_parameters())
    loaded: set[str] = set()
    scaled: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for ckpt_name in f.keys():
                name = _normalize_name(ckpt_name, model)
                if name is None:
                    continue
                if _load_kv_scale(name, f, ckpt_name, model):
                    scaled.add(name.rpartition(".self_attn.")[0] + ".self_attn")
                    continue
                for piece_name, tensor in _unfused(name, f.get_tensor(ckpt_name), model, tp):
                    _copy_into(params, model, piece_name, tensor, tp, file.name, ckpt_name)
                    loaded.add(piece_name)
    expected = set()
    for name in params:
        expected.update(_checkpoint_names(name, model))
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"checkpoint lacks weights: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    return scaled


def _copy_into(params: dict, model: nn.Module, name: str, tensor: torch.Tensor, tp: TensorParallel, file_name: str,
               ckpt_name: str) -> None:
    """One unfused checkpoint tensor into its parameter (its rows of a fused one; this rank's slice)."""
    target, rows = _locate(name, model)
    if target not in params:
        raise ValueError(f"{file_name}: unexpected weight {ckpt_name!r}")
    param = params[target]
    owner, _, leaf = target.rpartition(".")
    split_dim = getattr(model.get_submodule(owner), "shard_dim", lambda _: None)(leaf)
    dest = param.data if rows is None else param.data.narrow(0, rows[0], rows[1])
    if leaf == "weight_scale":  # FP8: [out, 1] per channel, or one per tensor
        tensor = tensor.float().reshape(-1)
        if tensor.numel() == 1:
            tensor, split_dim = tensor.expand(dest.shape), None
    tensor = shard(tensor, split_dim, tp)
    if dest.shape != tensor.shape:
        raise ValueError(f"{file_name}: {ckpt_name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
    dest.copy_(tensor)


def _unfused(name: str, tensor: torch.Tensor, model: nn.Module, tp: TensorParallel) -> list[tuple[str, torch.Tensor]]:
    """A checkpoint tensor that is already fused as ours is (Phi-3's `qkv_proj`, `gate_up_proj`)
    as its pieces under their unfused names, so each goes through the same per-piece (and per-rank)
    path; any other tensor as it is."""
    for fused in {f for f, _ in model.stacked_params.values()}:
        token = f".{fused}."
        if token not in name:
            continue
        layout = model.get_submodule(name.split(token)[0]).shard_offsets()  # this rank's (offset, rows)
        pieces = sorted((layout[key][0], piece) for piece, (f, key) in model.stacked_params.items() if f == fused)
        sizes = [layout[model.stacked_params[p][1]][1] * tp.size for _, p in pieces]
        if tensor.dim() == 0 or tensor.numel() == 1:  # a per-tensor FP8 scale covers every piece
            return [(name.replace(token, f".{p}."), tensor) for _, p in pieces]
        if tensor.shape[0] != sum(sizes):
            raise ValueError(f"{name}: {tensor.shape[0]} rows, expected {sum(sizes)} (the fused {'+'.join(p for _, p in pieces)})")
        return [(name.replace(token, f".{p}."), part) for (_, p), part in zip(pieces, tensor.split(sizes, dim=0))]
    return [(name, tensor)]


def _warn_missing_kv_scales(model: nn.Module, scaled: set[str], name: str) -> None:
    """A checkpoint that declares a kv_cache_scheme but lacks some layers' scales: those layers
    keep 1.0, which an FP8 cache saturates at +-448 (vLLM warns likewise)."""
    attention = [n for n, m in model.named_modules() if n.endswith(".self_attn") and hasattr(m, "k_scale")]
    lacking = [n for n in attention if n not in scaled]
    if lacking:
        log.warning("%s declares a kv_cache_scheme but %d of %d attention layers have no k/v scale (%s%s); "
                    "they use 1.0, which may cost accuracy with --kv-cache-dtype fp8", name, len(lacking),
                    len(attention), ", ".join(lacking[:3]), " ..." if len(lacking) > 3 else "")


def _load_kv_scale(name: str, f, ckpt_name: str, model: nn.Module) -> bool:
    """Whether `name` is an FP8 KV cache scale (KV_SCALE_NAMES); if so, set it on its attention
    module as a Python float. Per tensor, so every tensor-parallel rank takes the whole value."""
    module_name, dot, rest = name.rpartition(".self_attn.")
    attrs = KV_SCALE_NAMES.get(rest) if dot else None
    if attrs is None:
        return False
    tensor = f.get_tensor(ckpt_name).float().reshape(-1)
    if tensor.numel() != 1 or not 0 < tensor.item() < float("inf"):
        raise ValueError(f"{ckpt_name!r}: a KV cache scale must be one positive finite number (per tensor), "
                         f"got {tensor[:8].tolist()}{' ...' if tensor.numel() > 8 else ''}")
    attention = model.get_submodule(module_name + ".self_attn")
    for attr in attrs:
        setattr(attention, attr, tensor.item())
    return True


MIXTRAL_EXPERT_NAMES = {".w1.": ".gate_proj.", ".w3.": ".up_proj.", ".w2.": ".down_proj."}


def _normalize_name(ckpt_name: str, model: nn.Module) -> str | None:
    """Checkpoint name -> unfused module name, or None for tensors we do not use."""
    if ckpt_name.endswith("rotary_emb.inv_freq"):
        return None
    if isinstance(model, OPTForCausalLM) and ckpt_name.startswith("decoder."):
        ckpt_name = "model." + ckpt_name  # original facebook/opt checkpoints lack the "model." prefix
    if ckpt_name == "lm_head.weight" and (model.arch.tie_word_embeddings or model.lm_head is None):
        return None  # tied, or a tensor-parallel worker (only rank 0 has the LM head)
    if ".block_sparse_moe." in ckpt_name:  # Mixtral: its experts' w1/w3/w2 are gate/up/down
        ckpt_name = ckpt_name.replace(".block_sparse_moe.", ".mlp.")
        for old, new in MIXTRAL_EXPERT_NAMES.items():
            ckpt_name = ckpt_name.replace(old, new)
    return ckpt_name


def _locate(name: str, model: nn.Module) -> tuple[str, tuple[int, int] | None]:
    """Unfused name -> (our parameter name, (row offset, rows) inside a fused parameter or None)."""
    for piece, (fused, slot) in model.stacked_params.items():
        token = f".{piece}."
        if token in name:
            module_name = name.split(token)[0]
            owner = model.get_submodule(module_name)
            return name.replace(token, f".{fused}."), owner.shard_offsets()[slot]
    return name, None


def _checkpoint_names(param_name: str, model: nn.Module) -> list[str]:
    """The checkpoint names that fill one of our parameters."""
    if param_name == "lm_head.weight" and model.arch.tie_word_embeddings:
        return []
    for piece, (fused, _) in model.stacked_params.items():
        token = f".{fused}."
        if token in param_name:
            return [param_name.replace(token, f".{p}.") for p, (f, _) in model.stacked_params.items() if f == fused]
    return [param_name]
