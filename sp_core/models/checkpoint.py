"""Hugging Face checkpoints <-> the core's parameters: this rank's slice on load, full tensors on export.

Core parameter names are HF names, except the fused projections (``qkv_proj``, ``gate_up_proj``).
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from sp_core.errors import NonFiniteError
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


def hf_to_core(name: str) -> Tuple[str, Optional[str]]:
    for hf_piece, (core_piece, shard) in _FUSED.items():
        if hf_piece in name:
            return name.replace(hf_piece, core_piece), shard
    return name, None


def checkpoint_files(model_dir: str) -> List[str]:
    """The checkpoint's safetensors files (from the sharded index when there is one)."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, "rb") as f:
                weight_map = json.loads(f.read())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelError(f"{index}: not a valid index (expected JSON with a \"weight_map\" of tensor name "
                             f"-> file name)") from None
        files = [os.path.join(model_dir, name) for name in files]
    else:
        files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise ModelError(f"{model_dir}: no *.safetensors files; expected a Hugging Face checkpoint directory")
    for path in files:
        if not os.path.isfile(path):
            raise ModelError(f"{path}: listed in the index but missing")
    return files


def _open(path: str):
    from safetensors import safe_open

    try:
        return safe_open(path, framework="pt")
    except Exception as err:  # safetensors' SafetensorError, OSError: a truncated or corrupt file
        raise ModelError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0]}); "
                         f"it may be truncated or corrupt") from None


def iter_hf_tensors(model_dir: str) -> Iterator[Tuple[str, torch.Tensor]]:
    for path in checkpoint_files(model_dir):
        with _open(path) as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def checkpoint_shapes(model_dir: str) -> Dict[str, Tuple[int, ...]]:
    """Tensor name -> shape, read from the safetensors headers only (no tensor data)."""
    shapes = {}
    for path in checkpoint_files(model_dir):
        with _open(path) as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def expected_shapes(model: torch.nn.Module) -> Dict[str, Tuple[int, ...]]:
    """HF tensor name -> full shape that ``model`` loads (build it at tp 1, e.g. on the meta device)."""
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    out = {}
    for name, param in model.named_parameters():
        if tied and name == "lm_head.weight":
            continue
        shards = getattr(param, "shards", None)
        if shards is None:
            out[name] = tuple(param.shape)
            continue
        for shard in shards:
            shape = list(param.shape)
            shape[param.partition_dim] = shard.full
            out[core_to_hf(name, shard.name)] = tuple(shape)
    return out


def check_checkpoint(model: torch.nn.Module, model_dir: str) -> None:
    """One-line error for a checkpoint whose tensors do not match ``model`` (missing, unexpected, wrong
    shape) or whose files are unreadable: the check that runs before any rank or engine starts."""
    expected = expected_shapes(model)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    found = {name: shape for name, shape in checkpoint_shapes(model_dir).items()
             if not _IGNORED.search(name) and not (tied and name == "lm_head.weight")}
    parts = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(n for n in set(found) & set(expected) if found[n] != expected[n])
    if missing:
        parts.append("missing: " + ", ".join(missing))
    if unexpected:
        parts.append("unexpected: " + ", ".join(unexpected))
    if wrong:
        parts.append("wrong shape: " + ", ".join(f"{n} {list(found[n])} (expected {list(expected[n])})"
                                                 for n in wrong))
    if parts:
        raise ModelError("checkpoint does not match the model; " + "; ".join(parts))


def load_weights(model: torch.nn.Module, weights: Iterable[Tuple[str, torch.Tensor]]) -> None:
    """Take this rank's slice of every checkpoint tensor; one-line error naming missing / unexpected ones."""
    params = dict(model.named_parameters())
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    expected = {(name, shard) for name, p in params.items()
                for shard in ([s.name for s in p.shards] if hasattr(p, "shards") else [None])}
    if tied:
        expected.discard(("lm_head.weight", None))
    seen, unexpected = set(), []
    for hf_name, tensor in weights:
        if _IGNORED.search(hf_name) or (tied and hf_name == "lm_head.weight"):
            continue
        name, shard = hf_to_core(hf_name)
        if (name, shard) not in expected:
            unexpected.append(hf_name)
            continue
        param = params[name]
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ModelError(f"checkpoint tensor {hf_name} contains NaN or inf")
        try:
            load_full(param, tensor.to(param.dtype), shard)
        except ValueError as err:
            raise ModelError(f"checkpoint tensor {hf_name}: {err}") from None
        seen.add((name, shard))
    missing = sorted(core_to_hf(n, s) for n, s in expected - seen)
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


def export_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Full HF-named tensors (collective: every TP rank calls it; every rank gets the result)."""
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    out = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if tied and name == "lm_head.weight":
            continue
        for shard, full in gather_full(param).items():
            out[core_to_hf(name, shard)] = full.contiguous().cpu()
    return out


def save_hf_checkpoint(model: torch.nn.Module, out_dir: str, rank: int = 0) -> None:
    """Write config.json + model.safetensors that transformers and sglang load (rank 0 writes).

    Atomic: the files go to a temporary directory next to ``out_dir``, which then takes its place (an
    existing ``out_dir`` is replaced whole; the command line refuses a non-empty one without --force).
    Weights with NaN or inf are refused (NonFiniteError) and nothing is written."""
    from safetensors.torch import save_file

    state = export_state_dict(model)
    if rank != 0:
        return
    bad = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise NonFiniteError(f"the weights to export contain NaN or inf ({', '.join(bad[:3])}"
                             f"{', ...' if len(bad) > 3 else ''}): training diverged? Nothing was written to {out_dir}")
    out_dir = os.path.abspath(out_dir)
    partial = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=os.path.dirname(out_dir))
    _remove_on_abort(partial)
    try:
        with open(os.path.join(partial, "config.json"), "w") as f:
            json.dump(model.config.hf, f, indent=2)
        save_file(state, os.path.join(partial, "model.safetensors"), metadata={"format": "pt"})
        for mode, path in ((0o644, os.path.join(partial, name)) for name in os.listdir(partial)):
            os.chmod(path, mode)
        os.chmod(partial, 0o755)  # mkdtemp makes it private
        _replace_dir(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _remove_on_abort(path: str) -> None:
    from sp_core.mpu.launch import remove_on_abort

    remove_on_abort(path)


def _replace_dir(new: str, target: str) -> None:
    if not os.path.exists(target) or (os.path.isdir(target) and not os.listdir(target)):
        os.replace(new, target)  # rename(2) onto an empty directory is atomic
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=os.path.dirname(target))
    os.replace(target, os.path.join(old, "d"))
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
