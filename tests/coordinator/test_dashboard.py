"""The dashboard in a real browser (Debian's headless Chromium, driven by Playwright) against a
real cluster on loopback: two worker agents running the real engine on SmolLM2. The page
shows the workers and the uneven plan, chats like the API, stops a reply on the server, and
keeps the traffic history for a page opened later. test_dashboard_keyed.py: the API key and
a lost worker."""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from browser import Tab, chromium, open_tab
from local_cluster import REAL_MODEL, LocalCluster, start_real_cluster

from processes import wait_for

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "docs" / "dashboard.png"
UPDATE_SCREENSHOT_ENV = "SHARDCOMPUTE_UPDATE_SCREENSHOT"  # =1: the test refreshes docs/
QUESTIONS = ["What is the capital of France?", "And of Italy?"]
LONG_QUESTION = "Count from 1 to 300, one number per line."


@pytest.fixture(scope="module")
def browser():
    yield from chromium()


# --- the real cluster: page, plan, chat, traffic ---------------------------------------------


@pytest.fixture(scope="module")
def real_cluster(tmp_path_factory, smollm2_gguf) -> Iterator[LocalCluster]:
    cluster = start_real_cluster(tmp_path_factory.mktemp("dashboard-real"), smollm2_gguf)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def tab(browser, real_cluster) -> Iterator[Tab]:
    """One page on the real cluster, kept open across its tests like a user's tab."""
    with open_tab(browser, real_cluster.url) as tab:
        yield tab


def api_answer(cluster: LocalCluster, messages: list[dict]) -> str:
    """The API's greedy answer to a conversation, with no max_tokens, as the page sends it."""
    body = {"model": REAL_MODEL, "messages": messages, "temperature": 0}
    r = httpx.post(cluster.url + "/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def ask(tab: Tab, question: str) -> None:
    tab.page.fill("#chat-input", question)
    tab.page.press("#chat-input", "Enter")


def test_page_shows_two_ready_workers_and_the_uneven_plan(tab, real_cluster):
    tab.expect(".card[data-state=ready]").to_have_count(2, timeout=10_000)
    tab.expect("#cluster-state").to_have_attribute("data-state", "ready")
    tab.expect("#cluster-model").to_contain_text(f"{REAL_MODEL} · float32 · ring")
    cards = tab.page.locator(".card")
    assert sorted(cards.evaluate_all("cs => cs.map(c => c.dataset.rank)")) == ["0", "1"]
    for i in range(2):
        text = cards.nth(i).inner_text()
        assert re.search(r"memory\s+[\d.]+ \w+ of [\d.]+ GiB", text), text
        assert re.search(r"heartbeat\s+\d+\.\d s ago", text) and "0 restarts" in text, text
    # SmolLM2 has 3 KV heads (9 query heads): at world size 2 the split is 2+1 (6+3).
    assert plan_sizes(tab, "kv_heads") == [2, 1]
    assert plan_sizes(tab, "heads") == [6, 3]
    assert plan_sizes(tab, "vocab") == [24576, 24576]
    widths = plan_widths(tab, "kv_heads")
    assert 1.7 < widths[0] / widths[1] < 2.3, f"bars not drawn 2:1: {widths}"
    tab.expect("#collectives").to_contain_text("62 collectives per token")  # 2 * 30 layers + 2
    assert tab.errors == []


def plan_sizes(tab: Tab, dimension: str) -> list[int]:
    segments = tab.page.locator(f".plan-row[data-dimension={dimension}] .segment")
    return [int(s) for s in segments.evaluate_all("ss => ss.map(s => s.dataset.size)")]


def plan_widths(tab: Tab, dimension: str) -> list[float]:
    segments = tab.page.locator(f".plan-row[data-dimension={dimension}] .segment")
    return segments.evaluate_all("ss => ss.map(s => s.getBoundingClientRect().width)")


def rank0_steps(cluster: LocalCluster) -> int:
    return next(w for w in cluster.cluster()["workers"] if w["rank"] == 0)["metrics"]["steps"]


def test_stop_ends_a_long_answer_and_frees_the_slot(tab, real_cluster):
    before = rank0_steps(real_cluster)
    tab.page.click("#chat-settings summary")  # open the settings
    tab.page.fill("#chat-max-tokens", "600")  # far past where we stop it
    try:
        ask(tab, LONG_QUESTION)
        reply = tab.page.locator(".message.assistant").last
        # Streaming: text shows while the reply is still coming.
        wait_for(lambda: len(reply.locator(".text").inner_text()) > 12, 60, "streamed text")
        assert reply.get_attribute("data-status") == "streaming"
        tab.page.click("#chat-stop")
        tab.expect(".message.assistant >> nth=-1").to_have_attribute("data-status", "stopped")
    finally:
        tab.page.fill("#chat-max-tokens", "")
    free = lambda: (v := real_cluster.cluster())["in_flight"] == 0 and v["queue_depth"] == 0  # noqa: E731
    wait_for(free, 10, "the server to free the stopped request's slot")
    # The engine reports its steps when a request ends; uncancelled, this one runs 600.
    wait_for(lambda: rank0_steps(real_cluster) > before, 30, "the engine to end the request")
    assert rank0_steps(real_cluster) - before < 600
    assert tab.page.is_disabled("#chat-stop") and not tab.page.is_disabled("#chat-send")
    assert tab.errors == []


def test_chat_answers_like_the_api_over_two_turns(tab, real_cluster):
    tab.page.click("#chat-reset")  # a new conversation, without the stopped one
    messages: list[dict] = []
    for turn, question in enumerate(QUESTIONS):
        ask(tab, question)
        reply = tab.page.locator(".message.assistant").nth(turn)
        tab.expect(f".message.assistant >> nth={turn}").to_have_attribute(
            "data-status", "done", timeout=120_000
        )
        messages.append({"role": "user", "content": question})
        expected = api_answer(real_cluster, messages)
        assert reply.locator(".text").inner_text() == expected
        stats = reply.locator(".stats").inner_text()
        assert re.fullmatch(r"\d+ tokens, [\d.]+ tok/s, first token [\d.]+ s", stats), stats
        messages.append({"role": "assistant", "content": expected})
    assert "Rome" in messages[-1]["content"], "the second turn should use the first as context"
    assert tab.errors == []


def test_traffic_charts_hold_the_history_for_a_page_opened_later(browser, real_cluster):
    with open_tab(browser, real_cluster.url) as later:  # opened after the requests above

        def chart_max(chart: str, series: str) -> float:
            path = later.page.locator(f"[data-chart={chart}] path[data-series={series}]")
            return float(path.get_attribute("data-max") or 0)

        later.expect("[data-chart=throughput] path[data-series=tokens_per_second]").to_have_count(1)
        wait_for(lambda: chart_max("throughput", "tokens_per_second") > 0, 10, "tok/s points")
        assert chart_max("ttft", "ttft_p50") > 0 and chart_max("ttft", "ttft_p90") > 0
        assert chart_max("itl", "itl_p50") > 0
        assert later.errors == []


def test_the_time_in_collectives_is_sampled_while_serving(tab, real_cluster):
    """Every rank times its collectives in one decode step of a hundred: after a few hundred
    tokens /cluster and the page show it per rank (a share of the step, not zero)."""
    body = {"model": REAL_MODEL, "prompt": "1, 2, 3,", "max_tokens": 220, "temperature": 0}
    r = httpx.post(real_cluster.url + "/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text

    def sampled() -> list[dict] | None:  # the engines report every second or so
        metrics = [w["metrics"] for w in real_cluster.cluster()["workers"]]
        return metrics if all(m["profiled_steps"] >= 2 for m in metrics) else None

    for m in wait_for(sampled, 10, "two sampled steps on each rank"):
        assert m["profiled_steps"] >= 2 and m["steps"] >= 100 * m["profiled_steps"], m
        assert 0 < m["collective_seconds"] < m["profiled_step_seconds"], m
    tab.expect("#collectives").to_contain_text("share of the step", timeout=10_000)
    tab.expect("#collectives tr").to_have_count(3)  # a header and one row per rank


def test_screenshot_of_a_serving_cluster_is_in_the_readme(tab, tmp_path):
    tab.expect(".message.assistant[data-status=done]").to_have_count(len(QUESTIONS))
    time.sleep(1.5)  # one more traffic sample, so the charts end at "now"
    shot = tmp_path / "dashboard.png"
    tab.page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    if os.environ.get(UPDATE_SCREENSHOT_ENV) == "1":
        shutil.copyfile(shot, SCREENSHOT)
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{SCREENSHOT} is not a PNG"
    readme = (REPO / "README.md").read_text()
    assert "](docs/dashboard.png)" in readme, "README.md does not show docs/dashboard.png"
