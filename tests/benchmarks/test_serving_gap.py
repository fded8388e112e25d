"""benchmarks/serving_gap.py reads the server's step histogram from Prometheus text."""

from __future__ import annotations

from tests.benchmarks.test_peers import _load

gap = _load("serving_gap")

TEXT = """\
# HELP ray_mora_engine_step_seconds Duration of one engine step.
# TYPE ray_mora_engine_step_seconds histogram
ray_mora_engine_step_seconds_bucket{le="0.01",model="m",phase="decode",replica="a"} 3.0
ray_mora_engine_step_seconds_sum{model="m",phase="decode",replica="a"} 1.5
ray_mora_engine_step_seconds_count{model="m",phase="decode",replica="a"} 100.0
ray_mora_engine_step_seconds_sum{model="m",phase="decode",replica="b"} 0.5
ray_mora_engine_step_seconds_count{model="m",phase="decode",replica="b"} 20.0
ray_mora_engine_step_seconds_sum{model="m",phase="prefill",replica="a"} 0.25
ray_mora_engine_step_seconds_count{model="m",phase="prefill",replica="a"} 5.0
ray_mora_inter_token_latency_seconds_sum{model="m"} 9.0
"""


def test_step_totals_sum_replicas_per_phase_and_ignore_other_metrics():
    assert gap.parse_step_totals(TEXT) == {"decode": (2.0, 120.0), "prefill": (0.25, 5.0)}


def test_no_steps_yet_is_empty():
    assert gap.parse_step_totals("# nothing here\n") == {}
