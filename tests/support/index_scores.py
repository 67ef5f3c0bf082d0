"""transformers' DSA index scores, written out so that tests can read their margins and differentiate them."""
import torch
import torch.nn.functional as F


# transformers' index-score math (DeepseekV32Indexer.forward, which runs under no-grad and returns only
# the top-k), written out on its own modules so that it can be differentiated and its margins read
def hf_index_scores(indexer, hidden, q_resid, cos, sin):
    """[S, S] scores of one sequence (-inf above the diagonal); hidden [S, H], q_resid [S, q_lora]."""
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import apply_rotary_pos_emb

    s, r = hidden.shape[0], indexer.qk_rope_head_dim
    q = indexer.wq_b(q_resid).view(s, indexer.n_heads, indexer.head_dim)
    k = indexer.k_norm(indexer.wk(hidden)).unsqueeze(1)
    q_rot, k_rot = apply_rotary_pos_emb(q[..., :r], k[..., :r], cos, sin, unsqueeze_dim=1)
    q, k = torch.cat([q_rot, q[..., r:]], -1), torch.cat([k_rot, k[..., r:]], -1).squeeze(1)
    logits = F.relu(torch.einsum("shd,td->sht", q.float(), k.float()) * indexer.softmax_scale)
    weights = indexer.weights_proj(hidden.float()).float() * indexer.n_heads ** -0.5
    scores = torch.einsum("sh,sht->st", weights, logits)
    return scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
