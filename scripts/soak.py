#!/usr/bin/env python
"""Soak a running cluster with mixed requests; see shardcompute.bench.soak."""

import sys

from shardcompute.bench.soak import soak_main

sys.exit(soak_main())
