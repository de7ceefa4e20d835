"""The shared loop: exact resume (SIGINT and SIGKILL), atomic checkpoints, gradient
accumulation, non-finite handling. Run on SFT with the tiny model, a few steps each."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from posttrain.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint
from posttrain.config import load_config
from posttrain.errors import NonFiniteError
from posttrain.trainers.sft import SFTConfig, SFTTrainer


def sft_config(task, run_dir, name, **run):
    return load_config(SFTConfig, overrides={
        "model": {"path": str(task / "model")},
        "data": {"train": str(task / "sft_train.jsonl"), "eval": str(task / "sft_eval.jsonl"),
                 "limit": 64},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "schedule": "cosine"},
        "run": {"output_dir": str(run_dir), "name": name, "steps": 6, "batch_size": 8,
                "progress": "none", "tensorboard": False, **run},
        "eval": {"generate_samples": 0},
    })


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


@pytest.fixture(scope="module")
def straight_run(arithmetic_task, tmp_path_factory):
    trainer = SFTTrainer(sft_config(arithmetic_task, tmp_path_factory.mktemp("runs"), "straight"))
    result = trainer.train()
    assert result.status == "finished" and result.steps_done == 6
    return weights(trainer.model)


def test_resume_after_sigint_is_exact(arithmetic_task, tmp_path, straight_run):
    cfg = sft_config(arithmetic_task, tmp_path, "stopped")
    trainer = SFTTrainer(cfg)

    def interrupt(tr, step, metrics):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as a user's Ctrl-C

    trainer.callbacks.append(interrupt)
    result = trainer.train()
    assert result.status == "interrupted" and result.steps_done == 3
    assert latest_checkpoint(tmp_path / "stopped" / "checkpoints").name == "step_3"
    resumed = SFTTrainer(sft_config(arithmetic_task, tmp_path, "stopped", resume=True))
    assert resumed.train().steps_done == 6
    assert_same_weights(weights(resumed.model), straight_run)
    steps = [r["step"] for r in map(eval_json, (tmp_path / "stopped" / "metrics.jsonl")
                                    .read_text().splitlines()) if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # no step logged twice after the resume


def eval_json(line):
    import json

    return json.loads(line)


def test_resume_after_sigkill_between_checkpoints_is_exact(arithmetic_task, tmp_path,
                                                           straight_run):
    script = textwrap.dedent(f"""
        import os, signal
        from tests.trainers.test_loop import sft_config
        from posttrain.trainers.sft import SFTTrainer
        from pathlib import Path
        t = SFTTrainer(sft_config(Path({str(arithmetic_task)!r}), Path({str(tmp_path)!r}),
                                  "killed", save_every=2))
        def kill(tr, step, metrics):
            if step == 5:
                os.kill(os.getpid(), signal.SIGKILL)
        t.callbacks.append(kill)
        t.train()
    """)
    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    ckpts = list_checkpoints(tmp_path / "killed" / "checkpoints")
    assert [p.name for p in ckpts] == ["step_2", "step_4"]
    resumed = SFTTrainer(sft_config(arithmetic_task, tmp_path, "killed", save_every=2,
                                    resume=True))
    resumed.train()
    assert_same_weights(weights(resumed.model), straight_run)


def test_incomplete_checkpoint_is_never_picked(tmp_path):
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 2, lambda d: (d / "x").write_text("ok"))

    def crash(d):
        (d / "x").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint(root, 4, crash)
    (root / "step_6").mkdir()  # a directory that looks like a checkpoint but has no marker
    assert latest_checkpoint(root).name == "step_2"
    assert (latest_checkpoint(root) / "x").read_text() == "ok"


def test_keep_only_the_newest_checkpoints(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, lambda d: None, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_3", "step_4"]


def test_gradient_accumulation_does_not_change_the_update(arithmetic_task, tmp_path):
    # One micro-batch of 8 vs micro-batches of 2 rows (token budget 2 x the longest row):
    # the accumulated gradient and the loss must be those of the full batch.
    trainer = SFTTrainer(sft_config(arithmetic_task, tmp_path, "accum"))
    items = trainer.batch_for_step(0)
    longest = max(len(it.input_ids) for it in items)
    results = []
    for budget in (4096, 2 * longest):
        trainer.run = dataclasses.replace(trainer.run, micro_batch_tokens=budget)
        assert len(trainer.micro_batches(items)) == (1 if budget == 4096 else 4)
        trainer.model.zero_grad(set_to_none=True)
        loss, _ = trainer.accumulate_gradients(items)
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
        results.append((loss, grads))
    (loss1, g1), (loss4, g4) = results
    torch.testing.assert_close(loss1, loss4, atol=1e-6, rtol=0)
    for name in g1:
        torch.testing.assert_close(g1[name], g4[name], atol=1e-6, rtol=1e-5, msg=name)


def test_bf16_autocast_gives_the_float32_loss_and_gradient_to_bf16_precision(arithmetic_task,
                                                                              tmp_path):
    """run.precision=bf16: forward passes in bfloat16, float32 weights and gradients; the loss
    and the gradient direction agree with float32 to bfloat16's ~3 significant digits."""
    trainer = SFTTrainer(sft_config(arithmetic_task, tmp_path, "bf16"))
    items = trainer.batch_for_step(0)
    results = {}
    for precision in ("fp32", "bf16"):
        trainer.run = dataclasses.replace(trainer.run, precision=precision)
        trainer.model.zero_grad(set_to_none=True)
        loss, _ = trainer.accumulate_gradients(items)
        grad = torch.cat([p.grad.flatten() for p in trainer.model.parameters()])
        assert loss.dtype == grad.dtype == torch.float32
        results[precision] = (loss, grad)
    (l32, g32), (l16, g16) = results["fp32"], results["bf16"]
    assert not torch.equal(g32, g16)  # bf16 really ran
    torch.testing.assert_close(l16, l32, rtol=1e-2, atol=0)
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99


def test_padding_free_training_equals_padded_training(arithmetic_task, tmp_path):
    """run.padding_free packs each micro-batch into one row: same updates, fewer tokens."""
    runs = {}
    for packed in (False, True):
        trainer = SFTTrainer(sft_config(arithmetic_task, tmp_path, f"packed-{packed}", steps=3,
                                        padding_free=packed, micro_batch_tokens=64))
        trainer.train()
        runs[packed] = weights(trainer.model)
    assert_same_weights(runs[True], runs[False], atol=2e-5)


def count_layer_forwards(model):
    """A list that grows by one at every start of a decoder layer's MLP (inside the layer's
    forward, so a recompute counts too: transformers keeps layer hooks out of it, and torch
    may stop a recompute early, before a module's end)."""
    calls = []
    layers = [m.mlp for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    assert layers
    return calls, [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in layers]


def test_gradient_checkpointing_recomputes_layers_and_gives_the_same_update(arithmetic_task,
                                                                           tmp_path):
    """run.gradient_checkpointing: every decoder layer runs twice per micro-batch (forward,
    then again in the backward), and the loss and gradients are those without it."""
    results = {}
    for ckpt in (False, True):
        trainer = SFTTrainer(sft_config(arithmetic_task, tmp_path, f"ckpt-{ckpt}",
                                        gradient_checkpointing=ckpt))
        trainer.build_optimizer()
        trainer.model.train()  # transformers checkpoints in training mode only
        items = trainer.batch_for_step(0)
        calls, hooks = count_layer_forwards(trainer.model)
        loss, _ = trainer.accumulate_gradients(items)
        for h in hooks:
            h.remove()
        layers = trainer.model.config.num_hidden_layers
        assert len(calls) == layers * len(trainer.micro_batches(items)) * (2 if ckpt else 1)
        results[ckpt] = (loss, {n: p.grad.clone() for n, p in trainer.model.named_parameters()})
    (l0, g0), (l1, g1) = results[False], results[True]
    torch.testing.assert_close(l0, l1, atol=1e-6, rtol=0)
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], atol=1e-6, rtol=1e-5, msg=name)


def test_adamw_is_torchs_fused_kernel_on_plain_tensors(arithmetic_task, tmp_path):
    trainer = SFTTrainer(sft_config(arithmetic_task, tmp_path, "fused"))
    trainer.build_optimizer()
    assert trainer.optimizer.defaults["fused"] is True


def test_non_finite_loss_stops_without_writing_nan_weights(arithmetic_task, tmp_path):
    trainer = SFTTrainer(sft_config(arithmetic_task, tmp_path, "nan", save_every=1))
    real = trainer.micro_loss

    def poisoned(items, totals):
        loss, metrics = real(items, totals)
        return (loss * float("nan") if trainer.step == 2 else loss), metrics

    trainer.micro_loss = poisoned
    with pytest.raises(NonFiniteError, match=r"step 3: the loss is nan.*step_2"):
        trainer.train()
    assert all(torch.isfinite(v).all() for v in weights(trainer.model).values())
    assert latest_checkpoint(tmp_path / "nan" / "checkpoints").name == "step_2"


def test_non_finite_loss_can_be_skipped(arithmetic_task, tmp_path):
    trainer = SFTTrainer(sft_config(arithmetic_task, tmp_path, "skip", on_nonfinite="skip"))
    real = trainer.micro_loss

    def poisoned(items, totals):
        loss, metrics = real(items, totals)
        return (loss * float("inf") if trainer.step == 1 else loss), metrics

    trainer.micro_loss = poisoned
    result = trainer.train()
    assert result.skipped_steps == 1 and result.status == "finished"
    assert all(torch.isfinite(v).all() for v in weights(trainer.model).values())


def test_final_model_is_saved_in_hf_format(arithmetic_task, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer = SFTTrainer(sft_config(arithmetic_task, tmp_path, "final", steps=1))
    result = trainer.train()
    model = AutoModelForCausalLM.from_pretrained(result.final_dir)
    AutoTokenizer.from_pretrained(result.final_dir)
    assert_same_weights(weights(model), weights(trainer.model))
    assert (result.run_dir / "config.yaml").exists()
