"""VLMEngine: continuously batched VLM inference on transformers' own modules, with our execution.

    engine = VLMEngine.from_pretrained(path, dtype=torch.bfloat16, device="cuda")
    results = engine.generate(samples, SamplingParams(max_new_tokens=16))      # all at once

    request = engine.add_request(sample, params)                               # or as a stream
    while engine.has_unfinished():
        for request_id, result in engine.step(): ...

A step is plan -> pack -> run -> commit: the scheduler admits waiting samples (KV memory and
`max_num_seqs` allowing) and they are prefilled as one pack (vision tower, varlen decoder pass,
pruning), or, when nobody can be admitted, every running sample decodes one token; finished
samples leave at once. `generate` is the same loop over its own samples. The engine owns the
loop and the requests; the scheduler owns who runs, the model runner the device, the adapter
the family specifics.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters import ModelAdapter, PreparedSample, adapter_class_for
from .config import EngineConfig, SamplingParams, SparsityConfig
from .model_runner import ModelRunner
from .prepare_ahead import PrepareAhead
from .pruning.schedule import plan_sample
from .scheduler import ScheduledStep, Scheduler, Sequence
from .stats import SampleStats

logger = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated ids only; ends with the stop token when one was hit
    text: str
    stats: SampleStats
    error: Exception | None = None  # this sample failed (alone); token_ids and text are then empty


class DeviceFault(RuntimeError):
    """The device is in a state no retry on this process can fix (illegal address, ECC, lost device)."""


_STICKY_MARKERS = ("illegal memory access", "illegal address", "uncorrectable ecc", "ecc error",
                   "device-side assert", "unspecified launch failure", "misaligned address",
                   "an illegal instruction", "cuda error: unknown error", "device not ready", "lost")


def is_device_fault(error: BaseException) -> bool:
    """A CUDA error that poisons the context: every later call on this process fails too."""
    if isinstance(error, DeviceFault):
        return True
    if isinstance(error, torch.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    message = str(error).lower()
    cuda_error = (accelerator_error is not None and isinstance(error, accelerator_error)) or "cuda error" in message
    return cuda_error and any(marker in message for marker in _STICKY_MARKERS)


class VLMEngine:
    def __init__(self, model, processor, sparsity: SparsityConfig | None = None,
                 engine_config: EngineConfig | None = None):
        self.model = model
        self.processor = processor
        self.sparsity = sparsity or SparsityConfig()
        self.config = engine_config or EngineConfig()
        self.adapter: ModelAdapter = adapter_class_for(model.config.model_type)(model)
        self.adapter.check_processor(processor)
        self.adapter.use_processor(processor)
        eos = model.generation_config.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self.runner = ModelRunner(self.adapter, self.config)
        self.scheduler = Scheduler(self.runner.pool, self.config.max_num_seqs, self.config.max_prefill_tokens)
        ahead = self.config.prepare_ahead
        self.prepare_ahead = ahead if ahead is not None else self.device.type == "cuda"
        self._request_ids = itertools.count()
        self._fault: BaseException | None = None

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def backend(self):
        return self.runner.backend

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, dtype: torch.dtype = torch.bfloat16,
                        device: str | torch.device | None = None, sparsity: SparsityConfig | None = None,
                        engine_config: EngineConfig | None = None, trust_remote_code: bool = False,
                        **model_kwargs) -> "VLMEngine":
        """Load weights (safetensors only) and the family's processor from a local path or hub id."""
        from transformers import AutoConfig, AutoModelForImageTextToText

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        config = AutoConfig.from_pretrained(path_or_id, trust_remote_code=trust_remote_code)
        adapter_class = adapter_class_for(config.model_type)  # fail before loading weights
        model = AutoModelForImageTextToText.from_pretrained(
            path_or_id, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code,
            attn_implementation=model_kwargs.pop("attn_implementation", "sdpa"), device_map=device, **model_kwargs)
        floating = {p.dtype for p in model.parameters() if p.is_floating_point()}
        if floating != {dtype}:  # a checkpoint whose sub-configs pin their own dtype keeps it otherwise
            logger.warning("%s loaded as %s; casting to %s", path_or_id, sorted(map(str, floating)), dtype)
            model = model.to(dtype)
        processor = adapter_class.load_processor(path_or_id, config)
        return cls(model.eval(), processor, sparsity=sparsity, engine_config=engine_config)

    # -- streaming API -------------------------------------------------------------------------------
    def prepare(self, sample: dict, index: int = 0) -> PreparedSample:
        """Validate one processor output and do its host-side work (positions, pinned pixels).
        Touches no engine state: callers may run it on their own threads."""
        return self.adapter.prepare(sample, index)

    def add_request(self, sample: dict | PreparedSample, params: SamplingParams | None = None,
                    sparsity: SparsityConfig | None = None) -> int:
        """Queue one sample; returns its request id. A bad sample raises here, before anything runs."""
        request_id = next(self._request_ids)
        prepared = sample if isinstance(sample, PreparedSample) else self.prepare(sample, request_id)
        params = params or SamplingParams()
        sparsity = sparsity or self.sparsity
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        plan = plan_sample(sparsity, self.adapter.num_layers, prepared.num_visual_tokens)
        self.adapter.start_upload(prepared)
        self.scheduler.add(Sequence(request_id, prepared, params, sparsity, plan, stop_ids, seed=request_id + 1))
        return request_id

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[tuple[int, GenerationResult]]:
        """Run one prefill pack or one decode step; returns the requests that finished in it."""
        if self._fault is not None:
            raise DeviceFault(f"the engine hit a device fault earlier and cannot run: {self._fault}") from self._fault
        step = self.scheduler.schedule()
        if step is None:
            return []
        if step.kind == "reject":
            seq = step.sequences[0]
            seq.error = ValueError(f"sample needs {sum(seq.layer_capacities)} KV slots (prompt and max_new_tokens "
                                   f"over {self.adapter.num_layers} layers) but the pool has "
                                   f"{self.scheduler.pool.capacity}; lower max_new_tokens or raise "
                                   "EngineConfig.max_cache_tokens / cache_memory_fraction")
            return [self._result(seq)]
        try:
            if step.kind == "prefill":
                tokens = self.runner.prefill(step.sequences)
            else:
                tokens = self.runner.decode(step.sequences, self.scheduler.keeps_decoding(step.sequences))
        except torch.OutOfMemoryError as error:
            return self._on_out_of_memory(step, error)
        except Exception as error:
            if is_device_fault(error):
                self._fault = error
                raise
            return self._on_step_error(step, error)
        for seq, token in zip(step.sequences, tokens):
            seq.commit(token)
        return [self._result(seq) for seq in self.scheduler.finish_step(step)]

    def _on_out_of_memory(self, step: ScheduledStep, error: Exception) -> list[tuple[int, GenerationResult]]:
        """Split and retry: the step's samples start over in packs half as large; a sample that
        runs out of memory alone fails alone (never a partial answer)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if step.kind == "prefill" and len(step.sequences) == 1:
            seq = step.sequences[0]
            seq.error = error
            self.scheduler.finish_step(ScheduledStep("failed", [seq]))
            return [self._result(seq)]
        logger.warning("out of memory in a %s step of %d samples; retrying them in smaller packs", step.kind,
                       len(step.sequences))
        retried = step.sequences if step.kind == "prefill" else step.sequences[len(step.sequences) // 2:]
        self.scheduler.retry_smaller(retried)
        return []

    def _on_step_error(self, step: ScheduledStep, error: Exception) -> list[tuple[int, GenerationResult]]:
        """Not a device fault: find the culprit. A failed pack is retried sample by sample; a sample
        that fails alone, or a failed decode step's samples, fail with the error."""
        if step.kind == "prefill" and len(step.sequences) > 1:
            logger.warning("a prefill pack of %d failed (%s); retrying its samples one by one",
                           len(step.sequences), error)
            self.scheduler.retry_alone(step.sequences)
            return []
        for seq in step.sequences:
            seq.error = error
        return [self._result(seq) for seq in self.scheduler.finish_step(ScheduledStep("failed", step.sequences))]

    def _result(self, seq: Sequence) -> tuple[int, GenerationResult]:
        if seq.error is not None:
            return seq.request_id, GenerationResult([], "", seq.stats, error=seq.error)
        text = self.processor.decode(seq.tokens, skip_special_tokens=True)
        return seq.request_id, GenerationResult(token_ids=seq.tokens, text=text, stats=seq.stats)

    # -- all at once ---------------------------------------------------------------------------------
    def generate(self, samples: list[dict], params: SamplingParams | list[SamplingParams] | None = None,
                 sparsity: SparsityConfig | None = None) -> list[GenerationResult]:
        """Generate for every sample; results come back in input order. A sample that fails
        raises its error once the others are done.

        A sample that fails its checks (a malformed processor output) raises before anything runs,
        or, with `EngineConfig.prepare_ahead` (samples prepared while earlier packs run), once the
        samples queued before it are done; nothing after it runs.

        `params`: one SamplingParams for all samples or one per sample. `sparsity`
        overrides the engine's default SparsityConfig for this call.
        """
        if isinstance(samples, dict):
            raise TypeError("generate takes a list of samples (one processor output dict each)")
        if self.has_unfinished():
            raise RuntimeError("generate() needs an idle engine; it has streaming requests in flight "
                               "(collect them with step() first)")
        params_list = self._params_per_sample(params, len(samples))
        prepared = PrepareAhead(self.prepare, samples, threaded=self.prepare_ahead)
        order: dict[int, int] = {}
        results: list[GenerationResult | None] = [None] * len(samples)
        bad_sample: Exception | None = None
        try:
            while True:
                # queue what is prepared; wait for more while the next pack could still grow
                while not prepared.exhausted:
                    try:
                        sample = prepared.next(wait=not self.scheduler.waiting_fills_a_pack())
                    except Exception as error:  # its checks failed: what runs finishes, then it raises
                        bad_sample = error
                        break
                    if sample is None:
                        break
                    order[self.add_request(sample, params_list[sample.index], sparsity)] = sample.index
                if not self.has_unfinished():
                    break
                for request_id, result in self.step():
                    results[order[request_id]] = result
        finally:
            prepared.close()
        if bad_sample is not None:
            raise bad_sample
        for result in results:
            if result.error is not None:
                raise result.error
        return results

    @staticmethod
    def _params_per_sample(params, n: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * n
        if isinstance(params, SamplingParams):
            return [params] * n
        params = list(params)
        if len(params) != n:
            raise ValueError(f"got {len(params)} SamplingParams for {n} samples; pass one, or one per sample")
        return params
