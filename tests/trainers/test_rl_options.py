"""Every RL option reaches the loss it names: each test fails if the option is ignored or
wired wrong (an argument swapped, the wrong estimator, the wrong aggregation).

The expected values are computed independently of the trainer's wiring: log-probs and
entropies from the model's own logits (a plain softmax over the vocabulary), the estimators
and aggregations written out by hand below. The hand experience: prompt "1+2=", responses
"3<eos>" (2 tokens) and "4" (1 token; its second position is padding).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.testing import assert_close

from posttrain.rollout.experience import Experience
from posttrain.trainers.rl import RLTrainer
from tests.trainers.test_rl import rl_config, rows_of

MASK = torch.tensor([[True, True], [True, False]])


def built(arithmetic_dir, preset, root) -> RLTrainer:
    t = RLTrainer(rl_config(arithmetic_dir, preset, root, run={"name": f"options-{preset}"}))
    t.build_optimizer()
    return t


@pytest.fixture(scope="module")
def trainer(arithmetic_dir, arithmetic_sft_model, tmp_path_factory):
    return built(arithmetic_dir, "grpo", tmp_path_factory.mktemp("opts"))


@pytest.fixture
def algo(trainer):
    """Set `trainer.algo` fields for one test; restored afterwards."""
    original = trainer.algo

    def set_(**fields):
        trainer.algo = dataclasses.replace(original, **fields)
        return trainer.algo

    yield set_
    trainer.algo = original


def experience(t: RLTrainer, advantages, scores=(1.0, 0.0), truncated=(False, False)):
    tok = t.tokenizer
    prompt = tok("1+2=").input_ids
    rows = [prompt + tok(a, add_special_tokens=False).input_ids + [tok.eos_token_id]
            for a in ("3", "4")]
    ids = torch.tensor(rows)
    exp = Experience(input_ids=ids, attention_mask=torch.ones_like(ids, dtype=torch.bool),
                     response_mask=MASK.clone(), group_ids=torch.zeros(2, dtype=torch.long),
                     truncated=torch.tensor(truncated), prompts=("1+2=",) * 2,
                     texts=("3", "4"), scores=torch.tensor(scores))
    exp = t.score(exp)
    # a reference that differs from the policy, so every KL term is non-zero
    ref = exp.old_logp - torch.tensor([[0.3, -0.2], [0.5, 0.0]])
    return exp.replace(ref_logp=torch.where(MASK, ref, 0.0),
                       advantages=torch.where(MASK, torch.tensor(advantages)[:, None], 0.0))


def logits_view(t: RLTrainer, exp: Experience):
    """(log π, H) of the response tokens, straight from the logits (temperature 1)."""
    with torch.no_grad():
        logits = t.model(input_ids=exp.input_ids).logits.float()
    p = exp.input_ids.shape[1] - 2
    logsm = torch.log_softmax(logits[:, p - 1 : p + 1], -1)
    logp = logsm.gather(-1, exp.input_ids[:, p:, None]).squeeze(-1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    return logp, entropy


def seq_mean_token_mean(x):  # rows [x00, x01] and [x10]
    return ((x[0][0] + x[0][1]) / 2 + x[1][0]) / 2


def token_mean(x):
    return (x[0][0] + x[0][1] + x[1][0]) / 3


def loss_of(t: RLTrainer, exp: Experience) -> float:
    with torch.no_grad():
        loss, _ = t.policy_loss(exp, t.step_counts(exp))
    return float(loss)


def test_step_counts_are_the_batchs(trainer):
    counts = trainer.step_counts(experience(trainer, [0.0, 0.0]))
    assert (counts.tokens, counts.seqs, counts.rows) == (3.0, 2.0, 2.0)
    assert counts.norm_len == trainer.config.rollout.max_new_tokens


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_in_loss_is_beta_times_the_configured_estimator_of_policy_vs_reference(
        trainer, algo, estimator):
    """Advantages 0: the loss is β·agg(k(log ρ)), log ρ = log π_ref − log π_θ."""
    algo(kl_placement="loss", kl_estimator=estimator, entropy_coef=0.0)
    exp = experience(trainer, [0.0, 0.0])
    logp, _ = logits_view(trainer, exp)
    log_rho = (exp.ref_logp - logp).tolist()
    k = {"k1": lambda r: -r, "k2": lambda r: 0.5 * r * r,
         "k3": lambda r: math.expm1(r) - r}[estimator]
    expected = trainer.kl_ctl.value * seq_mean_token_mean([[k(v) for v in row]
                                                            for row in log_rho])
    assert abs(expected) > 1e-4
    assert loss_of(trainer, exp) == pytest.approx(expected, rel=1e-4, abs=1e-7)


def test_kl_placement_none_and_reward_put_no_kl_in_the_loss(trainer, algo):
    exp = experience(trainer, [0.0, 0.0])
    for placement in ("none", "reward"):
        algo(kl_placement=placement)
        assert loss_of(trainer, exp) == 0.0, placement


def test_entropy_bonus_is_minus_its_coefficient_times_the_entropy(trainer, algo):
    algo(kl_placement="none", entropy_coef=0.05)
    exp = experience(trainer, [0.0, 0.0])
    _, entropy = logits_view(trainer, exp)
    expected = -0.05 * seq_mean_token_mean(entropy.tolist())
    assert loss_of(trainer, exp) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean",
                                  "seq-mean-token-sum-norm"])
def test_the_configured_aggregation_is_the_one_applied(trainer, algo, mode):
    """On-policy (ratio 1) the clipped surrogate is −A per token; A = [2, −1]."""
    algo(kl_placement="none", aggregation=mode)
    exp = experience(trainer, [2.0, -1.0])
    per_token = [[-2.0, -2.0], [1.0]]
    t_max = trainer.config.rollout.max_new_tokens
    expected = {"token-mean": token_mean(per_token),
                "seq-mean-token-mean": seq_mean_token_mean(per_token),
                "seq-mean-token-sum-norm": (-4.0 / t_max + 1.0 / t_max) / 2}[mode]
    exp = exp.replace(old_logp=logits_view(trainer, exp)[0])  # ratio exactly 1
    assert loss_of(trainer, exp) == pytest.approx(expected, rel=1e-5)


def test_positive_example_lm_loss_is_the_nll_of_the_correct_responses(trainer, algo):
    """Scores [1, 0.3] with threshold 0.5: only row 0 is correct (with the default threshold
    0, both would be); μ·token-mean NLL over it."""
    algo(kl_placement="none", positive_lm_coef=0.1, positive_threshold=0.5)
    exp = experience(trainer, [0.0, 0.0], scores=(1.0, 0.3))
    logp, _ = logits_view(trainer, exp)
    expected = 0.1 * -(float(logp[0, 0]) + float(logp[0, 1])) / 2
    assert trainer.step_counts(exp).positive_tokens == 2.0
    assert loss_of(trainer, exp) == pytest.approx(expected, rel=1e-4)
    one = exp.select(torch.tensor([1])).replace(scores=torch.tensor([1.0]))  # one token
    assert trainer.step_counts(one).positive_tokens == 1.0
    assert loss_of(trainer, one) == pytest.approx(-0.1 * float(logp[1, 0]), rel=1e-4)


def test_the_policy_losses_clip_numbers_reach_it(trainer, algo):
    """A ratio of e^0.5 ≈ 1.65 with A = 1: clipped at 1 + clip_high (PPO's clip)."""
    exp = experience(trainer, [1.0, 1.0])
    logp, _ = logits_view(trainer, exp)
    exp = exp.replace(old_logp=torch.where(MASK, logp - 0.5, 0.0))
    for high in (0.2, 0.4):
        algo(kl_placement="none", clip_high=high, aggregation="token-mean")
        assert loss_of(trainer, exp) == pytest.approx(-(1 + high), rel=1e-5)
    algo(kl_placement="none", policy_loss="sapo", tau_pos=2.0, aggregation="token-mean")
    # SAPO: −(4/τ)·σ(τ·(r − 1))·A with τ = τ_pos for A > 0
    r = math.exp(0.5)
    assert loss_of(trainer, exp) == pytest.approx(-(4 / 2.0) / (1 + math.exp(-2.0 * (r - 1))),
                                                  rel=1e-5)


def test_reward_clip_and_whitening_shape_the_sequence_reward(trainer, algo):
    exp = experience(trainer, [0.0, 0.0], scores=(3.0, -2.0))
    algo(kl_placement="none", reward_clip=1.0)
    last = trainer.shape(exp).token_rewards
    assert last[0, 1] == 1.0 and last[1, 0] == -1.0  # at each row's last counted token
    algo(kl_placement="none", reward_whiten=True)
    shaped = trainer.shape(exp).token_rewards
    # scale only: (x − mean)/std + mean, unbiased std of [3, −2] = 5/√2
    mean, std = 0.5, 5 / math.sqrt(2)
    assert_close(shaped[0, 1], torch.tensor((3.0 - mean) / std + mean), atol=1e-5, rtol=0)
    assert_close(shaped[1, 0], torch.tensor((-2.0 - mean) / std + mean), atol=1e-5, rtol=0)


def test_overlong_mask_drops_the_truncated_response_from_loss_and_group(trainer, algo):
    """Row 1 truncated: masked out, advantage 0, and not part of its group's statistics
    (which then has one valid row and gives it no advantage either)."""
    algo(kl_placement="none", overlong="mask")
    exp = experience(trainer, [0.0, 0.0], scores=(1.0, 0.0), truncated=(False, True))
    shaped = trainer.shape(exp)
    assert shaped.response_mask[1].sum() == 0 and shaped.response_mask[0].all()
    adv = trainer.advantages(shaped).advantages
    assert torch.equal(adv, torch.zeros_like(adv))
    # without the mask, the same scores give the two rows opposite advantages
    algo(kl_placement="none", overlong="none")
    adv = trainer.advantages(trainer.shape(exp)).advantages
    assert adv[0, 0] > 0 > adv[1, 0]


@pytest.mark.parametrize("mode", ["none", "group", "global"])
def test_the_configured_whitening_is_applied(trainer, algo, mode):
    """GRPO advantages of four rows in two groups, then the whitening of the config."""
    algo(kl_placement="none", whiten=mode)
    exp = experience(trainer, [0.0, 0.0])
    exp = Experience.concat([exp, exp], trainer.tokenizer.pad_token_id)
    exp = exp.replace(group_ids=torch.tensor([0, 0, 1, 1]),
                      scores=torch.tensor([1.0, 0.0, 3.0, 1.0]),
                      response_mask=torch.ones(4, 2, dtype=torch.bool))
    adv = trainer.advantages(trainer.shape(exp)).advantages
    # GRPO gives ±(x − mean)/std = ±1/√2 in both groups; every token of a row carries it
    c = 1 / math.sqrt(2)
    if mode == "none":
        assert_close(adv, torch.tensor([[c, c], [-c, -c], [c, c], [-c, -c]]), atol=1e-4,
                     rtol=0)
        return
    parts = [adv[:2], adv[2:]] if mode == "group" else [adv]
    for part in parts:  # zero mean, unit (unbiased) variance over the tokens whitened
        assert abs(float(part.mean())) < 1e-5
        assert float(part.std()) == pytest.approx(1.0, abs=1e-4)
    if mode == "global":  # one batch statistic: ±c/std(±c over 8 tokens) = ±√(7/8)
        assert float(adv[0, 0]) == pytest.approx(math.sqrt(7 / 8), abs=1e-4)


def test_bf16_gives_the_float32_policy_loss_and_gradient_to_bf16_precision(trainer, algo):
    """run.precision=bf16 on an RL micro-batch (advantages of both signs, the k3 KL in the
    loss, an entropy bonus), forward under autocast as the accumulator runs it: the loss
    agrees with float32 within 5% (bfloat16 log-probs are off by ~1e-2 here, and the ratio
    π/π_old, recorded in float32, carries that: 2.7% measured), the gradient's direction
    within cosine 0.99, and the gradient stays float32."""
    algo(kl_placement="loss", kl_estimator="k3", entropy_coef=0.01)
    exp = experience(trainer, [1.0, -0.5])
    counts = trainer.step_counts(exp)
    original, results = trainer.run, {}
    try:
        for precision in ("fp32", "bf16"):
            trainer.run = dataclasses.replace(original, precision=precision)
            trainer.model.zero_grad(set_to_none=True)
            with trainer.autocast():
                loss, _ = trainer.policy_loss(exp, counts)
            loss.backward()
            grad = torch.cat([p.grad.flatten() for p in trainer.model.parameters()])
            assert grad.dtype == torch.float32
            results[precision] = (loss.detach().float(), grad)
    finally:
        trainer.run = original
        trainer.model.zero_grad(set_to_none=True)
    (l32, g32), (l16, g16) = results["fp32"], results["bf16"]
    assert not torch.equal(g32, g16)  # bf16 really ran
    assert abs(float(l32)) > 1e-3
    assert_close(l16, l32, rtol=5e-2, atol=0)
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99


@pytest.mark.parametrize(("policy", "value"), [("seq-mean-token-mean", "token-mean"),
                                               ("token-mean", "seq-mean-token-mean")])
def test_value_loss_uses_its_own_aggregation(arithmetic_dir, arithmetic_sft_model, tmp_path,
                                             policy, value):
    t = RLTrainer(rl_config(arithmetic_dir, "ppo", tmp_path, run={"name": "vagg"},
                            algo={"aggregation": policy, "value_aggregation": value,
                                  "value_clip": None}))
    t.build_optimizer()
    exp = experience(t, [0.0, 0.0])
    exp = exp.replace(returns=torch.where(MASK, exp.values + torch.tensor([[1.0, 2.0],
                                                                           [4.0, 0.0]]), 0.0))
    with torch.no_grad():
        loss, _ = t.value_loss(exp, t.step_counts(exp))
    # ½·(V − Ret)² = ½, 2, 8 per token, aggregated the value loss's way, not the policy's
    expected = {"token-mean": (0.5 + 2.0 + 8.0) / 3,
                "seq-mean-token-mean": ((0.5 + 2.0) / 2 + 8.0) / 2}[value]
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_value_loss_clips_at_value_clip(arithmetic_dir, arithmetic_sft_model, tmp_path):
    t = RLTrainer(rl_config(arithmetic_dir, "ppo", tmp_path, run={"name": "vclip"},
                            algo={"value_aggregation": "token-mean", "value_clip": 0.5}))
    t.build_optimizer()
    exp = experience(t, [0.0, 0.0])
    v = exp.values  # what the critic predicts now; the rollout's values are moved off it by d
    d = torch.tensor([[1.0, 0.1], [-2.0, 0.0]])
    r = torch.tensor([[1.0, 2.0], [4.0, 0.0]])
    exp = exp.replace(values=torch.where(MASK, v - d, 0.0), returns=torch.where(MASK, v + r, 0.0))
    with torch.no_grad():
        loss, _ = t.value_loss(exp, t.step_counts(exp))
    # ½·max((V − Ret)², (V_old + clip(V − V_old, ±0.5) − Ret)²) per token:
    # ½·max(1, 1.5²) = 1.125, ½·max(4, 2²) = 2, ½·max(16, 2.5²) = 8 (unclipped: 0.5, 2, 8)
    assert float(loss) == pytest.approx((1.125 + 2.0 + 8.0) / 3, rel=1e-5)


def update_calls(trainer, exp, monkeypatch):
    """The mini-batches `trainer.update(exp)` hands on (rows named by their score), and the
    metrics it returns when mini-batch i reports m = i and its row count."""
    calls = []

    def record(batch):
        calls.append(batch.scores.tolist())
        return {"m": float(len(calls)), "rows": float(len(batch))}

    monkeypatch.setattr(trainer, "update_minibatch", record)
    return calls, trainer.update(exp)


@pytest.mark.parametrize(("epochs", "mini_batches"), [(1, 1), (1, 2), (1, 5), (2, 1), (3, 2)])
def test_update_takes_every_row_once_per_epoch_in_seeded_shuffled_mini_batches(
        trainer, algo, monkeypatch, epochs, mini_batches):
    algo(epochs=epochs, mini_batches=mini_batches)
    rows = torch.tensor([0, 1, 0, 1, 0])
    exp = experience(trainer, [0.0, 0.0]).select(rows).replace(scores=torch.arange(5.0))
    run, step = trainer.run, trainer.step
    trainer.run, trainer.step = dataclasses.replace(run, seed=2), 3
    try:
        calls, metrics = update_calls(trainer, exp, monkeypatch)
    finally:
        trainer.run, trainer.step = run, step
    # the order: rows as they are for one pass in one mini-batch, else a permutation per epoch
    # from a generator seeded with run.seed * 7 + step (a resumed step shuffles alike)
    gen = torch.Generator().manual_seed(2 * 7 + 3)
    size = math.ceil(5 / mini_batches)
    expected = []
    for _ in range(epochs):
        order = torch.randperm(5, generator=gen) if (epochs, mini_batches) != (1, 1) \
            else torch.arange(5)
        expected += [order[s:s + size].float().tolist() for s in range(0, 5, size)]
    assert calls == expected
    k = len(expected)
    assert k == epochs * math.ceil(5 / size)
    assert metrics == {"m": pytest.approx((k + 1) / 2), "rows": pytest.approx(5 * epochs / k)}


def test_update_of_an_empty_batch_still_takes_one_step(trainer, algo, monkeypatch):
    # dynamic sampling can leave a rank no row; it must still join the step's all-reduce once
    algo(epochs=1, mini_batches=2)
    exp = experience(trainer, [0.0, 0.0])
    for keep in ([], [0]):
        calls, metrics = update_calls(trainer, exp.select(torch.tensor(keep, dtype=torch.long)),
                                      monkeypatch)
        assert calls == [[float(exp.scores[i]) for i in keep]]
        assert metrics == {"m": 1.0, "rows": float(len(keep))}


def test_ptx_adds_its_coefficient_times_the_token_mean_nll(arithmetic_dir,
                                                           arithmetic_sft_model, tmp_path):
    t = RLTrainer(rl_config(arithmetic_dir, "ppo_ptx", tmp_path, run={"name": "ptx"},
                            algo={"ptx_coef": 0.5, "ptx_batch_size": 3}))
    t.build_optimizer()
    jobs = t.ptx_jobs()
    assert jobs
    with torch.no_grad():
        total = sum(float(job()[0]) for job in jobs)
    items = t.ptx_items[:3]  # step 0 takes the first ptx_batch_size texts
    nll, count = 0.0, 0
    with torch.no_grad():
        for it in items:
            ids = torch.tensor([it.input_ids])
            logsm = torch.log_softmax(t.model(input_ids=ids).logits.float()[0, :-1], -1)
            for pos in range(1, len(it.input_ids)):
                if it.loss_mask[pos]:
                    nll -= float(logsm[pos - 1, it.input_ids[pos]])
                    count += 1
    assert total == pytest.approx(0.5 * nll / count, rel=1e-4)


def test_value_pretraining_trains_the_critic_and_leaves_the_policy(arithmetic_dir,
                                                                    arithmetic_sft_model,
                                                                    tmp_path):
    t = RLTrainer(rl_config(arithmetic_dir, "vc_ppo", tmp_path, run={"name": "vpre"},
                            rollout={"prompts_per_step": 4},
                            algo={"value_pretrain_steps": 2}))
    t.build_optimizer()
    policy = [p.detach().clone() for p in t.model.parameters()]
    critic = [p.detach().clone() for p in t.critic.parameters()]
    t.pretrain_values()
    assert all(torch.equal(p, q) for p, q in zip(t.model.parameters(), policy, strict=True))
    assert any(not torch.equal(p, q) for p, q in zip(t.critic.parameters(), critic,
                                                     strict=True))


@pytest.mark.parametrize("controller", ["adaptive", "ppo_adaptive"])
def test_the_kl_controller_follows_its_rule_after_a_step(arithmetic_dir, arithmetic_sft_model,
                                                          tmp_path, controller):
    t = RLTrainer(rl_config(arithmetic_dir, "grpo", tmp_path,
                            run={"name": controller, "steps": 1, "eval_every": 0,
                                 "log_every": 1},
                            rollout={"prompts_per_step": 2}, eval={"prompts": 4},
                            algo={"kl_controller": controller, "kl_target": 100.0,
                                  "kl_horizon": 100.0}))
    beta = t.kl_ctl.value
    t.train()
    kl = next(r["kl/ref_seq"] for r in rows_of(t.run_dir) if "kl/ref_seq" in r)
    n = 2 * t.config.rollout.samples_per_prompt
    assert kl < 100.0 / 1.5  # far below the target
    if controller == "adaptive":  # e = clip(KL/target − 1, ±0.2) = −0.2; n = 16 samples
        assert t.kl_ctl.value == pytest.approx(beta * (1 - 0.2 * n / 100.0))
    else:  # KL < target/1.5: β halves
        assert t.kl_ctl.value == pytest.approx(beta / 2)


def test_the_reference_is_not_the_policy_kl_grows_from_zero(arithmetic_dir,
                                                            arithmetic_sft_model, tmp_path):
    """k3 (≥ 0, and 0 only where π_θ = π_ref): 0 at the first step, then > 0 once the
    policy has moved; a reference that were secretly the policy would stay at 0."""
    t = RLTrainer(rl_config(arithmetic_dir, "grpo", tmp_path,
                            run={"name": "klgrows", "steps": 3, "eval_every": 0,
                                 "log_every": 1},
                            rollout={"prompts_per_step": 2}, eval={"prompts": 4},
                            algo={"mini_batches": 1}, optim={"lr": 1e-3}))
    t.train()
    kl = [r["kl/ref_loss"] for r in rows_of(t.run_dir) if "kl/ref_loss" in r]
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[-1] > 1e-4, kl


# --- the wiring between a rollout and the optimiser step (mutation-tested:
# scripts/mutation_wiring.sh) ----------------------------------------------------------------


def test_shape_adds_the_soft_overlong_penalty_and_the_kl_in_the_reward(trainer, algo):
    exp = experience(trainer, [0.0, 0.0], scores=(1.0, 0.5))
    l_max = trainer.config.rollout.response_tokens
    cache = l_max - 1  # the penalty starts past 1 token: the 2-token row pays (2 − 1)/cache
    algo(kl_placement="none", overlong="penalty", overlong_cache=cache, overlong_penalty=1.5)
    rewards = trainer.shape(exp).token_rewards
    assert_close(rewards, torch.tensor([[0.0, 1.0 - 1.5 / cache], [0.5, 0.0]]), atol=1e-6,
                 rtol=0)
    # a response shorter than where the penalty starts gets no bonus: the overshoot is
    # clamped at 0 (l_max − 1 tokens free, and both rows are shorter)
    algo(kl_placement="none", overlong="penalty", overlong_cache=1, overlong_penalty=1.5)
    rewards = trainer.shape(exp).token_rewards
    assert_close(rewards, torch.tensor([[0.0, 1.0], [0.5, 0.0]]), atol=1e-6, rtol=0)
    # in the reward: −β·k1(π_old, π_ref) on every token, the score added at the last one;
    # old − ref is [[0.3, −0.2], [0.5, pad]] by construction
    algo(kl_placement="reward")
    beta = trainer.kl_ctl.value
    assert beta > 0
    rewards = trainer.shape(exp).token_rewards
    assert_close(rewards, torch.tensor([[-0.3 * beta, 0.2 * beta + 1.0],
                                        [-0.5 * beta + 0.5, 0.0]]), atol=1e-5, rtol=0)


def test_an_episodes_turn_rewards_stay_at_their_turns_and_shaping_goes_to_the_end(trainer,
                                                                                  algo):
    """Turn rewards (token_scores) at their tokens; the episode's score is their sum, and what
    shaping changes of it (here the reward clip) is added at the last token."""
    exp = experience(trainer, [0.0, 0.0], scores=(0.8, 0.2)).replace(
        token_scores=torch.tensor([[0.3, 0.5], [0.2, 0.0]]))
    algo(kl_placement="none")
    assert_close(trainer.shape(exp).token_rewards, torch.tensor([[0.3, 0.5], [0.2, 0.0]]),
                 atol=1e-6, rtol=0)
    algo(kl_placement="none", reward_clip=0.6)  # 0.8 → 0.6: the last token gets 0.5 − 0.2
    assert_close(trainer.shape(exp).token_rewards, torch.tensor([[0.3, 0.3], [0.2, 0.0]]),
                 atol=1e-6, rtol=0)


def test_step_counts_leave_out_empty_rows_and_never_fall_to_zero(trainer):
    exp = experience(trainer, [0.0, 0.0])
    masked = exp.replace(response_mask=torch.tensor([[True, True], [False, False]]))
    counts = trainer.step_counts(masked)
    assert (counts.tokens, counts.seqs, counts.rows) == (2.0, 1.0, 2.0)
    assert counts.positive_tokens == 1.0  # not counted without the positive-example loss
    empty = trainer.step_counts(exp.select(torch.tensor([], dtype=torch.long)))
    assert (empty.tokens, empty.seqs, empty.rows) == (1.0, 1.0, 1.0)  # no division by zero


def test_the_micro_batches_fit_the_token_budget(trainer):
    exp = experience(trainer, [0.0, 0.0]).select(torch.tensor([0, 1, 0, 1, 0]))
    width = exp.input_ids.shape[1]
    run = trainer.run
    try:
        trainer.run = dataclasses.replace(run, micro_batch_tokens=2 * width + 1)
        assert trainer._micro_indices(exp) == [[0, 1], [2, 3], [4]]
        trainer.run = dataclasses.replace(run, micro_batch_tokens=width - 1)  # below one row
        assert trainer._micro_indices(exp) == [[0], [1], [2], [3], [4]]
    finally:
        trainer.run = run


@pytest.fixture(scope="module")
def ppo(arithmetic_dir, arithmetic_sft_model, tmp_path_factory):
    return built(arithmetic_dir, "ppo", tmp_path_factory.mktemp("opts_ppo"))


def gae_by_hand(rewards, values, lengths, gamma, lams):
    """A_t = Σ_k (γλ)^k δ_{t+k}, δ_t = r_t + γ·V_{t+1} − V_t, V past the end 0: row by row."""
    out = []
    for r, v, n, lam in zip(rewards, values, lengths, lams, strict=True):
        deltas = [r[t] + gamma * (v[t + 1] if t + 1 < n else 0.0) - v[t] for t in range(n)]
        out.append([sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
                    for t in range(n)] + [0.0] * (len(r) - n))
    return torch.tensor(out)


@pytest.mark.parametrize("schedule", ["fixed", "length_adaptive"])
def test_gae_advantages_and_returns_use_gamma_and_both_lambdas(ppo, schedule):
    exp = experience(ppo, [0.0, 0.0])
    rewards = [[0.5, 1.0], [2.0, 0.0]]
    values = [[0.2, 0.4], [0.1, 0.0]]
    exp = exp.replace(token_rewards=torch.tensor(rewards), values=torch.tensor(values))
    original = ppo.algo
    ppo.algo = dataclasses.replace(original, gamma=0.9, lam=0.8, critic_lam=0.7,
                                   lambda_schedule=schedule, length_alpha=1.0, whiten="none")
    try:
        out = ppo.advantages(exp)
    finally:
        ppo.algo = original
    # VAPO's λ = 1 − 1/(α·l): rows of 2 and 1 tokens, α = 1
    lams = [0.8, 0.8] if schedule == "fixed" else [0.5, 0.0]
    assert_close(out.advantages, gae_by_hand(rewards, values, [2, 1], 0.9, lams),
                 atol=1e-6, rtol=0)
    returns = gae_by_hand(rewards, values, [2, 1], 0.9, [0.7, 0.7]) + torch.where(
        MASK, torch.tensor(values), 0.0)
    assert_close(out.returns, returns, atol=1e-6, rtol=0)


def test_the_advantages_of_an_empty_batch_are_empty(trainer, ppo):
    # dynamic sampling can leave a rank no row: its step goes on with nothing to train
    for t in (trainer, ppo):
        exp = t.shape(experience(t, [0.0, 0.0]).select(torch.tensor([], dtype=torch.long)))
        out = t.advantages(exp)
        assert out.advantages.shape == (0, 2)
        assert (out.returns is None) == (t.critic is None)
        if t.critic is not None:
            assert out.returns.shape == (0, 2)


def test_the_policy_loss_uses_the_sampling_temperature(trainer, algo):
    """The log-probs (and the entropy) of the policy that sampled: logits / T; T = 0 (greedy)
    counts as 1."""
    algo(kl_placement="none", entropy_coef=0.05)
    exp = experience(trainer, [0.0, 0.0])
    with torch.no_grad():
        logits = trainer.model(input_ids=exp.input_ids).logits.float()
    p = exp.input_ids.shape[1] - 2
    config = trainer.config
    try:
        for temperature, divide in ((0.5, 0.5), (0.0, 1.0)):
            trainer.config = dataclasses.replace(config, rollout=dataclasses.replace(
                config.rollout, temperature=temperature))
            logsm = torch.log_softmax(logits[:, p - 1 : p + 1] / divide, -1)
            entropy = -(logsm.exp() * logsm).sum(-1)
            expected = -0.05 * seq_mean_token_mean(entropy.tolist())
            assert loss_of(trainer, exp) == pytest.approx(expected, rel=1e-4), temperature
    finally:
        trainer.config = config


def test_on_policy_the_ratio_is_one_whatever_old_logp_says(trainer, algo):
    """With old log-probs reused (`_reuse_now`: one on-policy pass), π_old is the forward pass
    itself, so a recorded old_logp off by 0.5 changes nothing: −A per token."""
    algo(kl_placement="none", aggregation="token-mean")
    exp = experience(trainer, [1.0, 1.0])
    logp, _ = logits_view(trainer, exp)
    exp = exp.replace(old_logp=torch.where(MASK, logp - 0.5, 0.0))
    reuse = trainer._reuse_now
    try:
        trainer._reuse_now = True
        assert loss_of(trainer, exp) == pytest.approx(-1.0, rel=1e-5)
        trainer._reuse_now = False
        assert loss_of(trainer, exp) == pytest.approx(-1.2, rel=1e-5)  # clipped at 1 + 0.2
    finally:
        trainer._reuse_now = reuse


def test_a_sampling_engines_log_probs_give_mismatch_metrics_and_the_correction(trainer, algo):
    """Engine log-probs μ below π_old by δ: the metrics are token means over the step's
    tokens, and token-level TIS weights each token's surrogate by min(e^δ, C)."""
    algo(kl_placement="none", aggregation="token-mean", is_cap=1.5, is_low=0.95, is_high=3.0)
    exp = experience(trainer, [1.0, 1.0])
    logp, _ = logits_view(trainer, exp)
    delta = torch.tensor([[0.2, -0.1], [1.0, 0.0]])
    exp = exp.replace(old_logp=torch.where(MASK, logp, 0.0),
                      behavior_logp=torch.where(MASK, logp - delta, 0.0))
    correction = trainer._correction_now
    try:
        trainer._correction_now = "tis"
        counts = trainer.step_counts(exp)
        with torch.no_grad():
            loss, metrics = trainer.policy_loss(exp, counts)
            # the same micro-batch as half of a step of 6 tokens: its share of each mean
            _, half = trainer.policy_loss(exp, counts._replace(tokens=6.0))
        weights = [math.exp(0.2), math.exp(-0.1), 1.5]
        assert float(loss) == pytest.approx(-sum(weights) / 3, rel=1e-5)
        assert float(metrics["mismatch/weight_mean"]) == pytest.approx(sum(weights) / 3,
                                                                        rel=1e-5)
        assert float(metrics["mismatch/abs_logp_mean"]) == pytest.approx(1.3 / 3, rel=1e-5)
        # π_old/μ = e^δ: e^−0.1 ≈ 0.905 is below is_low 0.95, e ≈ 2.72 inside is_high 3 (with
        # the defaults 0.5 and 2 it would be the other way round)
        assert float(metrics["mismatch/outside"]) == pytest.approx(1 / 3, rel=1e-6)
        for key in ("mismatch/weight_mean", "mismatch/abs_logp_mean", "mismatch/k3"):
            assert float(half[key]) == pytest.approx(float(metrics[key]) / 2, rel=1e-5), key
        assert float(trainer._mismatch_max) == pytest.approx(1.0, rel=1e-6)
        closer = exp.replace(behavior_logp=torch.where(MASK, logp - delta / 4, 0.0))
        with torch.no_grad():
            trainer.policy_loss(closer, counts)  # the next micro-batch: the max is the step's
        assert float(trainer._mismatch_max) == pytest.approx(1.0, rel=1e-6)
        one = exp.select(torch.tensor([1]))  # a step of one token: its whole mean
        _, single = trainer.policy_loss(one, trainer.step_counts(one))
        assert float(single["mismatch/abs_logp_mean"]) == pytest.approx(1.0, rel=1e-6)
        # OPSM (needs the policy's log-probs and the advantages): a sequence with a negative
        # advantage whose engine drifted above π_θ (mean log μ − log π_θ = 1 > δ) is dropped
        trainer._correction_now = "opsm"
        signed = exp.replace(advantages=torch.where(MASK, torch.tensor([[1.0], [-1.0]]), 0.0),
                             behavior_logp=torch.where(MASK, logp + torch.tensor(
                                 [[-0.2, 0.1], [1.0, 0.0]]), 0.0))
        with torch.no_grad():
            loss, _ = trainer.policy_loss(signed, counts)
        assert float(loss) == pytest.approx(-2 / 3, rel=1e-5)  # uncorrected: (−1 − 1 + 1)/3
        trainer._correction_now = "none"  # measured, not corrected
        with torch.no_grad():
            loss, metrics = trainer.policy_loss(exp, counts)
        assert float(loss) == pytest.approx(-1.0, rel=1e-5)
        assert "mismatch/weight_mean" not in metrics and "mismatch/k3" in metrics
    finally:
        trainer._correction_now = correction
        trainer.__dict__.pop("_mismatch_max", None)


def test_a_non_finite_update_names_the_step_it_was_making(trainer, monkeypatch):
    from posttrain.errors import NonFiniteError

    exp = experience(trainer, [float("nan"), 1.0])
    before = [p.detach().clone() for p in trainer.model.parameters()]
    monkeypatch.setattr(trainer, "step", 3)  # steps 1..3 done: this is step 4
    with pytest.raises(NonFiniteError, match=r"^step 4: "):
        trainer.update_minibatch(exp)
    assert all(torch.equal(p, b) for p, b in zip(trainer.model.parameters(), before,
                                                  strict=True))


def test_update_minibatch_steps_the_policy_and_the_critic_on_each_micro_batch(ppo,
                                                                             monkeypatch):
    """Both optimiser steps get one job per micro-batch, the mini-batch's counts and the number
    of the step being made (steps 1..3 done: 4)."""
    exp = experience(ppo, [1.0, -1.0])
    exp = exp.replace(returns=torch.where(MASK, exp.values + 1.0, 0.0)).select(
        torch.tensor([0, 1, 0]))
    monkeypatch.setattr(ppo, "run", dataclasses.replace(
        ppo.run, micro_batch_tokens=2 * exp.input_ids.shape[1]))
    monkeypatch.setattr(ppo, "step", 3)
    seen = {}
    for name, acc in ppo.accumulators.items():
        def step(jobs, number, name=name):
            seen[name] = ([job() for job in jobs], number)
            return {f"{name}/m": 1.0}
        monkeypatch.setattr(acc, "step", step)
    with torch.no_grad():
        out = ppo.update_minibatch(exp)
        counts = ppo.step_counts(exp)  # of the whole mini-batch, not of each micro-batch
        parts = [exp.select(torch.tensor([0, 1])), exp.select(torch.tensor([2]))]
        policy = [ppo.policy_loss(mb, counts) for mb in parts]
        value = [ppo.value_loss(mb, counts) for mb in parts]
    assert out == {"model/m": 1.0, "critic/m": 1.0}
    assert set(seen) == {"model", "critic"}
    for name, expected in (("model", policy), ("critic", value)):
        results, number = seen[name]
        assert number == 4, name
        assert [float(loss) for loss, _ in results] == pytest.approx(
            [float(loss) for loss, _ in expected], rel=1e-6), name
