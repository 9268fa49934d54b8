#!/usr/bin/env python
"""Start a worker agent: scripts/start_worker.py --rank R --coordinator-url URL --port P
--shard-dir DIR."""

import sys

from shardcompute.worker.agent import worker_main

sys.exit(worker_main())
