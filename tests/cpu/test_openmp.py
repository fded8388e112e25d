"""in_fresh_thread: the result or the error comes back; the work ran on a thread that ended."""

from __future__ import annotations

import threading

import pytest
import torch

from mora_runtime.cpu.openmp import in_fresh_thread


def test_returns_the_value_from_a_thread_that_has_ended():
    caller = threading.current_thread()
    ran_on = in_fresh_thread(threading.current_thread)
    assert ran_on is not caller and not ran_on.is_alive()
    x = torch.randn(64, 64)
    torch.testing.assert_close(in_fresh_thread(torch.mm, x, x.t()), x @ x.t())
    assert in_fresh_thread(lambda a, *, b: a + b, 1, b=2) == 3


def test_the_error_is_raised_in_the_caller():
    def broken() -> None:
        raise KeyError("missing")

    with pytest.raises(KeyError, match="missing"):
        in_fresh_thread(broken)
