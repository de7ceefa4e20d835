"""The main job: quickstart end to end, its report in a real browser, the monitors."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from posttrain.cli import main
from posttrain.tracking.monitors import (
    MonitorLog,
    check_all,
    entropy_collapse,
    kl_overoptimisation,
    length_collapse,
    read_alerts,
    read_monitor_status,
    reward_hacking,
    value_bias,
)


def with_arithmetic_sft(out, arithmetic_sft_model):
    """`out`'s task root holding the session's arithmetic task and SFT model: the same task,
    seed and settings the quickstart would train (50 s each time). The preference pipeline
    still runs from nothing, so every stage's first-use path is in the run."""
    task = arithmetic_sft_model.parent.parent
    shutil.copytree(task, out / "tasks" / task.name,
                    ignore=lambda d, names: [n for n in names if d == str(task) and
                                             n not in ("task.json", "model", "sft") and
                                             not n.endswith(".jsonl")])
    return out


@pytest.fixture(scope="session")
def quickstart_dir(tmp_path_factory, arithmetic_sft_model):
    out = with_arithmetic_sft(tmp_path_factory.mktemp("qs") / "quickstart", arithmetic_sft_model)
    assert main(["quickstart", "--out", str(out), "--budget", "small", "--progress",
                 "none"]) == 0
    return out


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


@pytest.mark.slow
def test_quickstart_ppo_beats_the_sft_model_on_gold_reward(quickstart_dir, capsys):
    rows = metrics(quickstart_dir / "ppo-preference")
    gold = [r["eval/gold_sampled"] for r in rows if "eval/gold_sampled" in r]
    assert rows[0]["step"] == 0 and gold[-1] > gold[0] + 0.5
    report = (quickstart_dir / "report.html").read_text()
    assert "preference: SFT -&gt; RM -&gt; ppo" in report
    for run in ("ppo-preference", "grpo-arithmetic"):
        assert (quickstart_dir / run / "report.html").exists()
        assert (quickstart_dir / run / "plots" / "reward.png").exists()
        assert (quickstart_dir / run / "final" / "model.safetensors").exists()


@pytest.mark.slow
def test_quickstart_grpo_raises_greedy_and_sampled_arithmetic_accuracy(quickstart_dir):
    rows = [r for r in metrics(quickstart_dir / "grpo-arithmetic") if "eval/reward" in r]
    greedy = [r["eval/reward"] for r in rows]
    sampled = [r["eval/reward_sampled"] for r in rows]
    # SFT imitates a demonstrator that forgets most carries: greedy starts near 0.5-0.6 (100
    # prompts, standard error about 0.05); 60 GRPO steps measured +0.19 greedy, +0.12 sampled
    assert greedy[0] < 0.7 and greedy[-1] > greedy[0] + 0.1, greedy
    assert sampled[-1] > sampled[0] + 0.05, sampled


@pytest.mark.slow
def test_quickstart_ppo_raises_the_greedy_gold_reward(quickstart_dir):
    # The SFT demonstrations use each character at most once, so SFT's greedy answer is a
    # string of distinct characters like those the reward model was fitted on (not a run of
    # one character) and PPO can improve it: measured 3.37 -> 7.43 at the default budget.
    gold = [r["eval/gold"] for r in metrics(quickstart_dir / "ppo-preference")
            if "eval/gold" in r]
    assert gold[-1] > gold[0] + 1.0, gold


@pytest.mark.slow
def test_quickstart_runs_on_the_vllm_engine(vllm_installed, arithmetic_sft_model, tmp_path,
                                            capsys):
    out = with_arithmetic_sft(tmp_path / "quickstart-vllm", arithmetic_sft_model)
    assert main(["quickstart", "--out", str(out), "--budget", "small", "--task", "arithmetic",
                 "--engine", "vllm", "--progress", "none"]) == 0
    assert "RL with grpo (60 steps, vllm engine)" in capsys.readouterr().out
    rows = metrics(out / "grpo-arithmetic")
    greedy = [r["eval/reward"] for r in rows if "eval/reward" in r]
    assert greedy[-1] > greedy[0] - 0.1, greedy  # that GRPO learns on vLLM: test_vllm_runs
    assert (out / "grpo-arithmetic" / "final" / "model.safetensors").exists()
    steps = [r for r in rows if "mismatch/abs_logp_max" in r]
    assert steps and all(r["mismatch/abs_logp_max"] < 1e-3 for r in steps)


@pytest.mark.slow
def test_healthy_run_raises_no_hacking_alarm(quickstart_dir):
    run = quickstart_dir / "ppo-preference"
    rows = metrics(run)
    # the monitors ran, and last on the whole history: every metric row up to the last step
    status = read_monitor_status(run)
    assert status is not None, "the monitors never ran"
    assert status["step"] == rows[-1]["step"] and status["rows"] == len(rows), status
    assert any("kl/ref_seq" in r for r in rows)
    kinds = {a.kind for a in read_alerts(run)}
    assert not kinds & {"reward_hacking", "kl_overoptimisation"}, kinds


@pytest.mark.slow
def test_the_healthy_run_gives_the_monitors_enough_to_judge(quickstart_dir):
    # the reward-hacking and KL monitors need 3 evaluations to judge; before, evaluations off
    # the log_every grid were dropped and the PPO run kept one after step 0
    rows = metrics(quickstart_dir / "ppo-preference")
    assert len([r for r in rows if "eval/gold_sampled" in r and r["step"] > 0]) >= 3


CHECK_SCRIPT = """
<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 100 && i.naturalHeight > 100);
  const div = document.createElement('div');
  div.id = 'browser-check';
  div.textContent = 'images ' + imgs.length + ' decoded ' + ok.length;
  document.body.appendChild(div);
});
</script>
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="needs Debian's chromium (make test installs it where it can)")
def test_report_loads_in_a_real_browser_and_shows_its_plots(quickstart_dir, tmp_path):
    # A copy of the report with a check script appended; the report itself has no script.
    for name in ("ppo-preference", "grpo-arithmetic"):
        page = tmp_path / f"{name}.html"
        page.write_text((quickstart_dir / name / "report.html").read_text()
                        .replace("</body>", CHECK_SCRIPT + "</body>"))
        proc = subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=5000", "--enable-logging=stderr", "--dump-dom",
             page.as_uri()],
            capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "Uncaught" not in proc.stderr and "Failed to load resource" not in proc.stderr
        marker = proc.stdout.split('id="browser-check">')[1].split("<")[0]
        shown, decoded = (int(x) for x in marker.split()[1::2])
        assert shown >= 8 and decoded == shown, marker


def rows_from(pairs):
    return [{"step": s, **values} for s, values in pairs]


def test_reward_hacking_by_hand():
    # gold peaks at step 20 and falls by more than 20% of its range; the proxy keeps rising
    rows = rows_from([(0, {"eval/gold_sampled": 2.0, "eval/reward_sampled": 0.0}),
                      (20, {"eval/gold_sampled": 4.0, "eval/reward_sampled": 0.5}),
                      (40, {"eval/gold_sampled": 3.5, "eval/reward_sampled": 0.6}),
                      (60, {"eval/gold_sampled": 1.0, "eval/reward_sampled": 0.7})])
    alert = reward_hacking(rows)
    assert alert is not None and alert.step == 60
    assert "fell from 4 (step 20) to 1 (step 60)" in alert.message
    assert "rose from 0.5 to 0.7" in alert.message
    # the proxy fell too: that is not hacking, just a bad run
    rows[-1]["eval/reward_sampled"] = 0.1
    assert reward_hacking(rows) is None
    # the gold reward still rising: quiet
    assert reward_hacking(rows_from([(0, {"eval/gold_sampled": 1.0, "eval/reward_sampled": 0}),
                                     (20, {"eval/gold_sampled": 2.0, "eval/reward_sampled": 1}),
                                     (40, {"eval/gold_sampled": 3.0, "eval/reward_sampled": 2})]
                                    )) is None


def test_other_monitors_by_hand():
    rows = rows_from([(0, {"eval/gold": 1.0}), (10, {"kl/ref_seq": 1.0, "eval/gold": 3.0}),
                      (20, {"kl/ref_seq": 5.0, "eval/gold": 2.0}),
                      (30, {"kl/ref_seq": 9.0, "eval/gold": 0.5})])
    alert = kl_overoptimisation(rows)
    assert alert is not None and "peaked at 3 at KL 1" in alert.message
    ent = rows_from([(1, {"policy/entropy": 2.0}), (2, {"policy/entropy": 1.0}),
                     (3, {"policy/entropy": 0.1})])
    assert entropy_collapse(ent) is not None
    assert entropy_collapse(ent[:2]) is None
    lengths = rows_from([(1, {"response/length": 20.0}), (2, {"response/length": 15.0}),
                         (3, {"response/length": 9.0})])
    assert length_collapse(lengths) is not None
    positions = [{"step": s, "mean_advantage": [0.3] * 5 + [0.0] * 10, "tokens": [4] * 15}
                 for s in range(1, 21)]
    assert value_bias(positions) is not None
    flat = [{"step": s, "mean_advantage": [0.0] * 15, "tokens": [4] * 15} for s in range(1, 21)]
    assert value_bias(flat) is None
    # without a critic the signature is not the critic's (GRPO on a multi-turn game: the long,
    # low-scoring episodes hold every late position), so no alert
    assert value_bias([p | {"critic": False} for p in positions]) is None
    assert value_bias([p | {"critic": True} for p in positions]) is not None
    assert check_all([], []) == []


def test_monitor_log_records_what_it_checked_even_without_alerts(tmp_path):
    assert read_monitor_status(tmp_path) is None  # never ran
    log = MonitorLog(tmp_path)
    healthy = rows_from([(1, {"policy/entropy": 2.0}), (2, {"policy/entropy": 1.9})])
    assert log.update(healthy) == []
    assert not (tmp_path / "alerts.jsonl").exists()
    assert read_monitor_status(tmp_path) == {"step": 2, "rows": 2, "positions": 0}
    collapsed = [*healthy, {"step": 3, "policy/entropy": 0.1}]
    assert [a.kind for a in log.update(collapsed)] == ["entropy_collapse"]
    assert [a.kind for a in read_alerts(tmp_path)] == ["entropy_collapse"]
    assert read_monitor_status(tmp_path) == {"step": 3, "rows": 3, "positions": 0}


@pytest.mark.slow
def test_reward_hacking_monitor_fires_on_an_over_optimised_run(quickstart_dir, tmp_path):
    """A weak reward model (15 steps), no KL penalty, a high learning rate, long training: the
    policy finds what the proxy over-rewards and the gold reward falls."""
    from posttrain import pipeline
    from posttrain.config import load_config, merge
    from posttrain.trainers.reward import RewardModelTrainer, RMConfig
    from posttrain.trainers.rl import RLConfig, RLTrainer

    task = quickstart_dir / "tasks" / "preference"
    quiet = {"run": {"progress": "none", "tensorboard": False, "output_dir": str(tmp_path)}}
    weak = RewardModelTrainer(load_config(RMConfig, overrides=merge(
        pipeline.rm_base(task), merge(quiet, {"run": {"name": "weak_rm", "steps": 15}})))
    ).train().final_dir
    preset = pipeline.load_preset("grpo")
    over = merge(quiet, {"run": {"name": "hack", "steps": 160, "eval_every": 20},
                         "reward": {"terms": [{"name": "reward_model", "path": str(weak)}]},
                         "algo": {"kl_placement": "none"}, "optim": {"lr": 5e-4},
                         "eval": {"prompts": 64}})
    cfg = load_config(RLConfig, overrides=merge(merge(preset, pipeline.rl_base(task, preset)),
                                                over))
    result = RLTrainer(cfg).train()
    kinds = {a.kind for a in read_alerts(result.run_dir)}
    assert "reward_hacking" in kinds, kinds
    assert "reward hacking" in (result.run_dir / "report.html").read_text()


def test_distinct_n_and_perplexity_by_hand(tiny_model_dir, tiny_tokenizer):
    import math

    import torch

    from posttrain.data.formats import validate_record
    from posttrain.evaluation import distinct_n, perplexity
    from posttrain.models.load import load_causal_lm
    from posttrain.rollout.experience import Experience

    # responses [5 6 5 6] and [5 6]: unigrams {5, 6} of 6 -> 2/6; bigrams (5,6),(6,5) of 4
    ids = torch.tensor([[9, 5, 6, 5, 6], [9, 5, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    exp = Experience(input_ids=ids, attention_mask=torch.ones_like(ids, dtype=torch.bool),
                     response_mask=mask, group_ids=torch.arange(2),
                     truncated=torch.zeros(2, dtype=torch.bool))
    assert distinct_n(exp, 1) == 2 / 6
    assert distinct_n(exp, 2) == 2 / 4
    # perplexity is exp of the token-mean NLL of the completion tokens
    model = load_causal_lm(tiny_model_dir)
    text = [validate_record({"prompt": "1+2=", "completion": "3"}, "t")]
    ids = [*tiny_tokenizer("1+2=3").input_ids, tiny_tokenizer.eos_token_id]
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits.log_softmax(-1)[0]
    nll = -(logp[3, ids[4]] + logp[4, ids[5]]) / 2  # targets "3" and EOS
    assert perplexity(model, tiny_tokenizer, text) == pytest.approx(math.exp(float(nll)),
                                                                    rel=1e-5)
