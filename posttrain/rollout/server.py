"""A rollout server: vLLM in a process (and on devices) of its own, driven over HTTP.

`posttrain rollout-server --model DIR` starts it; an RL run with `rollout.engine: vllm` and
`rollout.server: http://HOST:PORT` samples there. The trainer pushes its weights after each
optimiser step (`POST /update_weights`, a safetensors payload) and sends token prompts
(`POST /generate`); the server answers with token ids and the log-probs μ they were drawn
with, from which the trainer builds its `Experience` exactly as the colocated engine does.

The protocol is plain HTTP with JSON and safetensors bodies (the standard library on both
sides): on one machine over loopback the weight push of a small model costs milliseconds; for
multi-GB models across machines a collective (NCCL) transfer would be faster and is not built.
Requests are served one at a time, in order, so a weight push is never interleaved with a
rollout.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import torch
from torch import Tensor

from posttrain.errors import ConfigError
from posttrain.rollout.engine import SamplingConfig, annotate
from posttrain.rollout.experience import Experience
from posttrain.rollout.vllm_engine import VLLMEngine, samples_to_experience

# What must agree between the trainer's policy and the server's model.
ARCH_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "intermediate_size")


def _arch(config) -> dict[str, Any]:
    return {k: getattr(config, k, None) for k in ARCH_KEYS}


def _handler(engine: VLLMEngine, arch: dict[str, Any]):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format, *args):  # one line per request is noise here
            pass

        def _reply(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                self._reply(200, {"ok": True, "arch": arch,
                                  "max_model_len": engine.max_model_len,
                                  "synced": engine.synced})
            else:
                self._reply(404, {"error": f"no GET {self.path}"})

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                if self.path == "/generate":
                    req = json.loads(body)
                    sampling = SamplingConfig(**req["sampling"])
                    samples = engine.sample(req["prompt_ids"], sampling, req.get("seeds"),
                                            req["eos_id"])
                    self._reply(200, {"samples": samples})
                elif self.path == "/update_weights":
                    from safetensors.torch import load

                    engine.update_weights(load(body).items())
                    self._reply(200, {"ok": True})
                elif self.path == "/score":
                    self._reply(200, {"logprobs": engine.score(json.loads(body)["sequences"])})
                else:
                    self._reply(404, {"error": f"no POST {self.path}"})
            except (ConfigError, ValueError, KeyError, TypeError) as err:
                self._reply(400, {"error": f"{type(err).__name__}: {err}"})

    return Handler


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, dtype: str = "auto",
          max_model_len: int = 512, gpu_memory_utilization: float = 0.9,
          tensor_parallel_size: int = 1, cpu_kv_cache_gib: int = 1, seed: int = 0,
          device: str = "auto") -> None:
    """Run the server until interrupted. `model` is a Hugging Face model directory (its
    config is what the engine builds; weights come from the trainer). Port 0 picks a free
    one; the address is printed as `rollout server listening on http://HOST:PORT`."""
    from posttrain.models.load import load_model_config

    config = load_model_config(model, "rollout server's model")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
                    or "float32").removeprefix("torch.")
    # pad and EOS are the client's: EOS comes with each request, padding is done client-side
    engine = VLLMEngine(config, pad_id=0, eos_id=None, dtype=dtype,
                        max_model_len=max_model_len, seed=seed,
                        gpu_memory_utilization=gpu_memory_utilization,
                        tensor_parallel_size=tensor_parallel_size,
                        cpu_kv_cache_gib=cpu_kv_cache_gib, device=device)
    httpd = HTTPServer((host, port), _handler(engine, _arch(config)))
    print(f"rollout server listening on http://{host}:{httpd.server_port}", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        engine.close()


class RemoteVLLMEngine:
    """The trainer's side of a rollout server: the engine protocol over HTTP.

    Args:
        url: the server's address (`http://HOST:PORT`).
        config: the policy's config; the server's model must have the same architecture.
        pad_id, eos_id, decode, device: as the other engines.
        timeout: seconds to wait for one request (a rollout of a big batch can take long).
    """

    model = None
    weight_names = "hf"

    def __init__(self, url: str, config, pad_id: int, eos_id: int | Sequence[int],
                 decode=None, device: torch.device | str = "cpu", timeout: float = 3600.0):
        self.url = url.rstrip("/")
        self.pad_id, self.eos_id, self.decode = pad_id, eos_id, decode
        self.device = torch.device(device)
        self.timeout = timeout
        health = self._request("GET", "/health")
        theirs, ours = health["arch"], _arch(config)
        diff = {k: (ours[k], theirs[k]) for k in ARCH_KEYS if ours[k] != theirs.get(k)}
        if diff:
            raise ConfigError(f"rollout.server {self.url} serves another architecture than "
                              f"the policy (ours, theirs): {diff}; start it with the policy's "
                              "model directory")
        self.max_model_len = health["max_model_len"]

    def _request(self, method: str, path: str, body: bytes | None = None,
                 content_type: str = "application/json") -> dict[str, Any]:
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as err:
            detail = json.loads(err.read() or b"{}").get("error", err.reason)
            raise ConfigError(f"rollout.server {self.url}{path}: {detail}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
            raise ConfigError(f"rollout.server {self.url} is not reachable ({err}); start it "
                              "with `posttrain rollout-server --model DIR`") from None

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig,
                 prompts: Sequence[Any] = (), meta: dict[str, list[Any]] | None = None,
                 seeds: Sequence[int] | None = None) -> Experience:
        longest = max(len(p) for p in prompt_ids) + sampling.max_new_tokens
        if longest > self.max_model_len:
            raise ConfigError(f"a prompt plus {sampling.max_new_tokens} new tokens is {longest} "
                              f"tokens, more than rollout.server {self.url} serves "
                              f"({self.max_model_len}): restart it with --max-model-len "
                              f"{-(-longest // 64) * 64} or more")
        eos = [self.eos_id] if isinstance(self.eos_id, int) else list(self.eos_id)
        body = {"prompt_ids": [list(map(int, p)) for p in prompt_ids],
                "sampling": asdict(sampling), "eos_id": eos,
                "seeds": list(seeds) if seeds is not None else None}
        samples = self._request("POST", "/generate", json.dumps(body).encode())["samples"]
        exp = samples_to_experience(prompt_ids, samples, self.pad_id, self.eos_id, self.device,
                                    sampling.return_logprobs)
        return annotate(exp, len(prompt_ids), sampling.samples_per_prompt, prompts, meta,
                        self.decode)

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        from safetensors.torch import save

        payload = save({name: t.detach().to("cpu").contiguous() for name, t in named_tensors})
        self._request("POST", "/update_weights", payload, "application/octet-stream")

    def score(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        body = json.dumps({"sequences": [list(map(int, s)) for s in sequences]}).encode()
        return self._request("POST", "/score", body)["logprobs"]

