#!/usr/bin/env python
"""Start the coordinator: scripts/start_coordinator.py --host H --port P --config FILE."""

import sys

from shardcompute.coordinator.cli import coordinator_main

sys.exit(coordinator_main())
