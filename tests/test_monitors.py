"""The monitors judge the greedy and the sampled evaluation apart (issue 15), on hand-built
metric rows: no model, no training."""

from __future__ import annotations

import json

from posttrain.tracking import report
from posttrain.tracking.monitors import (
    Alert,
    MonitorLog,
    check_all,
    kl_overoptimisation,
    length_collapse,
    read_alerts,
    reward_hacking,
)


def evaluations(greedy, sampled, steps=(0, 50, 100)):
    """Metric rows of evaluations at `steps`: (gold, proxy) per step for each series."""
    return [{"step": s, "eval/gold": g, "eval/reward": p, "eval/gold_sampled": gs,
             "eval/reward_sampled": ps}
            for s, (g, p), (gs, ps) in zip(steps, greedy, sampled, strict=True)]


# The PPO run of issue 15: greedy proxy -1.09 -> 2.47, greedy gold 0.79 -> -0.40, while the
# sampled gold rose; no alert fired when only the sampled series was judged.
HACKED_GREEDY = [(0.79, -1.09), (0.60, 1.0), (-0.40, 2.47)]
HEALTHY = [(0.5, 0.0), (0.8, 0.5), (1.1, 1.0)]
HACKED_SAMPLED = [(1.0, 0.2), (2.0, 0.4), (0.5, 0.9)]
GREEDY_MESSAGE = ("reward hacking: the greedy gold reward fell from 0.79 (step 0) to -0.4 "
                  "(step 100) while the greedy proxy reward rose from -1.09 to 2.47.")
SAMPLED_MESSAGE = ("reward hacking: the sampled gold reward fell from 2 (step 50) to 0.5 "
                   "(step 100) while the sampled proxy reward rose from 0.4 to 0.9.")


def test_a_hacked_greedy_policy_fires_although_the_sampled_gold_rose():
    rows = evaluations(HACKED_GREEDY, HEALTHY)
    alerts = check_all(rows)
    assert [(a.kind, a.series, a.step) for a in alerts] == [("reward_hacking", "greedy", 100)]
    assert alerts[0].message.startswith(GREEDY_MESSAGE)
    assert reward_hacking(rows, series="greedy") == alerts[0]
    assert reward_hacking(rows, series="sampled") is None
    assert reward_hacking(rows) == alerts[0]  # no series: the first series that fires


def test_a_hacked_sampled_policy_fires_although_the_greedy_gold_rose():
    rows = evaluations(HEALTHY, HACKED_SAMPLED)
    alerts = check_all(rows)
    assert [(a.kind, a.series, a.step) for a in alerts] == [("reward_hacking", "sampled", 100)]
    assert alerts[0].message.startswith(SAMPLED_MESSAGE)
    assert reward_hacking(rows, series="greedy") is None


def test_without_gold_each_series_held_out_reward_judges_the_training_reward():
    rows = [{"step": 0, "eval/reward": 1.0, "eval/reward_sampled": 0.1},
            {"step": 1, "reward/mean": 0.1}, {"step": 50, "reward/mean": 0.5},
            {"step": 50, "eval/reward": 2.0, "eval/reward_sampled": 0.2},
            {"step": 99, "reward/mean": 0.9},
            {"step": 100, "eval/reward": 0.5, "eval/reward_sampled": 0.3}]
    alerts = check_all(rows)
    assert [(a.kind, a.series, a.step) for a in alerts] == [("reward_hacking", "greedy", 100)]
    assert alerts[0].message.startswith(
        "reward hacking: the greedy held-out reward fell from 2 (step 50) to 0.5 (step 100) "
        "while the training reward rose from 0.5 to 0.9.")


def test_both_series_hacked_are_two_alerts_recorded_once_each(tmp_path, capsys):
    log = MonitorLog(tmp_path)
    first = log.update(evaluations(HEALTHY, HACKED_SAMPLED))
    assert [(a.kind, a.series) for a in first] == [("reward_hacking", "sampled")]
    assert first[0].message.startswith(SAMPLED_MESSAGE)
    # later the greedy policy is hacked too: a second reward_hacking alert, not a repeat
    rows = evaluations(HACKED_GREEDY, HACKED_SAMPLED)
    assert [(a.kind, a.series) for a in check_all(rows)] == [("reward_hacking", "sampled"),
                                                             ("reward_hacking", "greedy")]
    second = log.update(rows)
    assert [(a.kind, a.series) for a in second] == [("reward_hacking", "greedy")]
    assert second[0].message.startswith(GREEDY_MESSAGE)
    printed = capsys.readouterr().out
    assert printed.count("WARNING (step 100): reward hacking") == 2
    assert "WARNING (step 100): " + GREEDY_MESSAGE in printed
    assert "WARNING (step 100): " + SAMPLED_MESSAGE in printed
    assert read_alerts(tmp_path) == [*first, *second]
    lines = [json.loads(line) for line in (tmp_path / "alerts.jsonl").open()]
    assert [line["series"] for line in lines] == ["sampled", "greedy"]
    assert log.update(rows) == []  # each (kind, series) once
    assert MonitorLog(tmp_path).update(rows) == []  # and once across a resume


def test_an_alerts_file_from_before_the_series_reads_back_and_still_deduplicates(tmp_path):
    old = {"kind": "entropy_collapse", "step": 3,
           "message": "entropy collapse: policy entropy fell from 2 (step 1) to 0.1 (step 3)."}
    (tmp_path / "alerts.jsonl").write_text(json.dumps(old) + "\n")
    assert read_alerts(tmp_path) == [Alert("entropy_collapse", 3, old["message"], None)]
    collapsed = [{"step": 1, "policy/entropy": 2.0}, {"step": 2, "policy/entropy": 1.0},
                 {"step": 3, "policy/entropy": 0.1}]
    assert MonitorLog(tmp_path).update(collapsed) == []  # fired before the restart


def kl_rows(greedy_gold, sampled_gold):
    kl = {10: 1.0, 20: 5.0, 30: 9.0}
    return [{"step": s, "eval/gold": g, "eval/gold_sampled": gs, **({"kl/ref_seq": kl[s]}
                                                                    if s in kl else {})}
            for s, g, gs in zip((0, 10, 20, 30), greedy_gold, sampled_gold, strict=True)]


def test_kl_overoptimisation_judges_each_series():
    peaked, rising = [1.0, 3.0, 2.0, 0.5], [1.0, 1.5, 2.0, 2.5]
    rows = kl_rows(peaked, rising)
    alerts = check_all(rows)
    assert [(a.kind, a.series, a.step) for a in alerts] == [("kl_overoptimisation", "greedy", 30)]
    assert alerts[0].message == (
        "over-optimisation: the greedy gold reward peaked at 3 at KL 1 (step 10) and fell to "
        "0.5 at KL 9 (step 30). A KL budget near 1 would have kept the best policy.")
    assert kl_overoptimisation(rows, series="sampled") is None
    assert kl_overoptimisation(rows) == alerts[0]
    mirror = kl_rows(rising, peaked)
    assert [(a.kind, a.series) for a in check_all(mirror)] == [("kl_overoptimisation",
                                                                 "sampled")]
    assert kl_overoptimisation(mirror, series="sampled").message.startswith(
        "over-optimisation: the sampled gold reward peaked at 3 at KL 1 (step 10)")
    assert {a.series for a in check_all(kl_rows(peaked, peaked))} == {"greedy", "sampled"}


def test_kl_overoptimisation_weighs_the_fall_against_the_gain_since_the_start():
    # gold 3.4 -> 7.9 -> 7.2 (the quickstart's PPO run): a fall of 0.7 after a gain of 4.5 is
    # under a fifth of the range, a wobble at the top; judged on the steps after 0 alone
    # (range 0.7) it was an alarm
    wobble = [3.4, 7.9, 7.5, 7.2]
    assert kl_overoptimisation(kl_rows(wobble, wobble), series="greedy") is None
    # the same fall after a gain of 2.5 is over a fifth of it (0.7 > 0.2 x 2.5)
    fall = [5.4, 7.9, 7.5, 7.2]
    alert = kl_overoptimisation(kl_rows(fall, fall), series="greedy")
    assert alert is not None and "peaked at 7.9 at KL 1 (step 10)" in alert.message


def test_length_collapse_of_the_greedy_evaluation():
    rows = [{"step": s, "eval/response_length": g, "eval/response_length_sampled": sm}
            for s, g, sm in [(0, 20.0, 20.0), (50, 15.0, 19.0), (100, 8.0, 18.0)]]
    rows += [{"step": s, "response/length": 20.0} for s in (1, 2, 3)]
    alerts = check_all(rows)
    assert [(a.kind, a.series, a.step) for a in alerts] == [("length_collapse", "greedy", 100)]
    assert alerts[0].message.startswith(
        "response-length collapse: the greedy evaluation's mean length in tokens fell from 20 "
        "(step 0) to 8 (step 100).")
    assert length_collapse(rows) is None  # the training rollouts kept their length
    assert length_collapse(rows, series="sampled") is None
    train = [{"step": s, "response/length": v} for s, v in [(1, 20.0), (2, 15.0), (3, 9.0)]]
    alert = length_collapse(train)
    assert alert is not None and alert.series is None and alert.step == 3
    assert alert.message.startswith("response-length collapse: the training rollouts' mean "
                                    "length in tokens fell from 20 (step 1) to 9 (step 3).")


def test_the_report_plots_gold_against_kl_for_both_series_and_labels_alerts(tmp_path,
                                                                            monkeypatch):
    rows = kl_rows([1.0, 3.0, 2.0, 0.5], [1.0, 1.5, 2.0, 2.5])
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    labels = {}
    png = report._png

    def recording_png(fig):
        labels[fig.axes[0].get_title()] = [line.get_label() for line in fig.axes[0].get_lines()]
        return png(fig)

    monkeypatch.setattr(report, "_png", recording_png)
    page = report.write_report(tmp_path).read_text()
    assert labels["Gold reward against KL to the reference (over-optimisation)"] == [
        "sampled (eval/gold_sampled)", "greedy (eval/gold)"]
    assert (tmp_path / "plots" / "gold_vs_kl.png").exists()
    assert "<b>step 30</b> (kl_overoptimisation, greedy evaluation): over-optimisation: the " \
           "greedy gold reward" in page
