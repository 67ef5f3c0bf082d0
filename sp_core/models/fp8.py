"""FP8 checkpoints, dequantised at load: the format of DeepSeek-V3 / V3.1 / V3.2 and Qwen3-*-FP8.

config.json says ``quantization_config: {quant_method: "fp8", fmt: "e4m3", weight_block_size: [bn, bk],
activation_scheme: "dynamic"}``. Each quantised linear weight ``X.weight`` is ``float8_e4m3fn`` [..., N, K]
with a ``X.weight_scale_inv`` of [..., ceil(N/bn), ceil(K/bk)] (float32, or bf16 / UE8M0): the value of
element (n, k) is ``fp8[n, k] * scale_inv[n // bn, k // bk]`` (the blocks at the edges are partial). Without
``weight_block_size`` the scale is one number per tensor: ``X.weight_scale_inv`` (transformers'
FineGrainedFP8 per-tensor form) or ``X.weight_scale`` (sglang's / AutoFP8's; ``X.input_scale``, a static
activation scale, is not needed once the weights are dequantised and is skipped). Weights stored
unquantised (embeddings, LM head, norms, the router and its bias, ``modules_to_not_convert``) load as they are.

Dequantisation is exact up to one rounding: the product of an e4m3 value (4 significant bits) and a float32
scale (24) is exact in float64, which is then rounded once to the model's dtype. A loader receives an
:class:`FP8Tensor` in place of the weight; it dequantises only the slice a rank takes (``narrow``), never
the whole tensor on every rank (a replicated weight is dequantised whole: every rank holds all of it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, Optional, Tuple

import torch

from sp_core.models.config import ModelError

SUPPORTED = ("unquantised float32 / bfloat16 / float16 weights, or quant_method fp8 (e4m3 weights with "
             "block-wise weight_scale_inv, or a per-tensor scale)")
_WEIGHT_DTYPES = {"F8_E4M3": torch.float8_e4m3fn}  # safetensors' name -> torch dtype
_SCALE_DTYPES = ("F32", "BF16", "F16", "F64", "F8_E8M0")


@dataclass(frozen=True)
class FP8Format:
    """``block``: (bn, bk) of ``weight_block_size``; None: one scale per tensor."""

    block: Optional[Tuple[int, int]]

    def describe(self) -> str:
        return f"weight_block_size {list(self.block)}" if self.block else "per-tensor scales"


def fp8_format(hf: dict) -> Optional[FP8Format]:
    """The FP8 format of a config.json dict (None: unquantised); one line for any other quantisation."""
    quant = hf.get("quantization_config")
    if not quant:
        return None
    if not isinstance(quant, dict):
        raise ModelError(f"config.json: \"quantization_config\" must be an object or null, got {quant!r}")
    method = quant.get("quant_method")
    if method != "fp8":
        raise ModelError(f"quantised checkpoints of quant_method {method!r} are not supported; supported: {SUPPORTED}")
    fmt = quant.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ModelError(f"config.json: quantization_config fmt {fmt!r} is not supported; supported: e4m3 "
                         f"(float8_e4m3fn weights)")
    block = quant.get("weight_block_size")
    if block is not None and not (isinstance(block, list) and len(block) == 2 and
                                  all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ModelError(f"config.json: quantization_config weight_block_size must be two positive integers "
                         f"[block_n, block_k] or null (one scale per tensor), got {block!r}")
    scheme = quant.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static") or (scheme == "static" and block is not None):
        raise ModelError(f"config.json: quantization_config activation_scheme {scheme!r} is not supported with "
                         f"weight_block_size {block!r}; supported: dynamic (block-wise or per-tensor), static "
                         f"(per-tensor)")
    return FP8Format(tuple(block) if block is not None else None)


def scale_shape(weight_shape, block: Optional[Tuple[int, int]]) -> Tuple[int, ...]:
    """The block-scale grid of a weight [..., N, K]: [..., ceil(N/bn), ceil(K/bk)]."""
    *lead, n, k = weight_shape
    return (*lead, -(-n // block[0]), -(-k // block[1]))


def scale_names(name: str, fmt: FP8Format) -> Tuple[str, ...]:
    """The checkpoint names that may hold the scale of FP8 tensor ``name`` (``X.weight`` -> ``X.weight_scale_inv``;
    a fused ``experts.gate_up_proj`` -> ``experts.gate_up_proj_scale_inv``)."""
    return (name + "_scale_inv",) if fmt.block else (name + "_scale_inv", name + "_scale")


def _scale_ok(scale_shape_found, weight_shape, fmt: FP8Format) -> bool:
    if fmt.block:
        return tuple(scale_shape_found) == scale_shape(weight_shape, fmt.block)
    return int(torch.Size(scale_shape_found).numel()) == 1


def _expected_scale(name: str, weight_shape, fmt: FP8Format) -> str:
    if fmt.block:
        return (f"{list(scale_shape(weight_shape, fmt.block))} (the blocks of {list(fmt.block)} over {name} "
                f"{list(weight_shape)}, edge blocks partial)")
    return "one value (a per-tensor scale)"


class FP8Tensor:
    """An FP8 checkpoint tensor and its scale, dequantised where a loader slices it.

    ``narrow(dim, start, length)`` returns that slice dequantised (a torch.Tensor in ``dtype``; float64, i.e.
    exact, until ``to(dtype)`` sets the model's dtype); ``t[i]`` / ``t[i, a:b]`` on the leading (expert) dim and
    the rows stay lazy (an FP8Tensor); ``dequantize()`` gives the whole tensor."""

    def __init__(self, name: str, data: torch.Tensor, scale: torch.Tensor, fmt: FP8Format,
                 dtype: torch.dtype = torch.float64, origin: Tuple[int, int] = (0, 0)):
        self.name, self.data, self.scale, self.fmt, self.dtype, self.origin = name, data, scale, fmt, dtype, origin

    @classmethod
    def of(cls, name: str, data: torch.Tensor, scale_name: str, scale: torch.Tensor, fmt: FP8Format) -> "FP8Tensor":
        """Checked: an e4m3 tensor of >= 2 dims with a scale of the right shape (one line otherwise)."""
        if data.dtype != torch.float8_e4m3fn or data.dim() < 2:
            raise ModelError(f"checkpoint tensor {name} ({data.dtype}, {list(data.shape)}) has a scale "
                             f"{scale_name} but is not a float8_e4m3fn matrix; supported: {SUPPORTED}")
        if not scale.is_floating_point():
            raise ModelError(f"checkpoint tensor {scale_name} is {scale.dtype}; expected float scales")
        if not _scale_ok(scale.shape, data.shape, fmt):
            raise ModelError(f"checkpoint tensor {scale_name} has shape {list(scale.shape)}; expected "
                             f"{_expected_scale(name, data.shape, fmt)}")
        scale = scale.to(torch.float64)
        if not torch.isfinite(scale).all():
            raise ModelError(f"checkpoint tensor {scale_name} contains NaN or inf")
        if not fmt.block:
            scale = scale.reshape(())
        return cls(name, data, scale, fmt)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def dim(self) -> int:
        return self.data.dim()

    def has_nan(self) -> bool:
        """e4m3fn has no inf; NaN is the bit pattern S.1111.111."""
        return bool(((self.data.view(torch.uint8) & 0x7F) == 0x7F).any())

    def to(self, dtype: torch.dtype) -> "FP8Tensor":
        return FP8Tensor(self.name, self.data, self.scale, self.fmt, dtype, self.origin)

    def _view(self, data: torch.Tensor, scale: torch.Tensor, origin) -> "FP8Tensor":
        return FP8Tensor(self.name, data, scale, self.fmt, self.dtype, origin)

    def __getitem__(self, index) -> "FP8Tensor":
        """An int on a leading dim, or (int, slice) / int: the expert loaders' ``t[e]``, ``t[e, a:b]``."""
        index = index if isinstance(index, tuple) else (index,)
        out = self
        for i in index:
            if isinstance(i, int) and out.dim() > 2:
                scale = out.scale[i] if out.fmt.block else out.scale
                out = out._view(out.data[i], scale, out.origin)
            elif isinstance(i, slice) and i.step in (None, 1) and out.dim() == 2:
                start, stop, _ = i.indices(out.shape[0])
                return out._narrowed(0, start, max(0, stop - start))
            else:
                raise TypeError(f"FP8Tensor {self.name}: unsupported index {index!r}")
        return out

    def _narrowed(self, dim: int, start: int, length: int) -> "FP8Tensor":
        dim = dim % self.dim()
        origin = list(self.origin)
        rows_or_cols = dim - (self.dim() - 2)
        if rows_or_cols < 0:
            scale = self.scale.narrow(dim, start, length) if self.fmt.block else self.scale
        else:
            scale = self.scale
            origin[rows_or_cols] += start
        return self._view(self.data.narrow(dim, start, length), scale, tuple(origin))

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        """This slice, dequantised: what a rank copies into its parameter."""
        return self._narrowed(dim, start, length).dequantize()

    def dequantize(self) -> torch.Tensor:
        values = self.data.to(torch.float64)
        if self.fmt.block:
            bn, bk = self.fmt.block
            n, k = values.shape[-2:]
            rows = (torch.arange(n, device=self.scale.device) + self.origin[0]) // bn
            cols = (torch.arange(k, device=self.scale.device) + self.origin[1]) // bk
            scale = self.scale.index_select(-2, rows).index_select(-1, cols)
        else:
            scale = self.scale
        return (values * scale).to(self.dtype)


def dequantizing(weights: Iterable[Tuple[str, torch.Tensor]], fmt: Optional[FP8Format]
                 ) -> Iterator[Tuple[str, object]]:
    """(name, tensor) pairs with every FP8 weight joined to its scale as an :class:`FP8Tensor` (the scales
    themselves not passed on). A weight waits for its scale (and a scale for its weight): checkpoints store
    them next to each other (``X.weight``, ``X.weight_scale_inv``), so at most one waits. One line for an FP8
    tensor without ``fmt`` or without its scale, and for a scale of the wrong shape."""
    waiting: Dict[str, torch.Tensor] = {}  # FP8 weights by name, and scales by name
    for name, tensor in weights:
        if _is_fp8_weight(tensor):
            if fmt is None:
                raise ModelError(unquantised_fp8_message(name, str(tensor.dtype)))
            found = [s for s in scale_names(name, fmt) if s in waiting]
            if found:
                yield name, FP8Tensor.of(name, tensor, found[0], waiting.pop(found[0]), fmt)
            else:
                waiting[name] = tensor
            continue
        if fmt is not None:
            if not fmt.block and name.endswith(".input_scale"):
                continue  # a static activation scale: not needed by dequantised weights
            weight = _scaled_weight(name)
            if weight is not None:
                if weight in waiting:
                    yield weight, FP8Tensor.of(weight, waiting.pop(weight), name, tensor, fmt)
                else:
                    waiting[name] = tensor
                continue
        yield name, tensor
    for name in sorted(waiting):
        weight = _scaled_weight(name)
        if weight is None:
            raise ModelError(f"checkpoint tensor {name} is stored in FP8 but its scale "
                             f"{' or '.join(scale_names(name, fmt))} is missing")
        yield name, waiting[name]  # a scale without an FP8 weight: the loader reports it as unexpected


def _is_fp8_weight(tensor: torch.Tensor) -> bool:
    """Stored in an FP8 format of values (UE8M0, a format of scales only, is not one)."""
    return str(tensor.dtype).startswith("torch.float8") and tensor.dtype != torch.float8_e8m0fnu


def _scaled_weight(name: str) -> Optional[str]:
    """The weight a scale tensor belongs to (``X.weight_scale_inv`` / ``X.weight_scale`` -> ``X.weight``)."""
    for suffix in ("_scale_inv", "_scale"):
        if name.endswith(suffix) and not name.endswith(".input_scale"):
            return name[: -len(suffix)]
    return None


def unquantised_fp8_message(name: str, dtype: str) -> str:
    return (f"checkpoint tensor {name} is stored in FP8 ({dtype}) but config.json has no quantization_config "
            f"(its scales); sp-core loads float32 / bfloat16 / float16 checkpoints, or FP8 ones with "
            f"quantization_config quant_method fp8")


def check_headers(headers: Dict[str, Tuple[str, Tuple[int, ...]]], fmt: Optional[FP8Format]
                  ) -> Dict[str, Tuple[int, ...]]:
    """From the safetensors headers (name -> (dtype, shape)), before any rank starts: one line for an FP8
    tensor without a quantization_config or without its scale, a scale of the wrong shape or dtype, or a scale
    whose weight is not FP8. Returns name -> shape of the tensors the model loads (scales left out)."""
    shapes = {}
    for name, (dtype, shape) in sorted(headers.items()):
        if dtype.startswith("F8") and dtype != "F8_E8M0":
            if fmt is None:
                raise ModelError(unquantised_fp8_message(name, dtype))
            if dtype not in _WEIGHT_DTYPES:
                raise ModelError(f"checkpoint tensor {name} is stored in {dtype}; supported FP8 weights: "
                                 f"float8_e4m3fn (F8_E4M3, quantization_config fmt e4m3)")
            scales = [s for s in scale_names(name, fmt) if s in headers]
            if not scales:
                raise ModelError(f"checkpoint tensor {name} is stored in FP8 but its scale "
                                 f"{' or '.join(scale_names(name, fmt))} is missing "
                                 f"(quantization_config: fp8, {fmt.describe()})")
            scale_dtype, found = headers[scales[0]]
            if scale_dtype not in _SCALE_DTYPES:
                raise ModelError(f"checkpoint tensor {scales[0]} is stored in {scale_dtype}; expected float scales "
                                 f"({', '.join(_SCALE_DTYPES)})")
            if len(shape) < 2 or not _scale_ok(found, shape, fmt):
                raise ModelError(f"checkpoint tensor {scales[0]} has shape {list(found)}; expected "
                                 f"{_expected_scale(name, shape, fmt)}")
        if fmt is not None:
            if not fmt.block and name.endswith(".input_scale"):
                continue
            weight = _scaled_weight(name)
            if weight is not None:
                if weight not in headers or not headers[weight][0].startswith("F8"):
                    what = f"stored in {headers[weight][0]}" if weight in headers else "missing"
                    raise ModelError(f"checkpoint tensor {name} is the scale of {weight}, which is {what}; a scale "
                                     f"belongs to an FP8 (F8_E4M3) weight")
                continue
        shapes[name] = tuple(shape)
    return shapes
