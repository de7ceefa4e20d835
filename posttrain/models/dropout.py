"""Switching dropout off in a model that trains.

RL samples with the policy in eval mode, scores π_old and π_ref, then updates in train mode:
with dropout on, those are four different functions, so the first on-policy ratio is not 1
and the clip and the KL measure noise (GPT-2: ratio 1.003, clip fraction 0.016 on a step
that should clip nothing). DPO's first loss is ln 2 only when the policy in train mode equals
the reference in eval mode. So RM, DPO, KTO and RL train with dropout off by default, as TRL
does; SFT keeps the model's own setting (`model.dropout`).
"""

from __future__ import annotations

from torch import nn

# Attributes that transformers' modules read as a dropout probability at forward time
# (attention dropout passed to the attention kernel, OPT's functional dropout, ...).
_RATE_ATTRS = ("attention_dropout", "dropout", "attn_dropout", "dropout_p", "hidden_dropout",
               "activation_dropout", "layerdrop")


def disable_dropout(model: nn.Module) -> int:
    """Set every dropout probability of `model` to 0, in place: `nn.Dropout` modules (LoRA's
    included) and the float rates modules read at forward time. Returns how many were
    non-zero. The saved config is left alone, so a saved model keeps its architecture's
    settings for whoever fine-tunes it next."""
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            changed += module.p != 0
            module.p = 0.0
            continue
        for attr in _RATE_ATTRS:
            value = module.__dict__.get(attr)
            if isinstance(value, float) and not isinstance(value, bool):
                changed += value != 0
                setattr(module, attr, 0.0)
    return changed
