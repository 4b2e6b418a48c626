"""Remove what test runs leave on the shared RabbitMQ: their queues and exchanges.

Why: most integration tests declare a whole topology under a prefix of their own (``t<tag>.``,
``spool-test-<tag>``) and not every one deletes it (a daemon run in a subprocess, a test that
failed half-way). Hundreds of queues per run, many of them quorum queues holding messages, add
up over a day of runs on one broker, and a broker carrying thousands of them boots and answers
slowly enough to make later runs time out. The pytest session deletes what its own tests
declared (``conftest.pytest_sessionfinish``); ``.ci/services.sh`` deletes every idle leftover of
earlier runs before CI starts (``python3 tests/broker_cleanup.py --leftovers``).

Standard library only: ``services.sh`` runs it before the project's virtualenv exists.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable

# Names that only the test suite, the demo and the night bench make: t<10 hex>.…, tall.…,
# demo<10 hex>.…, n<10 hex>.…, spool-test-<tag>, spool-demo-<10 hex>, spool-night-<10 hex> (a night
# killed before it cleaned up, e.g. by the OOM killer).
LEFTOVER_QUEUE = re.compile(r"^(t[0-9a-f]{10}|tall|demo[0-9a-f]{10}|n[0-9a-f]{10})\.")
LEFTOVER_EXCHANGE = re.compile(r"^spool-(test-[0-9a-z]+|demo-[0-9a-f]{10}|night-[0-9a-f]{10})$")


def _api(amqp_url: str) -> tuple[str, str]:
    """(management base URL, basic-auth header) for the broker of ``amqp_url``."""
    url = urllib.parse.urlsplit(amqp_url)
    base = os.environ.get("SPOOL_TEST_MANAGEMENT_URL", f"http://{url.hostname or '127.0.0.1'}:15672")
    user = urllib.parse.unquote(url.username or "guest")
    password = urllib.parse.unquote(url.password or "guest")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return base.rstrip("/"), f"Basic {token}"


def _call(base: str, auth: str, method: str, path: str, timeout: float) -> object:
    request = urllib.request.Request(base + path, method=method, headers={"Authorization": auth})
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        body = answer.read()
    return json.loads(body) if body else None


def remove(
    amqp_url: str,
    queue_wanted: Callable[[dict[str, object]], bool],
    exchange_wanted: Callable[[str], bool],
    timeout: float = 10.0,
) -> tuple[int, int]:
    """Delete the queues and exchanges of vhost ``/`` that the predicates pick; (queues, exchanges).
    A queue deleted meanwhile by someone else is not an error."""
    base, auth = _api(amqp_url)
    queues = _call(base, auth, "GET", "/api/queues/%2F?columns=name,consumers", timeout)
    exchanges = _call(base, auth, "GET", "/api/exchanges/%2F?columns=name", timeout)
    assert isinstance(queues, list) and isinstance(exchanges, list)
    n_queues = _delete(base, auth, "queues", (q["name"] for q in queues if queue_wanted(q)), timeout)
    picked = (e["name"] for e in exchanges if exchange_wanted(e["name"]))
    return n_queues, _delete(base, auth, "exchanges", picked, timeout)


def _delete(base: str, auth: str, kind: str, names: Iterable[str], timeout: float) -> int:
    done = 0
    for name in names:
        try:
            _call(base, auth, "DELETE", f"/api/{kind}/%2F/{urllib.parse.quote(name, safe='')}", timeout)
            done += 1
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise
    return done


def remove_tags(amqp_url: str, tags: Iterable[str]) -> tuple[int, int]:
    """What the tests of ``tags`` (the ``tag`` fixture's values) declared."""
    prefixes = tuple(f"t{tag}." for tag in tags)
    exchanges = {f"spool-test-{tag}" for tag in tags}
    return remove(amqp_url, lambda q: str(q["name"]).startswith(prefixes), exchanges.__contains__)


def remove_leftovers(amqp_url: str) -> tuple[int, int]:
    """Every test or demo queue nobody consumes from, and every test or demo exchange."""
    return remove(
        amqp_url,
        lambda q: bool(LEFTOVER_QUEUE.match(str(q["name"]))) and not q.get("consumers"),
        lambda name: bool(LEFTOVER_EXCHANGE.match(name)),
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leftovers", action="store_true", help="delete idle test/demo queues")
    parser.add_argument(
        "--url", default=os.environ.get("SPOOL_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    )
    args = parser.parse_args(argv)
    if not args.leftovers:
        parser.error("say --leftovers")
    try:
        queues, exchanges = remove_leftovers(args.url)
    except (OSError, ValueError) as exc:  # the API down is not fatal: the tests say what they see
        print(f"broker_cleanup: could not clean the broker: {exc}", file=sys.stderr)
        return 0
    print(f"broker_cleanup: deleted {queues} leftover queues and {exchanges} exchanges")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
