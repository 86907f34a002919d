"""A budget's reporting periods: what a trial reports as its `epoch`, ASHA's time unit
(harness.sweep.build_tuner's max_t), must be what the training loop's schedule runs."""

import pytest

from model.config import Budget, FinetuneConfig
from model.training.loop import schedule

BUDGETS = [
    (Budget(unit="epochs", value=4), 2, 1, 4),
    (Budget(unit="steps", value=240, every=40), 2, 1, 6),
    (Budget(unit="steps", value=100), 2, 1, 10),  # every: a tenth of the budget
    (Budget(unit="steps", value=50, every=40), 2, 1, 2),  # a shorter last period
    (Budget(unit="samples", value=100, every=30), 2, 2, 4),  # 25 steps of 4, periods of 8
]


@pytest.mark.parametrize(("budget", "batch_size", "workers", "periods"), BUDGETS)
def test_periods_are_the_loops_reporting_periods(budget, batch_size, workers, periods):
    assert budget.periods(batch_size, workers) == periods
    cfg = FinetuneConfig(budget=budget, batch_size=batch_size)
    for steps_per_pass in (1, 7, 40):
        assert schedule(cfg, steps_per_pass, workers=workers).periods == periods


def test_asha_runs_to_the_last_reporting_period_not_the_step_count(tmp_path):
    from harness.console import QUIET
    from harness.spec import load_spec
    from harness.sweep import build_tuner

    spec_path = tmp_path / "s.yaml"
    spec_path.write_text(
        "study: s\nfinetune: {budget: {unit: steps, value: 240, every: 40}}\n"
        "methods: [supervised]\nseeds: [0]\nscheduler: {type: asha, grace_period: 2}\n"
    )
    spec = load_spec(spec_path)
    ray_path = tmp_path / "ray" / "x"
    tuner = build_tuner(spec, None, [], ray_path, restore=False, loudness=QUIET)
    scheduler = tuner._local_tuner._tune_config.scheduler
    assert scheduler._max_t == 6  # Ray's AsyncHyperBandScheduler keeps max_t there
