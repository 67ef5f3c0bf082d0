"""Hugging Face checkpoints <-> the core's parameters: this rank's slice on load, full tensors on export.

Core parameter names are HF names, except the fused projections (``qkv_proj``, ``gate_up_proj``; the rows of
``qkv_proj`` that several ranks hold alike are its ``replicated_weight`` / ``replicated_bias``).
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
import shutil
import tempfile
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from sp_core.models.errors import NonFiniteError
from sp_core.layers.sharding import full_shapes, gather_full, gather_full_to_first, load_full, packed_name
from sp_core.models import fp8
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


def load_expert_tensor(experts: Dict[str, torch.nn.Module], hf_name: str, tensor: torch.Tensor) -> bool:
    """Load the routed-expert tensor ``hf_name`` into its MoE block (``experts``: name prefix ending in
    ".mlp.experts." -> block); False when no block takes that name."""
    prefix = hf_name[: hf_name.index(_EXPERTS) + len(_EXPERTS)]
    if prefix not in experts:
        return False
    refuse_non_finite(hf_name, tensor)  # also where no prompt routes to the expert: never a silent result
    # an FP8Tensor: the MoE layer narrows it to this rank's slice, dequantised exactly (float64), and its copy
    # into the expert weights is the one rounding to the model's dtype
    try:
        experts[prefix].load_expert_tensor(hf_name[len(prefix):], tensor)
    except KeyError:
        return False
    except ValueError as err:
        raise ModelError(f"checkpoint tensor {hf_name}: {err}") from None
    return True


def missing_expert_tensors(experts: Dict[str, torch.nn.Module]) -> List[str]:
    """HF names of the routed-expert tensors that ``load_expert_tensor`` has not filled yet."""
    return sorted(prefix + key for prefix, moe in experts.items() for key in moe.missing_expert_tensors())


def expected_pieces(params: Dict[str, torch.Tensor]) -> Dict[Tuple[str, Optional[str]], torch.Tensor]:
    """(packed name, packed piece or None) -> the parameter holding it, for every piece the checkpoint must
    fill (``sharding.packed_name``: a packed tensor's replicated rows are a parameter of their own)."""
    return {(packed_name(name), shard): p for name, p in params.items()
            for shard in ([s.name for s in p.shards] if hasattr(p, "shards") else [None])}


def refuse_non_finite(hf_name: str, tensor: torch.Tensor) -> None:
    if isinstance(tensor, fp8.FP8Tensor):  # its scale was checked as it was paired
        if tensor.has_nan():
            raise ModelError(f"checkpoint tensor {hf_name} contains NaN or inf")
        return
    if not tensor.is_floating_point():
        return
    wide = tensor.float() if tensor.element_size() == 1 else tensor  # torch has no isfinite for FP8 as stored
    if not torch.isfinite(wide).all():
        raise ModelError(f"checkpoint tensor {hf_name} contains NaN or inf")


def load_piece(param: torch.Tensor, hf_name: str, tensor: torch.Tensor, shard: Optional[str]) -> None:
    """This rank's slice of checkpoint tensor ``hf_name`` into ``param`` (its ``shard`` piece, or whole);
    one-line error on a shape mismatch. An FP8 tensor is dequantised to ``param``'s dtype: only the slice this
    rank takes when ``param`` is partitioned, whole when it is replicated."""
    tensor = tensor.to(param.dtype)
    if isinstance(tensor, fp8.FP8Tensor) and getattr(param, "shards", None) is None:
        tensor = tensor.dequantize()
    try:
        load_full(param, tensor, shard)
    except ValueError as err:
        raise ModelError(f"checkpoint tensor {hf_name}: {err}") from None


def iter_hf_tensors(model_dir: str) -> Iterator[Tuple[str, torch.Tensor]]:
    for path in checkpoint_files(model_dir):
        with _open(path) as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def check_finite_weights(model_dir: str) -> None:
    """Every floating-point tensor of the checkpoint is finite (ModelError naming the first that is not): for an
    engine whose own workers load the weights, checked before they start. Reads the checkpoint once, a tensor at
    a time (FP8 values as they are stored: NaN is a value of e4m3)."""
    for name, tensor in iter_hf_tensors(model_dir):
        refuse_non_finite(name, tensor)


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


def checkpoint_headers(model_dir: str) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """Tensor name -> (safetensors dtype, shape), read from the safetensors headers only (no tensor data)."""
    headers = {}
    for path in checkpoint_files(model_dir):
        with _open(path) as f:
            for name in f.keys():
                info = f.get_slice(name)
                headers[name] = (info.get_dtype(), tuple(info.get_shape()))
    return headers


def checkpoint_shapes(model_dir: str, fp8_format: Optional["fp8.FP8Format"] = None) -> Dict[str, Tuple[int, ...]]:
    """Tensor name -> shape of the tensors a model loads, FP8 scales left out. FP8 tensors are checked here
    (``fp8.check_headers``): a checkpoint without ``fp8_format`` (no quantization_config) has lost its scales;
    one with it needs every FP8 weight's scale, of the right shape."""
    return fp8.check_headers(checkpoint_headers(model_dir), fp8_format)


def expected_shapes(model: torch.nn.Module) -> Dict[str, Tuple[int, ...]]:
    """HF tensor name -> full shape that ``model`` loads (build it at tp 1, e.g. on the meta device)."""
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    out = {}
    for name, param in _tensors(model).items():  # routed experts are checked as they load
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


def _expected_expert_shapes(model: torch.nn.Module, found: Dict[str, Tuple[int, ...]]) -> Dict[str, Tuple[int, ...]]:
    """HF name -> full shape of every routed-expert tensor ``model`` loads: per expert, or the fused
    ``experts.gate_up_proj`` [E, 2I, H] / ``experts.down_proj`` [E, H, I] where the checkpoint has those."""
    out = {}
    for prefix, moe in _expert_owners(model).items():
        per_expert = moe.expert_tensor_shapes()
        if any(prefix + key in found for key in ("gate_up_proj", "down_proj")):
            hidden, inter = per_expert["0.down_proj.weight"]
            out[prefix + "gate_up_proj"] = (moe.num_experts, 2 * inter, hidden)
            out[prefix + "down_proj"] = (moe.num_experts, hidden, inter)
        else:
            out.update({prefix + key: shape for key, shape in per_expert.items()})
    return out


def check_checkpoint(model: torch.nn.Module, model_dir: str) -> None:
    """One-line error for a checkpoint whose tensors do not match ``model`` (missing, unexpected, wrong
    shape; routed experts included) or whose files are unreadable: the check that runs before any rank or
    engine starts."""
    cfg = getattr(model, "config", None)
    tied = getattr(cfg, "tie_word_embeddings", False)
    found = {name: shape for name, shape in checkpoint_shapes(model_dir, getattr(cfg, "fp8", None)).items()
             if not _IGNORED.search(name) and not (tied and name == "lm_head.weight")
             and not _beyond_layers(model, name)}
    expected = expected_shapes(model)
    expected.update(_expected_expert_shapes(model, found))
    parts = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(n for n in set(found) & set(expected) if found[n] != expected[n])
    if missing:
        parts.append("missing: " + _some(missing))
    if unexpected:
        parts.append("unexpected: " + _some(unexpected))
    if wrong:
        parts.append("wrong shape: " + ", ".join(f"{n} {list(found[n])} (expected {list(expected[n])})"
                                                 for n in wrong[:8]) + (", ..." if len(wrong) > 8 else ""))
    if parts:
        raise ModelError("checkpoint does not match the model; " + "; ".join(parts))


def _some(names: List[str], limit: int = 12) -> str:
    """A list of tensor names that stays one readable line (a checkpoint has thousands of experts)."""
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def load_weights(model: torch.nn.Module, weights: Iterable[Tuple[str, torch.Tensor]]) -> None:
    """Take this rank's slice of every checkpoint tensor; one-line error naming missing / unexpected ones.
    FP8 weights (``model.config.fp8``) are dequantised to the model's dtype, each rank its own slice."""
    weights = fp8.dequantizing(weights, getattr(getattr(model, "config", None), "fp8", None))
    params = _tensors(model)
    experts = _expert_owners(model)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    expected = expected_pieces(params)
    if tied:
        expected.pop(("lm_head.weight", None), None)
    seen, unexpected = set(), []
    for hf_name, tensor in weights:
        if _IGNORED.search(hf_name) or (tied and hf_name == "lm_head.weight") or _beyond_layers(model, hf_name):
            continue
        if _EXPERTS in hf_name:
            if not load_expert_tensor(experts, hf_name, tensor):
                unexpected.append(hf_name)
            continue
        name, shard = _core_name(hf_name, expected)
        if (name, shard) not in expected:
            unexpected.append(hf_name)
            continue
        refuse_non_finite(hf_name, tensor)
        load_piece(expected[(name, shard)], hf_name, tensor, shard)
        seen.add((name, shard))
    missing = sorted(core_to_hf(n, s) for n, s in set(expected) - seen)
    missing += missing_expert_tensors(experts)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append("missing: " + ", ".join(missing))
        if unexpected:
            parts.append("unexpected: " + ", ".join(sorted(unexpected)))
        raise ModelError("checkpoint does not match the model; " + "; ".join(parts))


def core_to_hf(name: str, shard: Optional[str]) -> str:
    name = packed_name(name)
    for hf_piece, (core_piece, shard_name) in _FUSED.items():
        if shard == shard_name and core_piece in name:
            return name.replace(core_piece, hf_piece)
    return name


def piece_key(name: str, shard: Optional[str]) -> str:
    """A piece of a checkpoint tensor, named the same at every tp (an in-memory refit's reshard matches them):
    its checkpoint name, and the shard's name where one tensor packs several (the routed experts' gate and up)."""
    key = core_to_hf(name, shard)
    return key if shard is None else f"{key}[{shard}]"


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
        for shard, full in gather_full(tensor, values, model.parallel).items():
            out[core_to_hf(name, shard)] = full.contiguous().cpu()
    for prefix, moe in _expert_owners(model).items():
        for key, full in moe.export_expert_tensors(grads=grads).items():
            out[prefix + key] = full.contiguous().cpu()
    return out


DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # transformers' default max_shard_size ("5GB")


def _exported_tensors(model: torch.nn.Module):
    """(core name, tensor, shard, HF name, full shape) of every parameter and persistent buffer a one-writer
    export writes; routed experts excluded (``_exported_experts``)."""
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    for name, tensor in _tensors(model).items():
        if tied and name == "lm_head.weight":
            continue
        for shard, shape in full_shapes(tensor).items():
            yield name, tensor, shard, core_to_hf(name, shard), shape


def _exported_experts(model: torch.nn.Module):
    """(HF prefix, MoE module, {HF name relative to the prefix: full shape}) of every MoE layer's routed experts."""
    for prefix, moe in _expert_owners(model).items():
        yield prefix, moe, moe.expert_tensor_shapes()


def _export_stream(model: torch.nn.Module):
    """(plan: [(HF name, bytes)], tensors: iterator of (HF name, full tensor on TP rank 0 / None elsewhere)).

    Every tensor is gathered onto TP rank 0 only: one collective per parameter or buffer, and one per MoE
    layer for its routed experts (per expert, under their HF names)."""
    def gathered():
        current_name, full = None, None
        for name, tensor, shard, hf_name, _ in _exported_tensors(model):
            if current_name != name:  # one collective per parameter, all its shards at once
                full, current_name = gather_full_to_first(tensor, parallel=model.parallel), name
            yield hf_name, (None if full is None else full[shard])
        for prefix, moe, shapes in _exported_experts(model):
            experts = moe.export_expert_tensors(to_first=True)
            for key in shapes:
                yield prefix + key, (None if experts is None else experts[key])

    plan = [(hf_name, tensor.element_size() * int(torch.Size(shape).numel()))
            for _, tensor, _, hf_name, shape in _exported_tensors(model)]
    for prefix, moe, shapes in _exported_experts(model):
        size = moe.experts.gate_up_proj.element_size()
        plan += [(prefix + key, size * int(torch.Size(shape).numel())) for key, shape in shapes.items()]
    return plan, gathered()


def _plan_files(sizes, max_shard_bytes: int) -> Dict[str, str]:
    """HF name -> file name, filling files up to ``max_shard_bytes`` in export order."""
    groups, size = [[]], 0
    for hf_name, nbytes in sizes:
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(hf_name)
        size += nbytes
    if len(groups) == 1:
        return {name: "model.safetensors" for name in groups[0]}
    n = len(groups)
    return {name: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, group in enumerate(groups) for name in group}


def _exported_config(hf: dict, dtype: Optional[torch.dtype]) -> dict:
    """config.json of an export: unquantised weights (no quantization_config), its dtype key(s) (``torch_dtype``,
    transformers 5's ``dtype``) saying the dtype most of the weights are written in."""
    out = {k: v for k, v in hf.items() if k != "quantization_config"}
    for key in ("torch_dtype", "dtype"):
        if key in out and dtype is not None:
            out[key] = str(dtype).removeprefix("torch.")
    return out


def save_hf_checkpoint(model: torch.nn.Module, out_dir: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                       progress=None) -> List[str]:
    """Write config.json and the model as Hugging Face safetensors that transformers and sglang load:
    one ``model.safetensors``, or files of at most ``max_shard_bytes`` plus
    ``model.safetensors.index.json``. Collective over the TP group: each tensor is gathered onto TP
    rank 0, which writes; the other ranks only send their slices (they never hold a full tensor) and
    write nothing. Routed experts are written per expert, under their HF names, as transformers saves
    them. At most one file's tensors are held at a time.
    Returns the paths written (empty on the other ranks). Under data parallelism call it on one replica
    only (``sp_core_megatron``'s ``export_hf_checkpoint`` does).

    Atomic: the files go to a temporary directory next to ``out_dir``, which then takes its place (an
    existing ``out_dir`` is replaced whole; the command line refuses a non-empty one without --force).
    Weights with NaN or inf are refused (NonFiniteError) and nothing is written."""
    from safetensors.torch import save_file

    writer = model.parallel.rank == 0
    sizes, tensors = _export_stream(model)
    plan = _plan_files(sizes, max_shard_bytes)
    out_dir = os.path.abspath(out_dir)
    partial = None
    if writer:
        os.makedirs(os.path.dirname(out_dir), exist_ok=True)
        partial = _new_partial_dir(out_dir)
    written, pending, current, bad = [], {}, None, []
    values: Dict[torch.dtype, int] = {}  # floating-point values written, by dtype

    def flush():
        if writer and pending and not bad:
            save_file(pending, os.path.join(partial, current), metadata={"format": "pt"})
            written.append(os.path.join(out_dir, current))
            if progress:
                progress(f"wrote {current}")
        pending.clear()

    try:
        for hf_name, full in tensors:
            if plan[hf_name] != current:
                flush()
                current = plan[hf_name]
            if writer and full is not None:
                tensor = full.contiguous().cpu()
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    bad.append(hf_name)  # keep going: the other ranks are still sending
                if tensor.is_floating_point():
                    values[tensor.dtype] = values.get(tensor.dtype, 0) + tensor.numel()
                pending[hf_name] = tensor
        flush()
        if not writer:
            return written
        if bad:
            raise NonFiniteError(f"the weights to export contain NaN or inf ({', '.join(bad[:3])}"
                                 f"{', ...' if len(bad) > 3 else ''}): training diverged? Nothing was written to {out_dir}")
        files = sorted(set(plan.values()))
        if len(files) > 1:
            index = {"metadata": {"total_size": sum(n for _, n in sizes)}, "weight_map": dict(sorted(plan.items()))}
            with open(os.path.join(partial, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        with open(os.path.join(partial, "config.json"), "w") as f:
            json.dump(_exported_config(model.config.hf, max(values, key=values.get) if values else None), f, indent=2)
        for path in (os.path.join(partial, name) for name in os.listdir(partial)):
            os.chmod(path, 0o644)
        os.chmod(partial, 0o755)  # mkdtemp makes it private
        _replace_dir(partial, out_dir)
        return written
    except BaseException:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        raise


def _new_partial_dir(out_dir: str) -> str:
    from sp_core.procs.launch import new_partial_dir

    return new_partial_dir(out_dir)


def _replace_dir(new: str, target: str) -> None:
    if not os.path.exists(target) or (os.path.isdir(target) and not os.listdir(target)):
        os.replace(new, target)  # rename(2) onto an empty directory is atomic
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=os.path.dirname(target))
    os.replace(target, os.path.join(old, "d"))
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
