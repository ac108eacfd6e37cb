"""When `coolfusion up` starts a dead server again: at once-ish, later for one that keeps dying."""

from __future__ import annotations

import signal

from coolfusion.cli.cluster import RESTART_DELAY_S, RESTART_MAX_DELAY_S, RESTART_RESET_S, Backoff, exit_reason


def test_a_first_death_is_restarted_after_the_first_delay():
    backoff = Backoff()
    assert backoff.schedule(started_at=0.0, now=500.0) == RESTART_DELAY_S
    assert backoff.due_at == 500.0 + RESTART_DELAY_S


def test_a_server_that_keeps_dying_waits_twice_as_long_each_time_up_to_the_cap():
    backoff, now, delays = Backoff(), 0.0, []
    for _ in range(10):
        delays.append(backoff.schedule(started_at=now, now=now + 1.0))  # died a second after each start
        now = backoff.due_at
        backoff.restarted()
    assert delays[:4] == [RESTART_DELAY_S, 2 * RESTART_DELAY_S, 4 * RESTART_DELAY_S, 8 * RESTART_DELAY_S]
    assert delays[-1] == RESTART_MAX_DELAY_S


def test_a_server_that_ran_long_enough_is_restarted_after_the_first_delay_again():
    backoff = Backoff()
    for _ in range(4):
        backoff.schedule(started_at=0.0, now=1.0)
        backoff.restarted()
    assert backoff.schedule(started_at=100.0, now=100.0 + RESTART_RESET_S) == RESTART_DELAY_S


def test_the_log_says_how_a_server_ended():
    assert exit_reason(-signal.SIGKILL) == "killed by SIGKILL"
    assert exit_reason(1) == "exited with code 1"
