"""Hugging Face checkpoints <-> the core's parameters: this rank's slice on load, full tensors on export.

Core parameter names are HF names, except the fused projections (``qkv_proj``, ``gate_up_proj``).
Persistent buffers (DeepSeek-V3's ``e_score_correction_bias``) load and export like parameters. Routed
experts (``...mlp.experts.*``, per expert or fused on disk) go through the MoE layer's own hooks
(``load_expert_tensor`` / ``missing_expert_tensors`` / ``export_expert_tensors``), which know how experts
are placed on ranks. Layers at index >= num_hidden_layers (DeepSeek-V3's multi-token-prediction layer)
are not part of the model and are skipped.
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Dict, Iterable, Iterator, Optional, Tuple

import torch

from sp_core.layers.sharding import gather_full, load_full
from sp_core.models.config import ModelError

# HF name piece -> (core name piece, shard name)
_FUSED = {
    ".q_proj.": (".qkv_proj.", "q"),
    ".k_proj.": (".qkv_proj.", "k"),
    ".v_proj.": (".qkv_proj.", "v"),
    ".gate_proj.": (".gate_up_proj.", "gate"),
    ".up_proj.": (".gate_up_proj.", "up"),
}
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERTS = ".mlp.experts."


def hf_to_core(name: str) -> Tuple[str, Optional[str]]:
    for hf_piece, (core_piece, shard) in _FUSED.items():
        if hf_piece in name:
            return name.replace(hf_piece, core_piece), shard
    return name, None


def iter_hf_tensors(model_dir: str) -> Iterator[Tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(model_dir, name) for name in files]
    else:
        files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise ModelError(f"{model_dir}: no *.safetensors files; expected a Hugging Face checkpoint directory")
    for path in files:
        if not os.path.isfile(path):
            raise ModelError(f"{path}: listed in the index but missing")
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _tensors(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Parameters and persistent buffers by name, routed experts excluded (the MoE layer loads those)."""
    return {name: t for name, t in model.state_dict(keep_vars=True).items() if _EXPERTS not in f".{name}"}


def _expert_owners(model: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    """HF prefix ``model.layers.{i}.mlp.experts.`` -> the MoE module that loads those tensors."""
    return {f"{name}.experts.": module for name, module in model.named_modules()
            if hasattr(module, "load_expert_tensor")}


def _beyond_layers(model: torch.nn.Module, hf_name: str) -> bool:
    """A layer the checkpoint has past the model's num_hidden_layers (DeepSeek-V3's MTP layer)."""
    match = _LAYER.match(hf_name)
    cfg = getattr(model, "config", None)
    return bool(match and cfg is not None and int(match.group(1)) >= cfg.num_hidden_layers)


def _core_name(hf_name: str, expected) -> Tuple[str, Optional[str]]:
    name, shard = hf_to_core(hf_name)
    if (name, shard) not in expected and (hf_name, None) in expected:  # an unfused q_proj (DeepSeek-V2-Lite)
        return hf_name, None
    return name, shard


def load_weights(model: torch.nn.Module, weights: Iterable[Tuple[str, torch.Tensor]]) -> None:
    """Take this rank's slice of every checkpoint tensor; one-line error naming missing / unexpected ones."""
    params = _tensors(model)
    experts = _expert_owners(model)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    expected = {(name, shard) for name, p in params.items()
                for shard in ([s.name for s in p.shards] if hasattr(p, "shards") else [None])}
    if tied:
        expected.discard(("lm_head.weight", None))
    seen, unexpected = set(), []
    for hf_name, tensor in weights:
        if _IGNORED.search(hf_name) or (tied and hf_name == "lm_head.weight") or _beyond_layers(model, hf_name):
            continue
        if _EXPERTS in hf_name:
            prefix = hf_name[: hf_name.index(_EXPERTS) + len(_EXPERTS)]
            if prefix not in experts:
                unexpected.append(hf_name)
                continue
            try:
                experts[prefix].load_expert_tensor(hf_name[len(prefix):], tensor)
            except KeyError:
                unexpected.append(hf_name)
            except ValueError as err:
                raise ModelError(f"checkpoint tensor {hf_name}: {err}") from None
            continue
        name, shard = _core_name(hf_name, expected)
        if (name, shard) not in expected:
            unexpected.append(hf_name)
            continue
        param = params[name]
        try:
            load_full(param, tensor.to(param.dtype), shard)
        except ValueError as err:
            raise ModelError(f"checkpoint tensor {hf_name}: {err}") from None
        seen.add((name, shard))
    missing = sorted(core_to_hf(n, s) for n, s in expected - seen)
    missing += sorted(prefix + key for prefix, moe in experts.items() for key in moe.missing_expert_tensors())
    if missing or unexpected:
        parts = []
        if missing:
            parts.append("missing: " + ", ".join(missing))
        if unexpected:
            parts.append("unexpected: " + ", ".join(sorted(unexpected)))
        raise ModelError("checkpoint does not match the model; " + "; ".join(parts))


def core_to_hf(name: str, shard: Optional[str]) -> str:
    for hf_piece, (core_piece, shard_name) in _FUSED.items():
        if shard == shard_name and core_piece in name:
            return name.replace(core_piece, hf_piece)
    return name


def load_hf_checkpoint(model: torch.nn.Module, model_dir: str) -> None:
    load_weights(model, iter_hf_tensors(model_dir))


def export_state_dict(model: torch.nn.Module, grads: bool = False) -> Dict[str, torch.Tensor]:
    """Full HF-named tensors (collective: every TP rank calls it; every rank gets the result).
    ``grads``: the parameters' gradients in the same layout and names instead (buffers left out)."""
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    out = {}
    for name, tensor in _tensors(model).items():
        if tied and name == "lm_head.weight":
            continue
        if grads and not isinstance(tensor, torch.nn.Parameter):
            continue
        values = (tensor.grad if tensor.grad is not None else torch.zeros_like(tensor)) if grads else None
        for shard, full in gather_full(tensor, values).items():
            out[core_to_hf(name, shard)] = full.contiguous().cpu()
    for prefix, moe in _expert_owners(model).items():
        for key, full in moe.export_expert_tensors(grads=grads).items():
            out[prefix + key] = full.contiguous().cpu()
    return out


def save_hf_checkpoint(model: torch.nn.Module, out_dir: str, rank: int = 0) -> None:
    """Write config.json + model.safetensors that transformers and sglang load (rank 0 writes)."""
    from safetensors.torch import save_file

    state = export_state_dict(model)
    if rank != 0:
        return
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(model.config.hf, f, indent=2)
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
