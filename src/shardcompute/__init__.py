"""ShardCompute: Megatron-style tensor parallelism for Llama-family models on MLX.

Importing the package has no side effects: processes that compute import
`shardcompute.rank_setup` first (see `runtime`).
"""

__version__ = "0.1.0"
