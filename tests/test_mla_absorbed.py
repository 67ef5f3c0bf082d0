"""MLA's absorbed form (serving over a latent cache) equals its expanded form, single process, float32:
both with and without q_lora, against the same weights. The latent kernel here is plain causal attention
over the rows [kv_lat | k_pe] (one key head; values = kv_lat), the math sglang's MLA backends compute."""
import pytest
import torch

from sp_core import mpu
from sp_core.layers.attention import PackedBatch, packed_causal_attention
from sp_core.layers.mla import CachedSequences, LatentAttentionKernel, MultiHeadLatentAttention


class PackedLatentKernel(LatentAttentionKernel):
    def __init__(self, kv_lora_rank):
        super().__init__()
        self.kv_lora_rank = kv_lora_rank

    def forward(self, q, row, batch, scale, topk_indices=None):
        return packed_causal_attention(q, row.unsqueeze(1), row[:, : self.kv_lora_rank].unsqueeze(1), batch,
                                       scale=scale)


@pytest.fixture(autouse=True)
def single_process():
    mpu.bind(None)  # one rank, no group
    yield
    mpu.destroy()


@pytest.mark.parametrize("q_lora_rank", [24, None])
@pytest.mark.parametrize("absorb", [False, True])
def test_absorbed_equals_expanded(q_lora_rank, absorb):
    torch.manual_seed(0)
    mla = MultiHeadLatentAttention(64, 4, q_lora_rank, 16, 16, 8, 12, 0.2, 10000.0)
    with torch.no_grad():
        for p in mla.parameters():
            p.normal_(0, 0.3)
    torch.manual_seed(0)  # the same weights, through the latent kernel given to the constructor
    latent = MultiHeadLatentAttention(64, 4, q_lora_rank, 16, 16, 8, 12, 0.2, 10000.0, kernel=PackedLatentKernel(16))
    latent.load_state_dict(mla.state_dict())
    assert latent.absorbed and not mla.absorbed
    hidden, positions, batch = torch.randn(11, 64), torch.tensor([0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 4]), PackedBatch([5, 1, 5])
    with torch.no_grad():
        expanded = mla(hidden, positions, batch)
        mla = latent
        if absorb:
            mla.absorb()
        absorbed = mla(hidden, positions, batch)
        mla.kv_b_proj.weight.mul_(1.5)  # negative control: a stale W_UK / W_UV (absorb() before a change) differs
        if absorb:
            assert (mla(hidden, positions, batch) - absorbed).abs().max() == 0
    assert (absorbed - expanded).abs().max().item() <= 1e-5
    assert expanded.abs().max().item() > 1e-2


class CachingLatentKernel(LatentAttentionKernel):
    """A server's cache, as sglang's kernel keeps it in the deterministic mode: rows ``[kv_lat | k_pe]`` per
    request; a batch is a list of (request, new tokens). ``cached_sequences`` stores the new rows and hands
    each request's whole sequence back; with ``expand`` False the kernel attends in the absorbed form."""

    def __init__(self, kv_lora_rank, expand):
        super().__init__()
        self.kv_lora_rank, self.expand, self.rows = kv_lora_rank, expand, {}

    def _store(self, row, batch):
        start = 0
        for request, new in batch:
            self.rows[request] = torch.cat([self.rows.get(request, row[:0]), row[start:start + new]])
            start += new

    def cached_sequences(self, row, batch):
        if not self.expand:
            return None
        self._store(row, batch)
        sequences = [self.rows[request] for request, _ in batch]
        lens = [s.shape[0] for s in sequences]
        query_rows, start = [], 0
        for (request, new), total in zip(batch, lens):
            query_rows.append(torch.arange(start + total - new, start + total))
            start += total
        return CachedSequences(torch.cat(sequences), lens, torch.cat(query_rows))

    def forward(self, q, row, batch, scale, topk_indices=None):
        self._store(row, batch)
        outs, start = [], 0
        for request, new in batch:
            rows = self.rows[request]
            q_rows = torch.cat([q.new_zeros((rows.shape[0] - new,) + q.shape[1:]), q[start:start + new]])
            out = packed_causal_attention(q_rows, rows.unsqueeze(1), rows[:, : self.kv_lora_rank].unsqueeze(1),
                                          PackedBatch([rows.shape[0]]), scale=scale)
            outs.append(out[-new:])
            start += new
        return torch.cat(outs)


def test_cached_sequences_give_the_expanded_form_bit_for_bit():
    """The deterministic mode's serving path (``cached_sequences``): a request's second prefill chunk (over a
    cached prefix of 6 tokens), batched with another request and SP padding, gives torch.equal outputs to the
    expanded form (training's) over each whole sequence alone; the first chunk is a sequence of its own.
    Negative control: the absorbed form over the same cache is close but not bit-equal."""
    from sp_core.kernels import batch_invariant

    torch.manual_seed(0)
    mla = MultiHeadLatentAttention(64, 4, 24, 16, 16, 8, 12, 0.2, 10000.0)
    with torch.no_grad():
        for p in mla.parameters():
            p.normal_(0, 0.3)
    served = {}
    for expand in (True, False):
        torch.manual_seed(0)
        serving = MultiHeadLatentAttention(64, 4, 24, 16, 16, 8, 12, 0.2, 10000.0,
                                           kernel=CachingLatentKernel(16, expand))
        serving.load_state_dict(mla.state_dict())
        served[expand] = serving
    a, b = torch.randn(11, 64), torch.randn(5, 64)
    with torch.no_grad(), batch_invariant.gemms(True):
        alone_a = mla(a, torch.arange(11), PackedBatch([11]))
        alone_b = mla(b, torch.arange(5), PackedBatch([5]))
        # a causal attention row of a 6-token sequence is not bit-equal to the same row of 11 tokens (torch's
        # CPU attention, measured): the first chunk's reference is its own sequence
        alone_a = torch.cat([mla(a[:6], torch.arange(6), PackedBatch([6])), alone_a[6:]])
        outs = {}
        for expand, serving in served.items():
            first = serving(a[:6], torch.arange(6), [("a", 6)])
            # the rest of a (cached prefix of 6) and all of b in one batch, plus a row of SP padding
            rest = serving(torch.cat([a[6:], b, b[:1]]), torch.cat([torch.arange(6, 11), torch.arange(5), torch.zeros(1, dtype=torch.long)]),
                           [("a", 5), ("b", 5)])
            outs[expand] = torch.cat([first, rest[:5]]), rest[5:10]
    assert torch.equal(outs[True][0], alone_a) and torch.equal(outs[True][1], alone_b)
    assert not (torch.equal(outs[False][0], alone_a) and torch.equal(outs[False][1], alone_b)), \
        "negative control: the absorbed form came out bit-equal to the expanded form"
    torch.testing.assert_close(outs[False][0], alone_a, rtol=1e-5, atol=1e-5)
