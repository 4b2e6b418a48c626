from common.bus.retry import UNEXPECTED, decide
from common.config import BusSettings
from common.errors import Permanent, Retryable

BUS = BusSettings(retry_tiers=[1, 10, 100], max_attempts=5)


def test_retryable_climbs_the_tiers_then_stays_on_the_last():
    tiers = [decide(Retryable("x", "y"), attempt, BUS).tier for attempt in range(1, 5)]
    assert tiers == [0, 1, 2, 2]


def test_retryable_on_the_last_attempt_is_dead_with_its_reason():
    d = decide(Retryable("endpoint_down", "no write pools online"), 5, BUS)
    assert (d.action, d.reason) == ("dead", "endpoint_down")
    assert "5 attempts" in d.error


def test_permanent_is_dead_at_once():
    d = decide(Permanent("checksum_mismatch", "bad"), 1, BUS)
    assert (d.action, d.reason) == ("dead", "checksum_mismatch")


def test_unknown_exception_is_retryable_but_capped():
    assert decide(KeyError("k"), 1, BUS).action == "retry"
    d = decide(KeyError("k"), 5, BUS)
    assert (d.action, d.reason) == ("dead", UNEXPECTED)
