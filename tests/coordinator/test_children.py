"""The keeper `up` uses: a coordinator that dies is started again with the same command and
the same log (appended), in place, so stopping the children stops the new one, however often
it is killed; one that keeps failing to start is given up on with its log's tail."""

import os
import signal
import sys

import pytest

from processes import alive, child_env, wait_for
from shardcompute.coordinator.children import CoordinatorKeeper, spawn
from shardcompute.errors import ShardComputeError


def test_a_killed_child_is_started_again_in_place_every_time(tmp_path):
    cmd = [sys.executable, "-c", "import os, time; print('started', os.getpid(), flush=True); "
           "time.sleep(60)"]  # fmt: skip
    child = spawn("coordinator", cmd, child_env(), tmp_path / "c.log")
    said = []
    keeper = CoordinatorKeeper(child, said.append)
    keeper.start()
    try:
        for kills in range(1, 5):  # more than max_failed_starts: kills are not failed starts
            pid = child.proc.pid
            wait_for(lambda n=kills: child.log.read_text().count("started") == n, 10, "a start")
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda p=pid: child.proc.pid != p and alive(child.proc.pid), 10, "a restart")
        assert keeper.restarts == 4 and said == 4 * [
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
    keeper = CoordinatorKeeper(child, lambda _: None, max_failed_starts=3)
    keeper.start()
    try:
        wait_for(lambda: keeper.failure, 30, "the keeper to give up")
    finally:
        keeper.stop()
    assert keeper.restarts == 2
    gave_up = "(?s)failed to start 3 times in a row .*code 3.*bad config"
    with pytest.raises(ShardComputeError, match=gave_up):
        keeper.check()
