from sp_core.layers.attention import PackedBatch, SelfAttention, packed_causal_attention
from sp_core.layers.decoder import DecoderLayer
from sp_core.layers.indexer import LightningIndexer
from sp_core.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from sp_core.layers.mlp import SwiGLUMLP
from sp_core.layers.moe import MoE
from sp_core.layers.norm import LayerNorm, RMSNorm
from sp_core.layers.router import RouterConfig
from sp_core.layers.vocab import ParallelLMHead, VocabParallelEmbedding, gather_vocab, vocab_parallel_cross_entropy
