"""The keeper `up` uses: a coordinator that dies is started again with the same command and
the same log (appended), in place, so stopping the children stops the new one; one that keeps
dying is given up on with its log's tail."""

import os
import signal
import sys

import pytest

from processes import alive, child_env, wait_for
from shardcompute.coordinator.children import CoordinatorKeeper, spawn
from shardcompute.errors import ShardComputeError


def test_a_killed_child_is_started_again_in_place(tmp_path):
    cmd = [sys.executable, "-c", "import os, time; print('started', os.getpid(), flush=True); "
           "time.sleep(60)"]  # fmt: skip
    child = spawn("coordinator", cmd, child_env(), tmp_path / "c.log")
    said = []
    keeper = CoordinatorKeeper(child, said.append)
    keeper.start()
    try:
        first = child.proc.pid
        wait_for(lambda: "started" in child.log.read_text(), 10, "the first start")
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: child.proc.pid != first and alive(child.proc.pid), 10, "a restart")
        wait_for(lambda: child.log.read_text().count("started") == 2, 10, "its log line")
        assert keeper.restarts == 1 and said == [
            "the coordinator exited with code -9; starting it again on the same port"
        ]
        keeper.check()
    finally:
        keeper.stop()
        child.proc.kill()
        child.proc.wait(5)


def test_a_child_that_keeps_dying_is_given_up_on(tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('bad config'); sys.exit(3)"]
    child = spawn("coordinator", cmd, child_env(), tmp_path / "c.log")
    keeper = CoordinatorKeeper(child, lambda _: None, max_deaths=3, window_seconds=60)
    keeper.start()
    try:
        wait_for(lambda: keeper.failure, 30, "the keeper to give up")
    finally:
        keeper.stop()
    assert keeper.restarts == 2
    gave_up = "(?s)exited 3 times within 60s .*code 3.*bad config"
    with pytest.raises(ShardComputeError, match=gave_up):
        keeper.check()
