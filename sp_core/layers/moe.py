"""DeepSeek's MoE block: router, routed experts, shared experts; dropless.

Input and output: this rank's token shard under SP (all tokens when SP is off), padding rows at the
end of the batch. ``num_tokens`` (real tokens of the whole batch) keeps SP padding away from the
router, the experts and the load counts. Each token is routed once, on the rank that holds it.

Two parallel modes over the TP group, picked by ``expert_parallel``:

(a) TP-sharded experts (``expert_parallel=False``): every rank holds 1/t of the intermediate size of
    every routed expert and of the shared experts.
      SP on:  ONE g on [hidden | routing weights | expert ids] (one all-gather), the experts on all
              tokens, ONE g-bar on routed + shared partial outputs (one reduce-scatter). Saves the
              token shard, not the gathered tokens: backward re-gathers it (one more all-gather, as a
              column layer does) and reduce-scatters the hidden state's and the routing weights'
              gradients (two reduce-scatters: they differ in dtype under bf16).
      SP off: f on the hidden state and on the routing weights, f-bar on the output (one all-reduce).
(b) Expert parallelism (``expert_parallel=True``): every rank holds E/t whole experts.
      SP on:  each rank sends its tokens' rows to the experts' owners and gets the results back:
              four all-to-alls (token counts per expert, rows, their routing weights, results back),
              no gather.
      SP off: every rank already holds all tokens: it runs its own experts on the tokens routed to
              them, f on their input and routing weights, f-bar sums the ranks' outputs (sglang's
              EP with the standard dispatcher).
    The shared experts are replicated on every rank and applied to the tokens the rank holds (the token
    shard under SP: tagged ``sequence_parallel``, as vLLM does), so mode (b) adds no collective for
    them; that costs 3 * H * I_shared parameters per rank.

Parameters carry Megatron's attributes: routed experts in (a) are ``tensor_model_parallel`` with
``partition_dim`` 1 (gate_up) / 2 (down); in (b) they are ``allreduce = False`` (Megatron's marker for
expert parameters, whose gradients are complete on the owner and reduced over expert-data-parallel
ranks only), ``expert_parallel``, and ``tensor_model_parallel`` with ``partition_dim`` 0 (each TP rank
holds its own block of experts, so a gradient norm counts them on every rank).

Qwen2-MoE's shared expert (``shared_expert_gate=True``): one SwiGLU MLP of its own width, named
``shared_expert``, whose output is scaled per token by sigmoid(``shared_expert_gate``(x)). The gate value is
computed on the tokens the rank holds and travels like the routing weights (gathered with them in mode (a)
under SP, f in mode (a) without SP), so its weight is tagged ``sequence_parallel`` like the router's.

Checkpoints: ``load_expert_tensor`` / ``missing_expert_tensors`` / ``export_expert_tensors`` take and
give the routed experts under their Hugging Face names relative to ``mlp.experts.``; the gate and the
shared experts carry HF names and ``shards``, so the generic loader handles them.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from sp_core import mpu
from sp_core.layers.experts import GroupedExperts, SharedExperts, grouped_linear, grouped_weight_grad
from sp_core.layers.linear import _divide
from sp_core.layers.router import Router, RouterConfig, count_per_expert
from sp_core.layers.sharding import Shard, gather_full, gather_full_to_first, mark_partitioned, mark_sequence_parallel
from sp_core.mpu import collectives
from sp_core.mpu.platform import amp_backward, amp_forward

_PER_EXPERT = re.compile(r"(\d+)\.(gate|up|down)_proj\.weight")
_PROJECTIONS = ("gate", "up", "down")


class _ExpertInputGEMMs(torch.autograd.Function):
    """Mode (a) under SP: the routed experts' grouped gate_up GEMM (rows ``tokens``, sorted by expert) and
    the shared experts' gate_up GEMM on the gathered tokens ``x_all``, saving this rank's token shard
    rather than the gathered tokens; backward re-gathers the shard for the weight gradients (principle 6,
    as linear.py's _GatheredInputLinear), overlapped with the input-gradient GEMMs."""

    @staticmethod
    @amp_forward
    def forward(ctx, x_all, x_shard, tokens, rows, gate_up, shared_gate_up, parallel):
        ctx.save_for_backward(x_shard, tokens, rows, gate_up, shared_gate_up)
        ctx.parallel = parallel
        ctx.num_tokens = x_all.shape[0]
        shared = F.linear(x_all, shared_gate_up) if shared_gate_up is not None else x_all.new_zeros(0)
        return grouped_linear(x_all[tokens], gate_up, rows), shared

    @staticmethod
    @amp_backward
    def backward(ctx, grad_routed, grad_shared):
        x_shard, tokens, rows, gate_up, shared_gate_up = ctx.saved_tensors
        gathering = collectives.all_gather_start(ctx.parallel, x_shard)
        grad_x = grouped_linear(grad_routed, gate_up.transpose(1, 2), rows)
        grad_x = grad_x.new_zeros(ctx.num_tokens, grad_x.shape[1]).index_add(0, tokens, grad_x)
        if shared_gate_up is not None:
            grad_x = grad_x + grad_shared @ shared_gate_up
        x_all = gathering.wait()[:ctx.num_tokens]
        grad_gate_up = grouped_weight_grad(grad_routed, x_all[tokens], gate_up, rows)
        grad_shared_gate_up = grad_shared.t() @ x_all if shared_gate_up is not None else None
        return grad_x, None, None, None, grad_gate_up, grad_shared_gate_up, None


COMBINE_BLOCKS = 8  # no-grad combine: token blocks, each un-permuting 1/8 of the expert rows at a time


def _combine(y: torch.Tensor, slots: torch.Tensor, top_k: int, num_tokens: int) -> torch.Tensor:
    """Per-token sums of the expert outputs ``y`` (one row per (token, k) slot in ``slots``, flat index
    token * top_k + k). With every slot present it un-permutes and sums over k, which saves only the
    permutation for backward (``index_add`` would also save ``y``, a [tokens * top_k, H] tensor). Without
    autograd (prefill) it does the same per block of tokens, so that no second [tokens * top_k, H] copy of
    the layer's largest buffer exists (same sums, same order)."""
    if slots.shape[0] != num_tokens * top_k:
        return y.new_zeros(num_tokens, y.shape[-1]).index_add(0, slots // top_k, y)
    where = slots.argsort()  # the row of y that holds each (token, k) slot
    if torch.is_grad_enabled():
        return y[where].view(num_tokens, top_k, y.shape[-1]).sum(1)
    out = y.new_empty(num_tokens, y.shape[-1])
    block = max(1, -(-num_tokens // COMBINE_BLOCKS))
    for start in range(0, num_tokens, block):
        stop = min(num_tokens, start + block)
        out[start:stop] = y[where[start * top_k:stop * top_k]].view(stop - start, top_k, y.shape[-1]).sum(1)
    return out


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    return F.pad(x, (0, 0, 0, rows - x.shape[0]))


class MoE(torch.nn.Module):
    def __init__(self, hidden_size: int, moe_intermediate_size: int, n_routed_experts: int,
                 num_experts_per_tok: int, n_shared_experts: Optional[int], router_config: RouterConfig,
                 expert_parallel: bool, dtype: Optional[torch.dtype] = None,
                 shared_intermediate_size: Optional[int] = None, shared_expert_gate: bool = False):
        """``shared_intermediate_size``: the shared experts' width (default moe_intermediate_size *
        n_shared_experts); ``shared_expert_gate``: Qwen2-MoE's gated ``shared_expert`` instead of DeepSeek's
        ``shared_experts``."""
        super().__init__()
        self.parallel = mpu.context_for()
        self._shared_name = "shared_expert" if shared_expert_gate else "shared_experts"
        if router_config.num_experts != n_routed_experts or router_config.top_k != num_experts_per_tok:
            raise ValueError(f"router_config routes top-{router_config.top_k} of {router_config.num_experts} experts, "
                             f"the MoE has top-{num_experts_per_tok} of {n_routed_experts}")
        self.expert_parallel = expert_parallel
        self.num_experts, self.top_k, self.intermediate_size = n_routed_experts, num_experts_per_tok, moe_intermediate_size
        self.gate = Router(hidden_size, router_config, dtype=dtype)
        shared_size = (moe_intermediate_size * (n_shared_experts or 0) if shared_intermediate_size is None
                       else shared_intermediate_size)
        if expert_parallel:
            self._build_expert_parallel(hidden_size, shared_size, dtype)
        else:
            self._build_tp_sharded(hidden_size, shared_size, dtype)
        self.shared_expert_gate = None
        if shared_expert_gate:
            self.shared_expert_gate = torch.nn.Linear(hidden_size, 1, bias=False, dtype=dtype)
            mark_sequence_parallel(self.shared_expert_gate.weight)
        self._loaded: set = set()  # (expert, projection) pairs read from the checkpoint

    @property
    def shared_experts(self) -> Optional[SharedExperts]:
        """The shared experts (DeepSeek's ``shared_experts``, Qwen2-MoE's ``shared_expert``) or None."""
        return self._modules.get(self._shared_name)

    def _shared_gate(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """sigmoid(shared_expert_gate(x)) [rows, 1], or None without a gate."""
        return torch.sigmoid(self.shared_expert_gate(x)) if self.shared_expert_gate is not None else None

    def _whole_shared(self, x: torch.Tensor) -> torch.Tensor:
        """The (gated) shared experts' complete output on ``x`` (replicated shared experts)."""
        return self.shared_experts(x, scale=self._shared_gate(x))

    def _build_expert_parallel(self, hidden_size: int, shared_size: int, dtype) -> None:
        t, E = self.parallel.size, self.num_experts
        if E % t != 0:
            raise ValueError(f"n_routed_experts ({E}) is not divisible by the tensor-parallel size {t}, needed for "
                             f"expert parallelism; use TP-sharded experts (expert_parallel=False) or a tp size "
                             f"that divides {E}")
        self.local_experts = E // t
        self.first_expert = self.parallel.rank * self.local_experts
        self.experts = GroupedExperts(self.local_experts, hidden_size, self.intermediate_size, dtype)
        for param in self.experts.parameters():  # whole experts: complete gradients on the owner
            param.allreduce, param.expert_parallel = False, True
            # unique to this TP rank (its block of experts, dim 0): counted once per rank in a gradient norm
            param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, 0, 1
            param.tp_rank, param.tp_size = self.parallel.rank, self.parallel.size
        # under its checkpoint name (the ``shared_experts`` property reads it back)
        self._modules[self._shared_name] = SharedExperts(hidden_size, shared_size, dtype) if shared_size else None
        if self.shared_experts is not None:  # replicated, applied to the token shard
            gate_up, down = self.shared_experts.gate_up_proj.weight, self.shared_experts.down_proj.weight
            mark_sequence_parallel(gate_up)
            mark_sequence_parallel(down)
            # whole tensors on every rank (replicas = t); the shard names let the loader place gate and up
            gate_up.partition_dim, gate_up.tp_rank, gate_up.tp_size = 0, self.parallel.rank, self.parallel.size
            gate_up.shards = [Shard("gate", shared_size, shared_size, t), Shard("up", shared_size, shared_size, t)]

    def _build_tp_sharded(self, hidden_size: int, shared_size: int, dtype) -> None:
        t, inter = self.parallel.size, self.intermediate_size
        local = _divide(inter, t, "moe_intermediate_size (TP-sharded experts)")
        self.local_experts, self.first_expert = self.num_experts, 0
        self.experts = GroupedExperts(self.num_experts, hidden_size, local, dtype)
        mark_partitioned(self.experts.gate_up_proj, 1, [Shard("gate", inter, local), Shard("up", inter, local)],
                         self.parallel)
        mark_partitioned(self.experts.down_proj, 2, [Shard(None, inter, local)], self.parallel)
        self._modules[self._shared_name] = SharedExperts(hidden_size, shared_size // t, dtype) if shared_size else None
        if self.shared_experts is not None:
            shared_local = shared_size // t
            mark_partitioned(self.shared_experts.gate_up_proj.weight, 0,
                             [Shard("gate", shared_size, shared_local), Shard("up", shared_size, shared_local)],
                             self.parallel)
            mark_partitioned(self.shared_experts.down_proj.weight, 1, [Shard(None, shared_size, shared_local)],
                             self.parallel)

    # ---- forward ----------------------------------------------------------------------------------

    def forward(self, hidden: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """``hidden``: this rank's token shard (SP on) or all tokens; ``num_tokens``: real tokens in the
        batch. Returns the same layout; padding rows come back zero."""
        p = self.parallel
        sp = p.sequence_parallel_active
        if sp:
            held = max(0, min(hidden.shape[0], num_tokens - p.rank * hidden.shape[0]))
        else:
            held = min(num_tokens, hidden.shape[0])
        ids, weights = self.gate(hidden[:held])
        if not sp and self.expert_parallel and p.deterministic:
            return _pad_rows(self._dispatch_replicated(hidden[:held], ids, weights), hidden.shape[0])
        if sp and self.expert_parallel:
            out = self._dispatch_to_owners(hidden[:held], ids, weights)
            if self.shared_experts is not None:
                out = out + self._whole_shared(hidden[:held])
            return _pad_rows(out, hidden.shape[0])
        if sp:  # mode (a): one g on the hidden state and the routing (padding rows carry no routing)
            partial = self._sharded_experts_on_gathered(hidden, ids, weights, held, num_tokens)
            return mpu.reduce_scatter_to_sp(_pad_rows(partial, hidden.shape[0] * p.size), p)
        # SP off: every rank holds all tokens and routes them identically
        gate = None
        if not self.expert_parallel and self.shared_expert_gate is not None:  # a per-token weight, as the routing's
            gate = mpu.copy_to_tp(self._shared_gate(hidden[:held]), p)
        x, weights = mpu.copy_to_tp(hidden[:held], p), mpu.copy_to_tp(weights, p)
        partial = self._local_experts(x, ids, weights)
        if self.expert_parallel:  # replicated shared experts on replicated tokens: added after the sum
            out = mpu.reduce_from_tp(partial, p)
            if self.shared_experts is not None:
                out = out + self._whole_shared(hidden[:held])
        else:
            if self.shared_experts is not None:
                partial = partial + self.shared_experts(x, scale=gate)
            out = mpu.reduce_from_tp(partial, p)
        return _pad_rows(out, hidden.shape[0])

    def _sort_slots(self, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The (token, k) slots routed to this rank's experts, sorted by expert, and the rows per expert.
        With every expert local (mode a) no step reads data on the host (CUDA-graph safe decode)."""
        expert = ids.reshape(-1).long() - self.first_expert
        if self.local_experts == self.num_experts:
            slots = expert.argsort(stable=True)
        else:
            slots = ((expert >= 0) & (expert < self.local_experts)).nonzero().squeeze(1)
            slots = slots[expert[slots].argsort(stable=True)]
        return slots, count_per_expert(expert[slots], self.local_experts)

    def _local_experts(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Sum over this rank's experts of weight * expert(x) for every token (zero where none is local)."""
        slots, rows = self._sort_slots(ids)
        tokens = slots // self.top_k
        y = self.experts(x[tokens], rows, scale=weights.reshape(-1)[slots])
        return _combine(y, slots, self.top_k, x.shape[0])

    def _sharded_experts_on_gathered(self, hidden, ids, weights, held: int, num_tokens: int) -> torch.Tensor:
        """Mode (a) under SP: one g on [hidden | routing weights | expert ids] of this rank's shard (``held``
        real rows), then routed + shared partial outputs for all ``num_tokens`` tokens, saving only the
        token shard. The gathered tokens are dropped once the input GEMMs have read them."""
        pad = hidden.shape[0] - held
        gathered = [hidden, F.pad(weights, (0, 0, 0, pad)), F.pad(ids.to(torch.int32), (0, 0, 0, pad))]
        if self.shared_expert_gate is not None:  # the shared expert's per-token weight travels with the routing's
            gathered.append(F.pad(self._shared_gate(hidden[:held]), (0, 0, 0, pad)))
        x_all, weights, ids, *gate = mpu.gather_from_sp_packed(*gathered, parallel=self.parallel)
        weights, ids = weights[:num_tokens], ids[:num_tokens]
        slots, rows = self._sort_slots(ids)
        tokens = slots // self.top_k
        shared = self.shared_experts.gate_up_proj.weight if self.shared_experts is not None else None
        h_routed, h_shared = _ExpertInputGEMMs.apply(x_all[:num_tokens], hidden, tokens, rows,
                                                     self.experts.gate_up_proj, shared, self.parallel)
        del x_all  # the largest buffer SP adds; nothing below reads it (backward re-gathers the shard)
        y = self.experts.activate_and_down(h_routed, rows, scale=weights.reshape(-1)[slots])
        del h_routed
        out = _combine(y, slots, self.top_k, num_tokens)
        del y
        if shared is None:
            return out
        return out + self.shared_experts.activate_and_down(h_shared, scale=gate[0][:num_tokens] if gate else None)

    def _dispatch_replicated(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Mode (b), SP off, deterministic: each rank dispatches its SP share of the replicated tokens, as
        under SP, and the results are gathered, so that a token's k expert outputs are summed in top-k order
        whether SP is on or off (summing each rank's local experts, then the partials over TP, rounds
        differently: sglang switches SP per batch, Megatron does not). The gradients stay those of SP off:
        the router and the shared experts run on every token; the scatter's backward gathers the rest."""
        p = self.parallel
        num_tokens, t = x.shape[0], p.size
        share = mpu.padded_length(num_tokens, p) // t
        mine = max(0, min(share, num_tokens - p.rank * share))
        x_share = mpu.scatter_to_sp(mpu.pad_to_multiple(x, parallel=p), p)[:mine]
        weights_share = mpu.scatter_to_sp(mpu.pad_to_multiple(weights, parallel=p), p)[:mine]
        ids_share = mpu.pad_to_multiple(ids, parallel=p)[p.rank * share:][:mine]
        routed = self._dispatch_to_owners(x_share, ids_share, weights_share)
        out = mpu.gather_to_replicated(_pad_rows(routed, share), p)[:num_tokens]
        return out + self._whole_shared(x) if self.shared_experts is not None else out

    def _dispatch_to_owners(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Mode (b) under SP: this rank's token rows go to their experts' owners and come back."""
        p = self.parallel
        t, per_rank = p.size, self.local_experts
        expert = ids.reshape(-1)
        slots = expert.argsort(stable=True)  # by expert, hence by owner rank
        sent_per_expert = count_per_expert(expert, self.num_experts)
        got_per_expert = collectives.all_to_all(p, sent_per_expert, [per_rank] * t, [per_rank] * t).view(t, per_rank)
        send_rows = sent_per_expert.view(t, per_rank).sum(1).tolist()
        recv_rows = got_per_expert.sum(1).tolist()
        received = mpu.all_to_all_tp(x[slots // self.top_k], send_rows, recv_rows, p)
        # the routing weights travel too and scale the activations on the owner, as in mode (a): the
        # combine then saves no [rows, H] expert output for the weights' gradient
        received_weights = mpu.all_to_all_tp(weights.reshape(-1, 1)[slots], send_rows, recv_rows, p)
        # received: per source rank, rows grouped by local expert -> regroup by local expert
        local_expert = torch.arange(per_rank, device=x.device).repeat(t).repeat_interleave(got_per_expert.reshape(-1))
        by_expert = local_expert.argsort(stable=True)
        # each [rows, H] buffer is released as soon as the next one exists (prefill keeps at most two)
        received = received[by_expert]
        y = self.experts(received, got_per_expert.sum(0), scale=received_weights[by_expert, 0])
        del received
        y = y[by_expert.argsort()]
        back = mpu.all_to_all_tp(y, recv_rows, send_rows, p)
        del y
        return _combine(back, slots, self.top_k, x.shape[0])

    # ---- checkpoint hooks (keys relative to ``mlp.experts.``) -----------------------------------------

    def load_expert_tensor(self, key: str, tensor: torch.Tensor) -> None:
        """Keep this rank's part of a routed-expert tensor: per expert ``{e}.{gate,up,down}_proj.weight``
        or fused ``gate_up_proj`` [E, 2I, H] / ``down_proj`` [E, H, I]."""
        I = self.intermediate_size
        if key in ("gate_up_proj", "down_proj"):
            want = (self.num_experts, 2 * I, None) if key == "gate_up_proj" else (self.num_experts, None, I)
            if tensor.dim() != 3 or any(w is not None and s != w for s, w in zip(tensor.shape, want)):
                raise ValueError(f"experts.{key}: shape {tuple(tensor.shape)}, expected [E={want[0]}, "
                                 f"{want[1] or 'H'}, {want[2] or 'H'}]")
            for e in range(self.num_experts):
                if key == "gate_up_proj":
                    self._load_one(e, "gate", tensor[e, :I])
                    self._load_one(e, "up", tensor[e, I:])
                else:
                    self._load_one(e, "down", tensor[e])
            return
        match = _PER_EXPERT.fullmatch(key)
        if not match or int(match.group(1)) >= self.num_experts:
            raise KeyError(f"experts.{key}: not a routed-expert tensor of this {self.num_experts}-expert MoE")
        self._load_one(int(match.group(1)), match.group(2), tensor)

    def _load_one(self, expert: int, projection: str, full: torch.Tensor) -> None:
        down = projection == "down"
        want = (self.experts.down_proj.shape[1], self.intermediate_size) if down else \
            (self.intermediate_size, self.experts.gate_up_proj.shape[2])
        if tuple(full.shape) != want:
            raise ValueError(f"experts.{expert}.{projection}_proj.weight: shape {tuple(full.shape)}, expected {list(want)}")
        self._loaded.add((expert, projection))
        local = expert - self.first_expert
        if not 0 <= local < self.local_experts:
            return  # another rank's expert (mode b)
        width = self.experts.down_proj.shape[2]  # this rank's intermediate slice
        piece = full.narrow(int(down), (0 if self.expert_parallel else self.parallel.rank * width), width)
        with torch.no_grad():
            if down:
                self.experts.down_proj[local].copy_(piece)
            else:
                start = 0 if projection == "gate" else width
                self.experts.gate_up_proj[local, start:start + width].copy_(piece)

    def missing_expert_tensors(self) -> List[str]:
        return [f"{e}.{p}_proj.weight" for e in range(self.num_experts) for p in _PROJECTIONS
                if (e, p) not in self._loaded]

    def export_expert_tensors(self, grads: bool = False, to_first: bool = False) -> Optional[Dict[str, torch.Tensor]]:
        """Full per-expert tensors (or gradients) under HF names; collective: every TP rank calls it.
        ``to_first``: gathered onto TP rank 0 only (None elsewhere), for an export that one rank writes."""
        def values(param):
            if not grads:
                return param.detach()
            grad = getattr(param, "main_grad", None)  # Megatron's DDP accumulates there
            grad = param.grad if grad is None else grad
            return grad if grad is not None else torch.zeros_like(param)

        gate_up, down = self.experts.gate_up_proj, self.experts.down_proj
        I = self.intermediate_size
        if self.expert_parallel:
            gather = collectives.gather_to_first if to_first else collectives.all_gather
            full_gate_up = gather(self.parallel, values(gate_up).contiguous())
            full_down = gather(self.parallel, values(down).contiguous())
            if full_gate_up is None:
                return None
            parts = {"gate": full_gate_up[:, :I], "up": full_gate_up[:, I:], "down": full_down}
        else:
            gather = gather_full_to_first if to_first else gather_full
            pieces = gather(gate_up, values(gate_up), self.parallel)
            down_full = gather(down, values(down), self.parallel)
            if pieces is None:
                return None
            parts = {"gate": pieces["gate"], "up": pieces["up"], "down": down_full[None]}
        return {f"{e}.{p}_proj.weight": parts[p][e].contiguous().cpu()
                for e in range(self.num_experts) for p in _PROJECTIONS}

    def expert_tensor_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """HF name (relative to ``mlp.experts.``) -> full shape of every routed-expert tensor (no communication)."""
        hidden, inter = self.experts.gate_up_proj.shape[2], self.intermediate_size
        return {f"{e}.{p}_proj.weight": ((hidden, inter) if p == "down" else (inter, hidden))
                for e in range(self.num_experts) for p in _PROJECTIONS}
