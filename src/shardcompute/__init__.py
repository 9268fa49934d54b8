"""ShardCompute: Megatron-style tensor parallelism for Llama-family models on MLX."""

from shardcompute._blas import preload_blas

__version__ = "0.1.0"

# Must run before anything imports mlx.core; every submodule import runs this file first.
preload_blas()
