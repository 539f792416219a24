"""The one pass/fail judgement every page uses: ties, margins, and agreement with the
CounterFact metrics."""

import pytest

from emmet_core import metrics
from emmet_core.studio.judge import CLEAR_MARGIN, judge, judge_kept, judge_new, tally
from emmet_core.studio.suggest import judgeable
from emmet_core.studio.workflows import PromptScore


def test_margins_split_clear_weak_and_failed_wins():
    assert judge_new(1.0, 1.0 + CLEAR_MARGIN, "English", "French").outcome == "pass"
    weak = judge_new(1.00, 1.07, "English", "French")
    assert weak.outcome == "weak" and weak.passed and weak.label() == "✓? +0.07"
    assert judge_new(2.0, 1.0, "English", "French").outcome == "fail"
    assert judge_new(1.0, 1.0, "English", "French").outcome == "fail"  # equal NLLs: not strictly better
    assert judge(1.0, 1.5, threshold=0.25).outcome == "pass"
    with pytest.raises(ValueError):
        judge(1.0, 2.0, threshold=-1)


def test_a_neighbour_whose_object_is_the_new_object_is_a_tie_for_both_sides():
    """The Colosseum case: 'Rome' as the neighbour's own object and as the new object."""
    for verdict in (judge_new(0.5, 0.5, "Rome", "Rome"), judge_kept(0.5, 0.5, "Rome", " Rome ")):
        assert verdict.outcome == "tie" and not verdict.passed
    # ... and the metrics count the same prompt as failed on both sides, as the judge does.
    assert metrics.kept([0.5], [0.5]) == 0 and metrics.success([0.5], [0.5]) == 0
    assert judgeable([("The Colosseum is in", "Rome"), ("The Louvre is in", "Paris"), ("X is in", None)],
                     "Rome") == [("The Louvre is in", "Paris"), ("X is in", None)]


@pytest.mark.parametrize("nll_new, nll_true", [(0.3, 2.0), (2.0, 0.3), (1.0, 1.0), (1.0, 1.01)])
def test_the_judge_counts_exactly_what_es_ps_and_ns_count(nll_new, nll_true):
    score = PromptScore("p", "new", "old", 0.0, 0.0, nll_new, nll_true)
    assert score.as_new().passed == bool(metrics.success([nll_new], [nll_true]))
    assert score.as_kept().passed == bool(metrics.kept([nll_new], [nll_true]))


def test_tally_counts_each_outcome():
    verdicts = [judge(0, 2), judge(0, 0.1), judge(1, 0), judge(0, 0, tie=True)]
    assert tally(verdicts) == {"passed": 2, "pass": 1, "weak": 1, "fail": 1, "tie": 1, "total": 4}
