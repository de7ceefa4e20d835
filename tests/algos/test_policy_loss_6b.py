"""The newer policy losses of ALGORITHMS.md §6b (GSPO, GSPO-token, CISPO, SAPO): hand-derived
values and gradients, the gradient at ratio 1 against its analytic form, identities between
the losses, the shared signature and the registry's attributes."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch.testing import assert_close

from posttrain.algos import (
    POLICY_LOSSES,
    aggregate_loss,
    cispo_policy_loss,
    clipped_policy_loss,
    gspo_policy_loss,
    gspo_token_policy_loss,
    sapo_policy_loss,
)
from posttrain.errors import ConfigError

D = torch.float64
LN = math.log


def t(x):
    return torch.tensor(x, dtype=D)


def bmask(x):
    return torch.tensor(x, dtype=torch.bool)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# --------------------------------------------------------------------------------------------
# GSPO. Five rows, T = 3, ε_low = ε_high = 0.2; the padding holds garbage on purpose.
G_OLD = t([[-1.0, -2.0, -0.5], [-0.3, -0.7, -1.1], [-2.0, -1.0, -3.0], [-0.4, -0.9, -1.0],
           [-1.0, -1.0, -1.0]])
G_LOG_RATIO = t([
    [LN(1.5) + 0.3, LN(1.5) - 0.3, 7.0],         # mean ln 1.5: s = 1.5
    [LN(0.5) - 0.2, LN(0.5), LN(0.5) + 0.2],     # mean ln 0.5: s = 0.5
    [0.1, -0.1, -9.0],                           # mean 0: s = 1
    [LN(0.5) + 0.1, LN(0.5) - 0.1, 3.0],         # s = 0.5
    [1.0, 2.0, 3.0],                             # no counted token
])
G_LOGP = G_OLD + G_LOG_RATIO
G_ADV = t([[2.0, 2.0, 50.0], [-1.0, -1.0, -1.0], [3.0, 1.0, 50.0], [1.0, 1.0, -50.0],
           [4.0, 4.0, 4.0]])
G_MASK = bmask([[1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 0], [0, 0, 0]])
CLIP = {"clip_low": 0.2, "clip_high": 0.2}


def test_gspo_by_hand():
    loss, metrics = gspo_policy_loss(G_LOGP, G_OLD, G_ADV, G_MASK, **CLIP)
    # row 0: Â = 2, s = 1.5 > 1.2: ℓ = -min(1.5·2, 1.2·2) = -2.4 (clipped)
    # row 1: Â = -1, s = 0.5 < 0.8: ℓ = -min(-0.5, -0.8) = 0.8 (clipped)
    # row 2: Â = mean(3, 1) = 2, s = 1: ℓ = -2 (inside the clip range)
    # row 3: Â = 1, s = 0.5: ℓ = -min(0.5, 0.8) = -0.5 (no lower clip for Â > 0)
    # row 4: no counted token, no loss. ℓ_i sits on every counted token of row i.
    expected = t([[-2.4, -2.4, 0.0], [0.8, 0.8, 0.8], [-2.0, -2.0, 0.0], [-0.5, -0.5, 0.0],
                  [0.0, 0.0, 0.0]])
    assert_close(loss, expected, atol=1e-12, rtol=0)
    # seq-mean-token-mean gives mean_i ℓ_i over the 4 sequences: (-2.4 + 0.8 - 2 - 0.5)/4
    assert_close(aggregate_loss(loss, G_MASK, "seq-mean-token-mean"), t(-4.1 / 4), atol=1e-12,
                 rtol=0)
    # 2 of the 4 sequences clipped; mean s = (1.5 + 0.5 + 1 + 0.5)/4 = 0.875
    assert_close(metrics["policy/clipfrac"], t(0.5), atol=0, rtol=0)
    assert_close(metrics["policy/seq_ratio_mean"], t(0.875), atol=1e-12, rtol=0)
    # approx_kl: token k3 = e^x - 1 - x over the 9 counted tokens
    xs = [float(x) for x in G_LOG_RATIO[G_MASK]]
    assert_close(metrics["policy/approx_kl"], t(sum(math.expm1(x) - x for x in xs) / 9),
                 atol=1e-12, rtol=0)
    assert all(not v.requires_grad and v.dim() == 0 for v in metrics.values())


def test_gspo_gradient_by_hand_off_policy():
    # L = (1/N) Σ_i ℓ_i with N = 4 sequences; ∂s_i/∂log π_{i,t} = s_i/|y_i|, so where the
    # unclipped term is taken ∂L/∂log π_{i,t} = -Â_i·s_i/(N·|y_i|):
    #   row 2: -2·1/(4·2) = -1/4;  row 3: -1·0.5/(4·2) = -1/16
    # rows 0 and 1 are clipped: the clipped term is constant in θ, gradient 0.
    logp = G_LOGP.clone().requires_grad_(True)
    loss, _ = gspo_policy_loss(logp, G_OLD, G_ADV, G_MASK, **CLIP)
    aggregate_loss(loss, G_MASK, "seq-mean-token-mean").backward()
    expected = t([[0, 0, 0], [0, 0, 0], [-0.25, -0.25, 0], [-1 / 16, -1 / 16, 0], [0, 0, 0]])
    assert_close(logp.grad, expected, atol=1e-15, rtol=0)


def _row_constant_advantages(seed, b=6, n=5):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(n)[None, :] < torch.tensor([5, 1, 3, 0, 4, 2])[:, None]
    adv = torch.randn(b, 1, generator=g, dtype=D).expand(b, n).clone()
    logp = -torch.rand(b, n, generator=g, dtype=D) * 3
    return logp, adv, mask


@pytest.mark.parametrize("fn", [gspo_policy_loss, gspo_token_policy_loss])
def test_gspo_gradient_at_ratio_one(fn):
    # On-policy (π_old = π_θ): s_i = 1 and ∂s_i/∂log π_{i,t} = 1/|y_i| (GSPO) or the token's
    # own 1 (GSPO-token, then /|y_i| from the aggregation), so with N sequences
    #   ∂L/∂log π_{i,t} = -Â_i / (N·|y_i|)
    logp, adv, mask = _row_constant_advantages(0)
    logp.requires_grad_(True)
    loss, metrics = fn(logp, logp.detach(), adv, mask, **CLIP)
    aggregate_loss(loss, mask, "seq-mean-token-mean").backward()
    n_i = mask.sum(-1, keepdim=True).to(D)
    n_seqs = int((n_i > 0).sum())
    expected = torch.where(mask, -adv / (n_seqs * n_i.clamp(min=1)), torch.zeros_like(adv))
    assert_close(logp.grad, expected, atol=1e-15, rtol=0)
    assert_close(metrics["policy/seq_ratio_mean"], t(1.0), atol=0, rtol=0)
    assert_close(metrics["policy/clipfrac"], t(0.0), atol=0, rtol=0)


def test_gspo_token_by_hand():
    logp = G_LOGP.clone().requires_grad_(True)
    loss, metrics = gspo_token_policy_loss(logp, G_OLD, G_ADV, G_MASK, **CLIP)
    # s_{i,t} has the value s_i; per token ℓ_{i,t} = -min(s_i·A_{i,t}, clip(s_i)·A_{i,t}):
    # rows 0, 1, 3 as GSPO (constant A); row 2 (s = 1): -A_t = -3, -1
    expected = t([[-2.4, -2.4, 0.0], [0.8, 0.8, 0.8], [-3.0, -1.0, 0.0], [-0.5, -0.5, 0.0],
                  [0.0, 0.0, 0.0]])
    assert_close(loss, expected, atol=1e-12, rtol=0)
    # the tokens of rows 0 and 1 are clipped: 5 of 9
    assert_close(metrics["policy/clipfrac"], t(5 / 9), atol=1e-15, rtol=0)
    assert_close(metrics["policy/seq_ratio_mean"], t(0.875), atol=1e-12, rtol=0)
    # gradient: ∂ℓ_{i,t}/∂log π_{i,t} = -A_{i,t}·s_i for that token alone, then 1/(N·|y_i|):
    #   row 2: -3/8, -1/8 (GSPO spreads Â_i: -1/4 each); row 3: -0.5/8; rows 0, 1 clipped: 0
    aggregate_loss(loss, G_MASK, "seq-mean-token-mean").backward()
    grad = t([[0, 0, 0], [0, 0, 0], [-3 / 8, -1 / 8, 0], [-1 / 16, -1 / 16, 0], [0, 0, 0]])
    assert_close(logp.grad, grad, atol=1e-15, rtol=0)


def test_gspo_token_equals_gspo_when_the_advantage_is_constant_per_row():
    # The paper's identity: with Â_{i,t} = Â_i, value and gradient of GSPO-token are GSPO's.
    logp, adv, mask = _row_constant_advantages(1)
    old = logp + torch.randn(logp.shape, generator=torch.Generator().manual_seed(2),
                             dtype=D) * 0.1
    out = {}
    for fn in (gspo_policy_loss, gspo_token_policy_loss):
        x = logp.clone().requires_grad_(True)
        loss, _ = fn(x, old, adv, mask, clip_low=0.03, clip_high=0.04)
        agg = aggregate_loss(loss, mask, "seq-mean-token-mean")
        agg.backward()
        out[fn] = (loss.detach(), agg.detach(), x.grad)
    a, b = out[gspo_policy_loss], out[gspo_token_policy_loss]
    clipped = gspo_policy_loss(logp, old, adv, mask, clip_low=0.03, clip_high=0.04)[1]
    assert 0 < float(clipped["policy/clipfrac"]) < 1  # both branches exercised
    for x, y in zip(a, b, strict=True):
        assert_close(x, y, atol=1e-14, rtol=0)


# --------------------------------------------------------------------------------------------
# CISPO
C_OLD = t([[-1.5, -1.0, -1.0, -0.35], [-1.0, -1.0, -1.0, -1.0]])
C_LOGP = t([[-0.5, -2.0, -1.0, -0.25], [5.0, 5.0, 5.0, 5.0]])  # log ratios 1, -1, 0, 0.1
C_ADV = t([[2.0, -1.0, 1.5, -2.0], [9.0, 9.0, 9.0, 9.0]])
C_MASK = bmask([[1, 1, 1, 1], [0, 0, 0, 0]])


def test_cispo_by_hand_clipped_tokens_still_learn():
    logp = C_LOGP.clone().requires_grad_(True)
    loss, metrics = cispo_policy_loss(logp, C_OLD, C_ADV, C_MASK, clip_low=0.2, clip_high=0.28)
    r3 = math.exp(0.1)
    # ℓ_t = -ŵ_t·A_t·log π_t with ŵ = sg(clip(r, 0.8, 1.28)):
    #   t0: r = e > 1.28 → ŵ 1.28: -1.28·2·(-0.5) = 1.28
    #   t1: r = 1/e < 0.8 → ŵ 0.8: -0.8·(-1)·(-2) = -1.6
    #   t2: r = 1 → ŵ 1: -1·1.5·(-1) = 1.5
    #   t3: r = e^0.1 inside → ŵ = e^0.1: -e^0.1·(-2)·(-0.25) = -0.5·e^0.1
    expected = t([[1.28, -1.6, 1.5, -0.5 * r3], [0.0, 0.0, 0.0, 0.0]])
    assert_close(loss, expected, atol=1e-12, rtol=0)
    assert_close(metrics["policy/clipfrac"], t(0.5), atol=0, rtol=0)  # t0 and t1
    # ∂ℓ_t/∂log π_t = -ŵ_t·A_t (ŵ carries no gradient): -2.56, 0.8, -1.5, 2·e^0.1.
    # The clipped tokens t0 and t1 learn; PPO's clip gives t0 no gradient at all.
    loss.sum().backward()
    assert_close(logp.grad, t([[-2.56, 0.8, -1.5, 2 * r3], [0, 0, 0, 0]]), atol=1e-12, rtol=0)
    ppo_logp = C_LOGP.clone().requires_grad_(True)
    clipped_policy_loss(ppo_logp, C_OLD, C_ADV, C_MASK)[0].sum().backward()
    assert float(ppo_logp.grad[0, 0]) == 0.0


def test_cispo_default_has_no_lower_bound():
    # ε_low = 1 (the paper's "large ε_low"): the bound 0 is below any ratio, so r = 1/e stays;
    # ε_high = 0.28: r = e → 1.28.  ℓ = -ŵ·A·log π.
    loss, metrics = cispo_policy_loss(C_LOGP, C_OLD, C_ADV, C_MASK)
    assert_close(loss[0, :2], t([1.28, -math.exp(-1) * 2.0]), atol=1e-12, rtol=0)
    assert_close(metrics["policy/clipfrac"], t(0.25), atol=0, rtol=0)


def test_cispo_gradient_at_ratio_one_is_reinforce():
    # ŵ = 1 on-policy: ∂ℓ_t/∂log π_t = -A_t, the REINFORCE gradient.
    logp, adv, mask = _row_constant_advantages(3)
    adv = adv + torch.randn(adv.shape, generator=torch.Generator().manual_seed(4), dtype=D)
    logp.requires_grad_(True)
    loss, metrics = cispo_policy_loss(logp, logp.detach(), adv, mask)
    loss.sum().backward()
    assert_close(logp.grad, torch.where(mask, -adv, torch.zeros_like(adv)), atol=0, rtol=0)
    assert_close(metrics["policy/clipfrac"], t(0.0), atol=0, rtol=0)


# --------------------------------------------------------------------------------------------
# SAPO
S_OLD = t([[-1.0, -1.0, -1.0, -1.0, -1.0, -1.0]])
S_LOG_RATIO = t([[0.0, 0.0, LN(2.0), LN(0.5), 0.0, 4.0]])
S_ADV = t([[2.0, -1.0, 1.0, -2.0, 0.0, 7.0]])
S_MASK = bmask([[1, 1, 1, 1, 1, 0]])


def test_sapo_by_hand_with_the_papers_temperatures():
    logp = (S_OLD + S_LOG_RATIO).requires_grad_(True)
    loss, metrics = sapo_policy_loss(logp, S_OLD, S_ADV, S_MASK)  # τ_pos 1, τ_neg 1.05
    s1, sn = sigmoid(1.0), sigmoid(-0.525)  # τ(r - 1): 1·(2 - 1); 1.05·(0.5 - 1)
    # ℓ = -(4/τ)·σ(τ(r - 1))·A:
    #   t0: r 1, A 2 > 0, τ 1: -4·½·2 = -4
    #   t1: r 1, A -1, τ 1.05: -(4/1.05)·½·(-1) = 2/1.05
    #   t2: r 2, A 1, τ 1: -4·σ(1)
    #   t3: r ½, A -2, τ 1.05: (8/1.05)·σ(-0.525)
    #   t4: A 0: 0;  t5: masked
    expected = t([[-4.0, 2 / 1.05, -4 * s1, 8 / 1.05 * sn, 0.0, 0.0]])
    assert_close(loss, expected, atol=1e-12, rtol=0)
    # ∂ℓ/∂log π = -4σ(1 - σ)·r·A:  t0 -A = -2;  t1 -A = 1;  t2 -4σ(1)(1 - σ(1))·2;
    # t3 -4σ(1 - σ)·½·(-2) = 4σ(1 - σ) at σ(-0.525); t4 0
    loss.sum().backward()
    grad = t([[-2.0, 1.0, -8 * s1 * (1 - s1), 4 * sn * (1 - sn), 0.0, 0.0]])
    assert_close(logp.grad, grad, atol=1e-12, rtol=0)
    gates = [1.0, 1.0, 4 * s1 * (1 - s1), 4 * sn * (1 - sn), 1.0]
    assert_close(metrics["policy/gate_weight_mean"], t(sum(gates) / 5), atol=1e-12, rtol=0)
    # a larger τ_neg damps the negative-advantage token at r = ½ more
    loss2, _ = sapo_policy_loss(logp.detach(), S_OLD, S_ADV, S_MASK, tau_neg=3.0)
    assert_close(loss2[0, 3], t(-(4 / 3) * sigmoid(3 * -0.5) * -2), atol=1e-12, rtol=0)


def test_sapo_gradient_at_ratio_one_equals_ppo():
    # d/dr (4/τ)σ(τ(r - 1)) at r = 1 is 4·σ(0)(1 - σ(0)) = 1, for any τ: the gradient is
    # -A·∇log π, exactly PPO's (whose ratio 1 lies inside the clip range).
    g = torch.Generator().manual_seed(5)
    logp = -torch.rand(4, 6, generator=g, dtype=D) * 3
    adv = torch.randn(4, 6, generator=g, dtype=D)
    mask = torch.rand(4, 6, generator=g) > 0.3
    grads = []
    for fn, kw in ((sapo_policy_loss, {"tau_pos": 0.7, "tau_neg": 2.5}),
                   (clipped_policy_loss, {})):
        x = logp.clone().requires_grad_(True)
        fn(x, x.detach(), adv, mask, **kw)[0].sum().backward()
        grads.append(x.grad)
    assert_close(grads[0], torch.where(mask, -adv, torch.zeros_like(adv)), atol=1e-15, rtol=0)
    assert_close(grads[0], grads[1], atol=1e-15, rtol=0)


@pytest.mark.parametrize("kw", [{"tau_pos": 0.0}, {"tau_neg": -1.0}])
def test_sapo_rejects_non_positive_temperatures(kw):
    with pytest.raises(ConfigError, match="temperature"):
        sapo_policy_loss(S_OLD, S_OLD, S_ADV, S_MASK, **kw)


@pytest.mark.parametrize("fn", [gspo_policy_loss, gspo_token_policy_loss, cispo_policy_loss])
def test_clip_losses_reject_negative_clip_ranges(fn):
    with pytest.raises(ConfigError, match="clip ranges"):
        fn(G_LOGP, G_OLD, G_ADV, G_MASK, clip_low=-0.1)


# --------------------------------------------------------------------------------------------
# Registry and signature


NEW = {"gspo": gspo_policy_loss, "gspo_token": gspo_token_policy_loss,
       "cispo": cispo_policy_loss, "sapo": sapo_policy_loss}


def test_new_losses_are_registered_with_needs_off_policy():
    for name, fn in NEW.items():
        assert POLICY_LOSSES.get(name) is fn
    needs = {n: POLICY_LOSSES.attr(n, "needs_off_policy") for n in
             ("clipped", "unclipped", *NEW)}
    assert needs == {"clipped": False, "unclipped": False, "gspo": True, "gspo_token": True,
                     "cispo": False, "sapo": False}
    assert gspo_policy_loss.needs_off_policy is True


ALLOWED = {"clip_low", "clip_high", "dual_clip", "tau_pos", "tau_neg"}


@pytest.mark.parametrize("name", ["clipped", "unclipped", *NEW])
def test_every_loss_has_the_shared_signature(name):
    params = list(inspect.signature(POLICY_LOSSES.get(name)).parameters.values())
    assert [p.name for p in params[:4]] == ["logp", "old_logp", "advantages", "response_mask"]
    rest = params[4:]
    assert {p.name for p in rest} <= ALLOWED
    assert all(p.default is not inspect.Parameter.empty for p in rest)
    if name in NEW:
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in rest)
    declared = {"gspo": {"clip_low", "clip_high"}, "gspo_token": {"clip_low", "clip_high"},
                "cispo": {"clip_low", "clip_high"}, "sapo": {"tau_pos", "tau_neg"}}
    if name in declared:
        assert {p.name for p in rest} == declared[name]


def test_gspo_defaults_are_the_papers_clip_ranges():
    sig = inspect.signature(gspo_policy_loss).parameters
    assert (sig["clip_low"].default, sig["clip_high"].default) == (3e-4, 4e-4)
    sig = inspect.signature(sapo_policy_loss).parameters
    assert (sig["tau_pos"].default, sig["tau_neg"].default) == (1.0, 1.05)
