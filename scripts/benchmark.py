#!/usr/bin/env python
"""Benchmark a running cluster over HTTP; see shardcompute.bench.http_bench."""

import sys

from shardcompute.bench.http_bench import bench_main

sys.exit(bench_main())
