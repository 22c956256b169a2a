"""Health per link as bookkeeping (`agent.linkstats`), on a clock the test moves."""

from __future__ import annotations

from agent.linkstats import LinkStats, watch


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_uptime_ratio_errors_and_transitions() -> None:
    clock = Clock()
    seen: list[tuple[str, bool, bool | None, str | None]] = []
    stop = watch(lambda *args: seen.append(args))
    try:
        link = LinkStats("driver:x", clock)
        assert link.uptime_ratio() == 0 and link.report()["up"] is None
        clock.now += 10  # connecting for 10 s
        link.up()
        clock.now += 30
        link.down("timed out")
        clock.now += 10
        link.down("timed out")  # a retry failing: an error, not a transition
        assert link.uptime_ratio() == 30 / 50
        assert link.errors_total == 2 and link.last_error == "timed out" and link.last_error_at
        link.follow(True, None)
        clock.now += 50
        assert link.uptime_ratio() == 80 / 100
        assert seen == [
            ("driver:x", True, None, None),
            ("driver:x", False, True, "timed out"),
            ("driver:x", True, False, None),
        ]
        link.observe(0.2)
        link.observe(0.4)
        report = link.report()
        assert report["duration_s"] == {"count": 2, "mean": 0.3, "max": 0.4, "last": 0.4}
        assert report["errors_per_min"] == round(2 * 60 / 100, 3)
    finally:
        stop()


def test_follow_counts_a_new_error_while_down_but_not_connecting_at_start() -> None:
    link = LinkStats("broker", Clock())
    link.follow(False, None)  # not connected yet: no error, no transition
    assert link.errors_total == 0 and link.is_up is None
    link.follow(False, "connection refused")
    link.follow(False, "connection refused")  # the same error looked at again
    assert link.errors_total == 1 and link.is_up is False
    link.follow(False, "no route to host")
    assert link.errors_total == 2
