"""Rank processes ask for transparent huge pages through glibc's malloc tunable: set in the
environment their launchers build, and taken up by a real child's heap."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from shardcompute.engine.launch import rank_env
from shardcompute.runtime import HUGE_PAGES_TUNABLE, with_huge_pages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

# A child that fills 64 MiB of malloc'd memory (or, with "madvise" as its argument, of an
# mmap it madvises itself: the control) and reports its huge pages.
CHILD = """
import ctypes, mmap, re, sys
libc = ctypes.CDLL("libc.so.6")
n = 64 << 20
if sys.argv[1:] == ["madvise"]:
    m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # shared: not anon THP
    m.madvise(mmap.MADV_HUGEPAGE)
    m.write(b"\\1" * n)
else:
    libc.malloc.restype = ctypes.c_void_p
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
text = open("/proc/self/smaps_rollup").read()
print(re.search(r"AnonHugePages:\\s+(\\d+) kB", text).group(1))
"""


def test_the_tunable_joins_what_is_there():
    assert with_huge_pages({})["GLIBC_TUNABLES"] == HUGE_PAGES_TUNABLE
    env = with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "1"})
    assert env == {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{HUGE_PAGES_TUNABLE}", "A": "1"}
    mine = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}  # the user's choice stands
    assert with_huge_pages(mine) == mine
    off = {"SHARDCOMPUTE_HUGE_PAGES": "0"}
    assert with_huge_pages(off) == off


def huge_kib(env: dict[str, str], *args: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


@pytest.mark.skipif(
    not THP.exists() or "[madvise]" not in THP.read_text(),
    reason="needs transparent huge pages in madvise mode (always: every process has them)",
)
def test_a_rank_heap_gets_huge_pages_and_the_switch_turns_them_off():
    on = rank_env(2, rank=0, hostfile=Path("hosts.json"))
    off = rank_env(2, rank=0, hostfile=Path("hosts.json"), base={"SHARDCOMPUTE_HUGE_PAGES": "0"})
    assert re.search(r"hugetlb=1", on["GLIBC_TUNABLES"]) and "GLIBC_TUNABLES" not in off
    if huge_kib(off, "madvise") < 32 << 10:
        pytest.skip("the kernel gives no huge pages even to an madvised mapping right now")
    assert huge_kib(on) >= 32 << 10  # most of the 64 MiB
    assert huge_kib(off) == 0
