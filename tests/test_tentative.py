"""The ledger of changes applied ahead of their record (:class:`pluginlab.tentative.Tentative`):
undoing a failed change restores a value only when no later change of it is waiting or kept."""

from __future__ import annotations

from pluginlab.tentative import Tentative


def test_a_lone_failed_change_restores_its_previous_value() -> None:
    ledger = Tentative()
    change = ledger.applied("x", 0.5)
    assert ledger.failed("x", change) == (True, 0.5)
    assert len(ledger) == 0


def test_an_older_failure_restores_nothing_while_a_later_change_waits() -> None:
    ledger = Tentative()
    a, b = ledger.applied("x", 0.0), ledger.applied("x", 1.0)
    assert ledger.failed("x", a) == (False, None)
    assert ledger.failed("x", b) == (True, 0.0)  # b failing too: the value from before both
    assert len(ledger) == 0


def test_an_older_failure_restores_nothing_behind_a_recorded_later_change() -> None:
    ledger = Tentative()
    a, b = ledger.applied("x", 0.0), ledger.applied("x", 1.0)
    ledger.recorded("x", b)
    assert len(ledger) == 2  # b is kept: a may still fail
    assert ledger.failed("x", a) == (False, None)
    assert len(ledger) == 0


def test_the_newest_failing_first_restores_the_older_waiting_value() -> None:
    ledger = Tentative()
    a, b = ledger.applied("x", 0.0), ledger.applied("x", 1.0)
    assert ledger.failed("x", b) == (True, 1.0)  # a's value, itself still waiting
    assert ledger.failed("x", a) == (True, 0.0)
    assert len(ledger) == 0


def test_keys_are_independent_and_recorded_changes_are_forgotten() -> None:
    ledger = Tentative()
    a, b = ledger.applied("x", 0.0), ledger.applied("y", 5.0)
    ledger.recorded("x", a)
    assert len(ledger) == 1
    assert ledger.failed("y", b) == (True, 5.0)
    assert len(ledger) == 0


def test_readers_see_the_logged_value_unless_the_newest_change_is_their_own() -> None:
    ledger = Tentative()
    assert not ledger and ledger.recorded_values() == []
    mine = ledger.applied("x", 0.0, owner="alice")
    assert ledger.recorded_values("bob") == [("x", 0.0)]
    assert ledger.recorded_values("alice") == []  # alice reads her own write
    ledger.applied("x", 1.0, owner="bob")
    assert ledger.recorded_values("alice") == [("x", 0.0)]  # bob's newer change waits
    ledger.recorded("x", mine)
    assert ledger.recorded_values("alice") == [("x", 1.0)]  # alice's value is in the log now
