"""Tensor parallelism: layers whose weight matrices are cut across the ranks of a group, and the
conjugate autograd mappings beneath them (Megatron-LM's scheme).

    from dtrain.parallel.tensor import ColumnParallelLinear, RowParallelLinear, vocab_parallel_cross_entropy
"""

from dtrain.parallel.tensor.blocks import ParallelMLP, ParallelSelfAttention
from dtrain.parallel.tensor.cross_entropy import vocab_parallel_cross_entropy
from dtrain.parallel.tensor.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from dtrain.parallel.tensor.mappings import copy_to_region, gather_from_region, reduce_from_region, scatter_to_region

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "ParallelMLP",
           "ParallelSelfAttention", "vocab_parallel_cross_entropy", "copy_to_region", "reduce_from_region",
           "scatter_to_region", "gather_from_region"]
