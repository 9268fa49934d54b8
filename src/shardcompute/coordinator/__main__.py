"""`python -m shardcompute.coordinator`: the same as `shardcompute coordinator`."""

import sys

from shardcompute.coordinator.cli import coordinator_main

sys.exit(coordinator_main())
