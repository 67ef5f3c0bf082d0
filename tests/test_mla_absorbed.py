"""MLA's absorbed form (serving over a latent cache) equals its expanded form, single process, float32:
both with and without q_lora, against the same weights. The latent kernel here is plain causal attention
over the rows [kv_lat | k_pe] (one key head; values = kv_lat), the math sglang's MLA backends compute."""
import pytest
import torch

from sp_core import mpu
from sp_core.layers.attention import PackedBatch, packed_causal_attention
from sp_core.layers.mla import LatentAttentionKernel, MultiHeadLatentAttention


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
