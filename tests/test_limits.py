"""Rate limits (:class:`SlidingWindow`, fake clock) and the broadcast :class:`Throttle`.

The throttle runs on a real event loop with short windows; assertions count what fired and
with which values, never how long anything took.
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

import pytest

from pluginlab.limits import SlidingWindow, Throttle


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


# -- SlidingWindow -------------------------------------------------------------------------

def test_allows_up_to_the_limit_then_says_how_long_to_wait() -> None:
    clock = FakeClock()
    window = SlidingWindow(3, 1.0, clock=clock)
    assert [window.take() for _ in range(3)] == [None, None, None]
    assert window.take() == pytest.approx(1.0)
    clock.now += 0.25
    assert window.take() == pytest.approx(0.75)
    clock.now += 0.75
    assert window.take() is None  # the first three have left the window


def test_window_slides_one_entry_at_a_time() -> None:
    clock = FakeClock()
    window = SlidingWindow(2, 1.0, clock=clock)
    assert window.take() is None
    clock.now += 0.5
    assert window.take() is None
    assert window.take() == pytest.approx(0.5)  # waits for the first entry only
    clock.now += 0.5
    assert window.take() is None
    assert window.take() == pytest.approx(0.5)


def test_refused_takes_are_not_recorded() -> None:
    clock = FakeClock()
    window = SlidingWindow(2, 1.0, clock=clock)
    window.take(2)
    for _ in range(100):
        assert window.take() is not None
    clock.now += 1.0
    assert window.take(2) is None


def test_taking_several_units_at_once() -> None:
    clock = FakeClock()
    window = SlidingWindow(5, 1.0, clock=clock)
    assert window.take(3) is None
    assert window.take(3) == pytest.approx(1.0)  # 3 + 3 > 5; nothing recorded
    assert window.take(2) is None
    assert window.take(6) == 1.0  # more than the limit can never pass; wait a whole window
    clock.now += 2
    assert window.take(5) is None


def test_retry_after_is_always_positive() -> None:
    clock = FakeClock()
    window = SlidingWindow(1, 1.0, clock=clock)
    window.take()
    clock.now += 0.99999999
    wait = window.take()
    assert wait is not None and wait > 0


@pytest.mark.parametrize("limit", [0, -1])
def test_zero_or_negative_limit_means_unlimited(limit: int) -> None:
    window = SlidingWindow(limit, 1.0, clock=FakeClock())
    assert all(window.take(1000) is None for _ in range(1000))


def test_default_clock_is_monotonic() -> None:
    window = SlidingWindow(1)
    assert window.take() is None
    assert window.take() is not None


# -- Throttle ------------------------------------------------------------------------------

def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


class Recorder:
    def __init__(self) -> None:
        self.fired: list[dict[str, Any]] = []

    def __call__(self, values: dict[str, Any]) -> None:
        self.fired.append(values)


def test_leading_edge_fires_at_once() -> None:
    async def scenario() -> None:
        throttle = Throttle(60.0)  # a window far longer than the test
        rec = Recorder()
        throttle.submit(("p", "k"), {"x": 1}, rec)
        assert rec.fired == [{"x": 1}]  # synchronously, no waiting for the window
        throttle.flush()

    run(scenario())


def test_burst_is_coalesced_and_the_last_value_is_delivered() -> None:
    async def scenario() -> None:
        throttle = Throttle(0.05)
        rec = Recorder()
        for i in range(200):
            throttle.submit(("p", "k"), {"x": i}, rec)
        assert rec.fired == [{"x": 0}]
        while len(rec.fired) < 2:
            await asyncio.sleep(0.01)
        assert rec.fired == [{"x": 0}, {"x": 199}]
        await asyncio.sleep(0.15)  # the trailing edge reopened a window, which ends quietly
        assert rec.fired == [{"x": 0}, {"x": 199}]
        throttle.submit(("p", "k"), {"x": 500}, rec)  # quiet again: leading edge
        assert rec.fired[-1] == {"x": 500}
        throttle.flush()

    run(scenario())


_REQUEST: contextvars.ContextVar[str] = contextvars.ContextVar("request", default="none")


def test_a_trailing_edge_runs_outside_the_context_that_opened_the_window() -> None:
    """The server holds a request's broadcasts until its reply by a context variable; the
    window's end must not inherit it from the request that opened the window."""
    async def scenario() -> None:
        throttle = Throttle(0.02)
        seen: list[tuple[Any, str]] = []

        def fire(values: dict[str, Any]) -> None:
            seen.append((values["x"], _REQUEST.get()))

        _REQUEST.set("first request")
        throttle.submit(("p", "k"), {"x": 1}, fire)  # leading edge: in the request
        throttle.submit(("p", "k"), {"x": 2}, fire)  # pending until the window ends
        while len(seen) < 2:
            await asyncio.sleep(0.01)
        assert seen == [(1, "first request"), (2, "none")]
        throttle.flush()

    run(scenario())


def test_pending_values_are_merged_per_key() -> None:
    async def scenario() -> None:
        throttle = Throttle(60.0)
        rec = Recorder()
        throttle.submit(("p", "k"), {"a": 1}, rec)
        throttle.submit(("p", "k"), {"b": 2}, rec)
        throttle.submit(("p", "k"), {"a": 3}, rec)
        throttle.flush()
        assert rec.fired == [{"a": 1}, {"a": 3, "b": 2}]

    run(scenario())


def test_keys_are_independent() -> None:
    async def scenario() -> None:
        throttle = Throttle(60.0)
        rec = Recorder()
        throttle.submit(("p1", "x"), {"x": 1}, rec)
        throttle.submit(("p1", "y"), {"y": 1}, rec)
        throttle.submit(("p2", "x"), {"x": 9}, rec)
        assert rec.fired == [{"x": 1}, {"y": 1}, {"x": 9}]
        throttle.submit(("p1", "x"), {"x": 2}, rec)
        assert len(rec.fired) == 3
        throttle.flush()
        assert rec.fired[-1] == {"x": 2}

    run(scenario())


def test_the_latest_callback_is_used_for_the_trailing_edge() -> None:
    async def scenario() -> None:
        throttle = Throttle(60.0)
        first, second = Recorder(), Recorder()
        throttle.submit(("p", "k"), {"x": 1}, first)
        throttle.submit(("p", "k"), {"x": 2}, second)
        throttle.flush()
        assert first.fired == [{"x": 1}] and second.fired == [{"x": 2}]

    run(scenario())


def test_flush_without_pending_values_fires_nothing_and_cancels_timers() -> None:
    async def scenario() -> None:
        throttle = Throttle(0.02)
        rec = Recorder()
        throttle.submit(("p", "k"), {"x": 1}, rec)
        throttle.flush()
        await asyncio.sleep(0.08)
        assert rec.fired == [{"x": 1}]
        throttle.submit(("p", "k"), {"x": 2}, rec)  # window closed by flush: leading edge
        assert rec.fired == [{"x": 1}, {"x": 2}]
        throttle.flush()

    run(scenario())


def test_zero_window_fires_every_submission() -> None:
    async def scenario() -> None:
        throttle = Throttle(0)
        rec = Recorder()
        for i in range(10):
            throttle.submit(("p", "k"), {"x": i}, rec)
        assert rec.fired == [{"x": i} for i in range(10)]

    run(scenario())


def test_fired_values_are_copies() -> None:
    async def scenario() -> None:
        throttle = Throttle(60.0)
        rec = Recorder()
        values = {"x": 1}
        throttle.submit(("p", "k"), values, rec)
        values["x"] = 2
        assert rec.fired == [{"x": 1}]
        throttle.flush()

    run(scenario())


def test_a_value_sent_drops_the_groups_older_pending_values_of_that_name() -> None:
    async def scenario() -> None:
        throttle = Throttle(60.0)
        single, batch = Recorder(), Recorder()
        throttle.submit(("p", "x"), {"x": 1}, single)  # leading edge
        throttle.submit(("p", "x"), {"x": 2}, single)  # pending
        throttle.submit(("p", "batch"), {"x": 3, "y": 4}, batch)  # leading edge: newer x
        throttle.submit(("q", "x"), {"x": 5}, single)  # another group is left alone
        throttle.flush()
        assert single.fired == [{"x": 1}, {"x": 5}]  # the pending x=2 was dropped
        assert batch.fired == [{"x": 3, "y": 4}]

    run(scenario())


@pytest.mark.parametrize("first_window", ["batch", "x"])
def test_a_trailing_edge_never_brings_back_an_older_value(first_window: str) -> None:
    async def scenario() -> None:
        throttle = Throttle(0.05)
        fired: list[tuple[str, dict[str, Any]]] = []
        for name in sorted(("batch", "x"), key=lambda n: n != first_window):  # windows open
            throttle.submit(("p", name), {"x": 0}, lambda v, n=name: fired.append((n, v)))
        throttle.submit(("p", "batch"), {"x": 1, "y": 1}, lambda v: fired.append(("batch", v)))
        throttle.submit(("p", "x"), {"x": 2}, lambda v: fired.append(("x", v)))  # newest x
        await asyncio.sleep(0.2)  # both windows end
        xs = [values["x"] for _, values in fired if "x" in values]
        assert xs == sorted(xs) and xs[-1] == 2  # x values leave in submission order
        assert [values.get("y") for _, values in fired if "y" in values] == [1]
        throttle.flush()

    run(scenario())


def test_supersede_drops_pending_values_of_a_group() -> None:
    async def scenario() -> None:
        throttle = Throttle(60.0)
        rec = Recorder()
        for key in (("p", "x"), ("p", "y"), ("q", "x")):
            throttle.submit(key, {key[1]: 1}, rec)
            throttle.submit(key, {key[1]: 2}, rec)
        throttle.supersede("p", ["x"])  # e.g. a preset load setting x
        throttle.flush()
        assert rec.fired[3:] == [{"y": 2}, {"x": 2}]
        throttle.submit(("p", "y"), {"y": 3}, rec)
        throttle.submit(("p", "y"), {"y": 4}, rec)
        throttle.supersede("p")  # e.g. the plugin was removed
        throttle.flush()
        assert rec.fired[-1] == {"y": 3}

    run(scenario())
