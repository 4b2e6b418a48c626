"""Retries wait a random share of their tier (issue 16, class 11): drawn from [(1 - JITTER) T, T],
set as the copy's per-message expiration under the tier queue's fixed TTL."""

from __future__ import annotations

import random
import statistics
from pathlib import Path
from typing import Any

import pytest

from common.bus.retry import JITTER, decide, jittered
from common.bus.service import Context, Service
from common.config import BusSettings, load_settings
from common.errors import Retryable
from common.messages import FileReady
from tests.conftest import cloudevent, publish_raw, queue_depth, running, wait_for, write_config

BUS = BusSettings(retry_tiers=[1, 10, 100], max_attempts=5)


def test_every_delay_lies_within_its_tier_and_the_jitter_below_it():
    rng = random.Random(16)
    for tier, seconds in enumerate(BUS.retry_tiers):
        delays = [decide(Retryable("x", "y"), tier + 1, BUS, rng).delay for _ in range(5000)]
        assert all(d is not None and (1 - JITTER) * seconds <= d <= seconds for d in delays)
        # Spread over the whole band: both ends reached within 2 %, the mean in the middle.
        band = JITTER * seconds
        assert min(delays) < (1 - JITTER) * seconds + 0.02 * band  # type: ignore[type-var]
        assert max(delays) > seconds - 0.02 * band  # type: ignore[type-var]
        assert statistics.fmean(delays) == pytest.approx((1 - JITTER / 2) * seconds, rel=0.01)  # type: ignore[arg-type]


def test_delays_are_whole_milliseconds_and_differ_between_failures():
    delays = {jittered(30.0) for _ in range(100)}
    assert len(delays) > 90  # random, not one fixed value
    assert all(round(d * 1000) == pytest.approx(d * 1000) for d in delays)


def test_dead_letters_carry_no_delay():
    assert decide(Retryable("x", "y"), BUS.max_attempts, BUS).delay is None


@pytest.fixture
def config_file(tmp_path: Path, tag: str) -> Path:
    """One long tier, so the retry copies wait in it long enough to be read."""
    state = tmp_path / "state"
    (state / "landing").mkdir(parents=True)
    path = write_config(tmp_path / "spool.toml", state, tag)
    path.write_text(path.read_text().replace("retry_tiers = [0.2, 0.5, 1.0]", "retry_tiers = [30.0]"))
    return path


@pytest.mark.integration
async def test_two_failures_of_one_tier_wait_different_delays(tmp_path, settings, broker, topology):
    assert load_settings(tmp_path / "spool.toml").bus.retry_tiers == [30.0]
    service = Service("ingest")

    @service.handler(FileReady)
    async def handle(msg: FileReady, ctx: Context[Any]) -> None:
        raise Retryable("endpoint_down", "no write pools online")

    tier = settings.retry_queue("ingest", 0)
    async with running([service], settings):
        for name in ("a", "b"):
            await publish_raw(
                broker, settings, "file.ready", cloudevent({"path": f"/l/{name}", "dataset": "d"})
            )
        await wait_for(lambda: _depth_is(broker, tier, 2))
    channel = await broker.channel()
    queue = await channel.get_queue(tier)
    expirations = []
    while (m := await queue.get(no_ack=True, fail=False)) is not None:
        expirations.append(int(m.expiration * 1000) if isinstance(m.expiration, float) else int(m.expiration))
    await channel.close()
    assert len(expirations) == 2 and expirations[0] != expirations[1]
    assert all(24_000 <= e <= 30_000 for e in expirations)


async def _depth_is(broker: Any, name: str, n: int) -> bool:
    return await queue_depth(broker, name) == n
