"""Asynchronous rollouts: a worker process with its own engine samples while the trainer
trains, from a policy at most `rollout.max_staleness` versions old (ALGORITHMS.md 6c).

    trainer                                  worker (its own process, its own engine)
    publish(version v): weights -> shared    wait until version >= min_version,
    request(step t, prompts, min t - k)  ->  copy the newest weights (version w), sample,
    result(t) <- (experience, w, timings)    send the batch back, stamped with w

- **Weights** go through shared memory: one CPU buffer per weight, written by `publish` after
  every optimiser step under a lock, and copied by the worker into its engine under the same
  lock before it samples (never while it samples: a batch comes from one version). A LoRA
  policy is published merged (`hf_named_weights`), under its checkpoint names: the `lean` and
  `hf` engines copy them into a plain model of the worker's own, the `vllm` engine reloads
  them in place (it is built from the policy's config alone, as the colocated one).
- **Staleness** is the number of optimiser steps between the weights a batch was sampled with
  and the weights it trains. The batch of step t is sampled from exactly version max(t - k, 0)
  (requested k steps ahead; `publish` waits until the worker has taken the weights of every
  request it has not started, so a run is reproducible whatever the timing): with k = 0 every
  batch comes from the weights it trains (the synchronous run, bit for bit), with k = 1 the
  worker samples step t + 1 while the trainer updates on step t. A batch older than k is
  never trained on (the trainer drops it, counted).
- **Faults**: the worker sends its traceback if it fails; the trainer raises a one-line
  RolloutWorkerError when the worker dies, fails or sends nothing for `rollout.worker_timeout`
  seconds; the worker exits when its trainer is gone (even after kill -9), and `close` stops it
  (a stop message, then terminate, then kill).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from posttrain.errors import PosttrainError
from posttrain.rollout.engine import SamplingConfig
from posttrain.rollout.experience import Experience

log = logging.getLogger(__name__)


class RolloutWorkerError(PosttrainError, RuntimeError):
    """The rollout worker died, failed, hung or sent a batch older than allowed."""


@dataclass(frozen=True)
class WorkerSpec:
    """What the worker process needs to build its tokenizer, model and engine."""

    model_path: str
    tokenizer_path: str
    model_dtype: str
    trust_remote_code: bool
    chat_template: str | None
    engine: str  # "lean", "hf" or "vllm"
    engine_dtype: str  # the engine's weights: "auto", "float32", "bfloat16"
    compile: bool
    precision: str  # run.precision, for the sampling autocast
    device: str
    threads: int
    vllm: dict[str, Any] | None = None  # vllm: VLLMEngine's config and keyword arguments


@dataclass
class Request:
    step: int  # the step whose batch this is (0-based)
    round: int  # its round of dynamic sampling
    prompt_ids: list[list[int]]
    prompts: list[Any]
    meta: dict[str, list[Any]]
    sampling: SamplingConfig
    seeds: list[int] | None
    version: int  # sample from the weights after exactly this many optimiser steps
    indices: list[int]  # the prompts' positions in the data stream (group ids)
    seq: int = -1  # its number among the requests sent (set by `RolloutWorker.request`)

    def state(self) -> dict[str, Any]:
        """As plain values (a checkpoint loads them with weights_only=True)."""
        import dataclasses

        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["sampling"] = dataclasses.asdict(self.sampling)
        return out

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Request:
        return cls(**{**state, "sampling": SamplingConfig(**state["sampling"])})


@dataclass
class Result:
    step: int
    round: int
    version: int
    exp: Experience
    sample_seconds: float
    idle_seconds: float  # the worker waited for a request or for new enough weights


STARTUP_SECONDS = 600.0
"""How long the worker may take to start (import torch, load the model) before it counts as
hung; rollout.worker_timeout applies from then on."""


def _main(spec: WorkerSpec, weights: dict[str, Tensor], version, started, ready, lock,
          requests, results, parent: int) -> None:
    """The worker process: build, then serve requests until told to stop or orphaned."""
    try:
        torch.set_num_threads(spec.threads)
        from posttrain.data.collate import apply_chat_template_option
        from posttrain.models.load import load_causal_lm, load_tokenizer
        from posttrain.rollout.engine import build_engine

        tokenizer = apply_chat_template_option(
            load_tokenizer(spec.tokenizer_path, spec.trust_remote_code), spec.chat_template)
        device = torch.device(spec.device)
        if spec.engine == "vllm":
            model, engine = None, _vllm_engine(spec, tokenizer)
        else:
            model = load_causal_lm(spec.model_path, spec.model_dtype, device,
                                   spec.trust_remote_code).requires_grad_(False)
            targets = model.state_dict()
            missing = sorted(set(weights) - set(targets))
            if missing:
                raise RolloutWorkerError(f"the worker's model has no weight {missing[0]!r}")
            engine = build_engine(model, tokenizer, spec.engine, spec.engine_dtype,
                                  spec.compile, spec.precision)
        ready.value = 1
        have = -1
        idle_since = time.perf_counter()
        while True:
            try:
                request = requests.get(timeout=1.0)
            except queue.Empty:
                if os.getppid() != parent:
                    return  # the trainer is gone (killed): nothing will read a result
                continue
            if request is None:
                return
            while version.value < request.version:  # its weights are not published yet
                if os.getppid() != parent:
                    return
                time.sleep(0.002)
            with lock:
                if version.value != request.version:
                    raise RolloutWorkerError(
                        f"step {request.step + 1}'s batch needs the weights of version "
                        f"{request.version}, and version {version.value} is published")
                if have != request.version:
                    if model is None:  # vLLM copies them into its own parameters
                        engine.update_weights(weights.items())
                    else:
                        with torch.no_grad():
                            for name, tensor in weights.items():
                                targets[name].copy_(tensor)
                        if engine.model is not model:  # a copy of its own dtype
                            engine.update_weights(model.named_parameters())
                    have = request.version
                started.value = request.seq
            idle = time.perf_counter() - idle_since
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16,
                                enabled=spec.precision == "bf16"):
                exp = engine.generate(request.prompt_ids, request.sampling,
                                      prompts=request.prompts, meta=request.meta,
                                      seeds=request.seeds)
            exp = exp.to("cpu")
            results.put(Result(request.step, request.round, have, exp,
                               time.perf_counter() - start, idle))
            idle_since = time.perf_counter()
    except BaseException:
        results.put({"error": traceback.format_exc()})


TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                      "ROLE_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def _vllm_engine(spec: WorkerSpec, tokenizer):
    """The worker's vLLM engine, alone in its process: the rank's torchrun variables, which
    the spawned process inherits, are dropped (this engine is no part of the trainer's
    process group), and a worker device `cuda:N` becomes the only GPU vLLM sees."""
    from posttrain.rollout.vllm_engine import VLLMEngine

    for name in TORCHRUN_VARIABLES:
        os.environ.pop(name, None)
    device = torch.device(spec.device)
    if device.type == "cuda" and device.index is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(device.index)  # read when CUDA starts
        device = torch.device("cuda")
    options = dict(spec.vllm or {})
    config = options.pop("config")
    return VLLMEngine(config, tokenizer.pad_token_id, tokenizer.eos_token_id,
                      decode=tokenizer.decode, device=device, **options)


class RolloutWorker:
    """The trainer's side of one rollout worker (one per rank under DDP)."""

    def __init__(self, spec: WorkerSpec, named_weights: Iterable[tuple[str, Tensor]],
                 timeout: float) -> None:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")  # fork is unsafe once torch has started threads
        self.timeout = timeout
        self.weights = {name: t.detach().to("cpu", copy=True).contiguous().share_memory_()
                        for name, t in named_weights}
        self.version = ctx.Value("q", -1)
        self.started = ctx.Value("q", -1)  # the seq of the last request it took weights for
        self.ready = ctx.Value("b", 0)  # built its model and engine
        self._ready_at: float | None = None
        self.lock = ctx.Lock()
        self.requests = ctx.Queue()
        self.results = ctx.Queue()
        self.process = ctx.Process(
            target=_main, name="posttrain-rollout-worker", daemon=True,
            args=(spec, self.weights, self.version, self.started, self.ready, self.lock,
                  self.requests, self.results, os.getpid()))
        self.process.start()
        self._arrived: dict[tuple[int, int], Result] = {}
        self._sent: dict[int, int] = {}  # seq -> version, of requests it may not have started
        self._seq = -1
        self.wait_seconds = 0.0  # the trainer's, since the last `take_wait`

    def publish(self, named_weights: Iterable[tuple[str, Tensor]], version: int) -> None:
        """The policy's weights after `version` optimiser steps, for the next samples; first
        waits until the worker has taken the older weights its unstarted requests need."""
        start = time.perf_counter()
        while True:
            with self.lock:
                taken = self.started.value
                self._sent = {q: v for q, v in self._sent.items() if q > taken}
                if all(v >= version for v in self._sent.values()):
                    with torch.no_grad():
                        for name, tensor in named_weights:
                            self.weights[name].copy_(tensor.detach())
                    self.version.value = version
                    break
            self._check_alive(f"version {version}'s weights", start)
            time.sleep(0.002)
        self.wait_seconds += time.perf_counter() - start

    def request(self, request: Request) -> None:
        self._seq += 1
        request.seq = self._seq
        self._sent[request.seq] = request.version
        self.requests.put(request)

    def keep(self, result: Result) -> None:
        """A batch sampled before (restored from a checkpoint), served as if just sent."""
        self._arrived[(result.step, result.round)] = result

    def take_wait(self) -> float:
        """Seconds the trainer waited for the worker since the last call."""
        out, self.wait_seconds = self.wait_seconds, 0.0
        return out

    def _check_alive(self, what: str, start: float) -> None:
        if not self.process.is_alive():
            raise RolloutWorkerError(
                f"the rollout worker (pid {self.process.pid}) died with exit code "
                f"{self.process.exitcode} while the trainer waited for {what}; see its "
                "output above")
        now = time.perf_counter()
        if not self.ready.value:
            if now - start > STARTUP_SECONDS:
                raise RolloutWorkerError(
                    f"the rollout worker (pid {self.process.pid}) did not start in "
                    f"{STARTUP_SECONDS:.0f} s (it loads torch and the model)")
            return
        if self._ready_at is None:
            self._ready_at = now
        if now - max(start, self._ready_at) > self.timeout:
            raise RolloutWorkerError(
                f"the rollout worker sent nothing for {self.timeout:.0f} s while the trainer "
                f"waited for {what} (rollout.worker_timeout); it may hang: pid "
                f"{self.process.pid}")

    def result(self, step: int, round_: int) -> Result:
        """The batch of (step, round), waiting for it (and keeping others that arrive)."""
        key = (step, round_)
        start = time.perf_counter()
        while key not in self._arrived:
            try:
                got = self.results.get(timeout=0.5)
            except queue.Empty:
                self._check_alive(f"step {step + 1}'s batch", start)
                continue
            except (EOFError, OSError):  # it died while sending: the pipe broke
                self.process.join(5)
                self._check_alive(f"step {step + 1}'s batch", start)
                raise RolloutWorkerError(f"lost the connection to the rollout worker (pid "
                                         f"{self.process.pid}) waiting for step {step + 1}'s "
                                         "batch") from None
            if isinstance(got, dict):
                last = got["error"].strip().splitlines()[-1]
                log.error("rollout worker failed:\n%s", got["error"])
                raise RolloutWorkerError(f"the rollout worker failed: {last}")
            self._arrived[(got.step, got.round)] = got
        self.wait_seconds += time.perf_counter() - start
        return self._arrived.pop(key)

    def close(self) -> None:
        """Stop the worker: a stop message, then terminate, then kill; no process is left."""
        if self.process.pid is None:
            return
        if self.process.is_alive():
            try:
                self.requests.put(None)
            except (OSError, ValueError):
                pass
            self.process.join(5)
        if self.process.is_alive():
            if hasattr(signal, "SIGCONT"):  # a stopped process acts on no signal but KILL
                os.kill(self.process.pid, signal.SIGCONT)
            self.process.terminate()
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        for q in (self.requests, self.results):
            q.cancel_join_thread()
            q.close()


def result_state(result: Result) -> dict[str, Any]:
    """A Result as plain tensors, lists, numbers and strings (a checkpoint loads it with
    `torch.load(weights_only=True)`)."""
    import dataclasses

    out = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
    out["exp"] = {f.name: getattr(result.exp, f.name) for f in dataclasses.fields(result.exp)}
    return out


def result_from_state(state: dict[str, Any]) -> Result:
    return Result(**{**state, "exp": Experience(**state["exp"])})
