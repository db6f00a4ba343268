"""The evaluator says what it is about to do: the number of planned runs up front, then a time estimate measured on
this machine (the second run's duration times the runs left), not a constant."""
from __future__ import annotations

import pytest

from tgvkv.eval import runner


@pytest.mark.parametrize("seconds, text", [(0.4, "0 s"), (89.6, "90 s"), (90, "2 min"), (3500, "58 min"),
                                           (3599, "1 h 00 min"), (3600, "1 h 00 min"), (11_100, "3 h 05 min")])
def test_format_duration(seconds, text):
    assert runner.format_duration(seconds) == text


def test_estimate_message_scales_the_measured_run():
    assert runner.estimate_message(0.5, 1_138) == "one run took 0.50 s here: about 9 min for the 1,138 runs left " \
                                                  "(estimate)"
    assert runner.estimate_message(2.0, 30) == "one run took 2.00 s here: about 60 s for the 30 runs left (estimate)"
