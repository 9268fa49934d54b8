"""Schemathesis hooks for test_bad_input.py (loaded through $SCHEMATHESIS_HOOKS).

Generated requests keep their shape, but a completion is capped at a few tokens, so a fuzzed
request that omits max_tokens (on chat: until the end of the 8192-token context) or asks for
thousands does not hold the engine for minutes. Every response's status is appended to the
file named by $SHARDCOMPUTE_TEST_STATUS_LOG, for the test's own count of requests and 5xx.
"""

from __future__ import annotations

import os

import schemathesis

MAX_TOKENS = 2
BUDGET_FIELDS = ("max_tokens", "max_completion_tokens")


@schemathesis.hook
def before_call(context, case, kwargs) -> None:
    """Cap the completion budget of a generation request; invalid values stay invalid."""
    body = case.body
    if case.method.upper() != "POST" or not isinstance(body, dict):
        return
    for field in BUDGET_FIELDS:
        if type(body.get(field)) is int and body[field] > MAX_TOKENS:
            body[field] = MAX_TOKENS
    if all(body.get(field) is None for field in BUDGET_FIELDS):
        body["max_tokens"] = MAX_TOKENS


@schemathesis.hook
def after_call(context, case, response) -> None:
    """Record `status METHOD path` of every response."""
    with open(os.environ["SHARDCOMPUTE_TEST_STATUS_LOG"], "a") as log:
        log.write(f"{response.status_code} {case.method.upper()} {case.path}\n")
