"""The dashboard with an API key, in a real browser against a real cluster of the fake engine:
the page asks for the key once, the data routes refuse requests without it, engine restarts
show on the cards, and a worker whose heartbeats stop turns dead within the timeout."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator

import httpx
import pytest
from browser import Tab, chromium, open_tab
from local_cluster import API_KEY, REAL_MODEL, LocalCluster, start_cluster

from processes import wait_for


@pytest.fixture(scope="module")
def browser():
    yield from chromium()


@pytest.fixture(scope="module")
def keyed_cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    cluster = start_cluster(tmp_path_factory.mktemp("dashboard-keyed"), api_key=API_KEY)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def keyed_tab(browser, keyed_cluster) -> Iterator[Tab]:
    with open_tab(browser, keyed_cluster.url) as tab:
        yield tab


def test_with_an_api_key_the_page_asks_for_it_and_the_data_is_refused(keyed_tab, keyed_cluster):
    for path in ("/cluster", "/dashboard/events"):
        assert httpx.get(keyed_cluster.url + path, timeout=5).status_code == 401, path
    keyed_tab.expect("#auth").to_be_visible()
    keyed_tab.expect(".card").to_have_count(0)
    submit_key(keyed_tab, "not-the-key")
    keyed_tab.expect("#auth").to_be_visible()
    keyed_tab.expect("#auth-message").to_contain_text("wrong API key")
    submit_key(keyed_tab, API_KEY)
    keyed_tab.expect("#auth").to_be_hidden()
    keyed_tab.expect(".card[data-state=ready]").to_have_count(2)
    keyed_tab.page.reload()  # asked once: the tab keeps the key
    keyed_tab.expect(".card[data-state=ready]").to_have_count(2)
    keyed_tab.expect("#auth").to_be_hidden()


def submit_key(tab: Tab, key: str) -> None:
    tab.page.fill("#api-key", key)
    tab.page.click("#auth-form button[type=submit]")


def test_engine_restarts_show_on_the_cards(keyed_tab, keyed_cluster):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": REAL_MODEL, "prompt": "__crash__", "max_tokens": 4}  # the engine exits
    httpx.post(keyed_cluster.url + "/v1/completions", json=body, headers=headers, timeout=30)
    keyed_cluster.wait_state("ready", 30)
    keyed_tab.expect(".card[data-state=ready]").to_have_count(2)
    for i in range(2):
        keyed_tab.expect(f".card >> nth={i}").to_contain_text(re.compile(r"\b1 restart(?!s)"))


def test_a_worker_without_heartbeats_turns_dead_and_the_cluster_degraded(keyed_tab, keyed_cluster):
    keyed_tab.expect(".card[data-state=ready]").to_have_count(2)
    limit = keyed_cluster.cluster()["heartbeat_timeout_seconds"] + 2
    page, agent = keyed_tab.page, keyed_cluster.procs["agent1"]

    def shown_dead() -> bool:
        dead = page.locator(".card[data-state=dead]")
        state = page.get_attribute("#cluster-state", "data-state")
        return dead.count() == 1 and dead.get_attribute("data-rank") == "1" and state == "degraded"

    os.kill(agent.pid, signal.SIGSTOP)  # the agent, not its engine: only heartbeats stop
    try:
        wait_for(shown_dead, limit, "the page to show rank 1 dead and the cluster degraded")
    finally:
        os.kill(agent.pid, signal.SIGCONT)
    assert page.locator("#cluster-state").inner_text() == "degraded"
