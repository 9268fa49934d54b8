"""Imported first by every process that computes (rank entry points, the test suite), before
anything imports mlx.core: on the CPU it loads the fast BLAS (see `runtime.prepare_process`).
`import shardcompute` alone does nothing; the control plane never imports this."""

from shardcompute.runtime import prepare_process

BLAS = prepare_process()
