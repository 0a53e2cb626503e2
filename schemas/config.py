"""The job configuration: sections input, model, sparsity, generation, media, resources, output.

Loaded from YAML, then overridden by flags given as dotted paths ("input.uri"). Unknown
keys are errors (a typo must not silently fall back to a default), and every error names
the field and says why:

    config = JobConfig.load("job.yaml", {"output.uri": "/tmp/labels", "sparsity.preset": 64})
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sparsevlm.config import PRESETS, SPARSITY_METHODS, SparsityConfig  # plain dataclasses, no torch


class ConfigError(ValueError):
    """A job configuration that cannot run; the message lists each bad field and why."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputConfig(_Section):
    uri: str | None = Field(None, description="Parquet file or folder, local or any pyarrow/fsspec URI "
                                               "(s3://, gs://); default: the sample data shipped in the repo")
    id_column: str = Field("id", description="column with each row's unique id")
    media_column: str | None = Field(None, description="column with the media (default: 'video' for video jobs, "
                                                      "'image' for image jobs)")
    prompt_column: str = Field("prompt", description="optional per-row prompt; missing or null: the task's default")
    limit: int | None = Field(None, ge=1, description="only the first N rows (smoke runs)")


class ModelConfig(_Section):
    path: str | None = Field(None, description="local path or hub id; default: the embedded offline model")
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    vision_fp8: bool = Field(False, description="the vision tower's and projector's GEMMs in FP8 (e4m3; needs an "
                                                "Ada or Hopper GPU; changes the answers a little: README, FP8 "
                                                "vision GEMMs)")


class SparsitySection(_Section):
    """The engine's `SparsityConfig` as a job section: the same fields, and its rules, checked by
    building it (one definition: sparsevlm/config.py). Unset knobs take the engine's defaults."""

    method: Literal[SPARSITY_METHODS] = Field("sparsevlm", description="none, sparsevlm, sparsevlm_v2, fastv "
                                                                       "or random")
    preset: Literal[PRESETS] | None = Field(None, description="the paper's budget: layer-averaged visual tokens "
                                                              "per 576 (default 128 when no budget is given)")
    keep_ratio: float | None = Field(None, description="keep this share of the visual tokens, in (0, 1]")
    schedule: dict[int, int | float] | None = Field(None, description="{layer: keep count (int) or ratio "
                                                                      "(float)}, pruning after those layers")
    recycle: bool | None = Field(None, description="merge part of what is deleted (default: on for sparsevlm)")
    tau: float | None = Field(None, description="share of the deleted tokens recycled (engine default 0.3)")
    theta: float | None = Field(None, description="merged tokens per recycled token (engine default 0.1)")
    rank_adaptive: bool = Field(False, description="sparsevlm keeps floor(rank_scale * rank + rank_bias)")
    rank_scale: float | None = Field(None, description="rank-adaptive scale (engine default 13.5)")
    rank_bias: float | None = Field(None, description="rank-adaptive bias (engine default 0)")
    fastv_layer: int | None = Field(None, description="the layer fastv and random prune after (default: K=2 "
                                                      "of 32, mapped to the model's depth)")
    seed: int = Field(0, description="the random method's seed")

    @model_validator(mode="after")
    def _valid(self) -> "SparsitySection":
        self.engine_config()
        return self

    def engine_config(self) -> SparsityConfig:
        values = {name: getattr(self, name) for name in type(self).model_fields if getattr(self, name) is not None}
        return SparsityConfig(**values)

    @property
    def label(self) -> str:
        return self.engine_config().label


class GenerationConfig(_Section):
    task: Literal["caption", "vqa"] = "caption"
    prompt: str | None = Field(None, description="default prompt for rows without one (default per task)")
    max_new_tokens: int = Field(128, ge=1, le=8192)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    max_prompt_tokens: int = Field(8192, ge=16, description="longer prompts (text + visual tokens) become error rows")


class MediaConfig(_Section):
    num_frames: int = Field(16, ge=2, description="frames sampled uniformly from each video, at most all "
                                                 "of its frames (even: frames pair up)")
    fps: float | None = Field(None, gt=0, description="sample at this rate instead of a fixed count")
    max_frames: int = Field(64, ge=2)
    min_pixels: int | None = Field(None, ge=28 * 28, description="per image or frame (default: the model's)")
    max_pixels: int | None = Field(None, ge=28 * 28, description="per image or frame, after resizing "
                                                                "(default: the model's preprocessor config)")
    max_image_pixels: int = Field(100_000_000, ge=1, description="decompression-bomb guard: larger images fail")

    @model_validator(mode="after")
    def _ranges(self) -> "MediaConfig":
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) exceeds max_pixels ({self.max_pixels})")
        if self.num_frames > self.max_frames:
            raise ValueError(f"num_frames ({self.num_frames}) exceeds max_frames ({self.max_frames})")
        return self


class ResourcesConfig(_Section):
    gpu_actors: int | None = Field(None, ge=1, description="engines (default: one per GPU, or per "
                                                           "gpus_per_actor of a GPU; 1 on CPU)")
    gpus_per_actor: float = Field(1.0, gt=0, le=1, description="the GPU share each engine takes: 0.5 puts two "
                                                               "engines on each GPU (each in half its memory)")
    use_gpu: bool | None = Field(None, description="engines on GPUs: default if the cluster has GPUs when the job "
                                                   "starts; true on autoscaling clusters whose GPU workers come later")
    cpu_actors: int = Field(2, ge=1, description="decode/preprocess actors")
    batch_size: int = Field(64, ge=1, description="rows per Ray batch handed to an engine (and per output file)")
    batches_in_flight: int = Field(4, ge=1, description="Ray batches each engine holds at once; their samples "
                                                        "feed one continuously batched engine, so it never waits")
    max_num_seqs: int = Field(128, ge=1, description="samples an engine decodes together (more wait for a seat)")
    warmup: bool = Field(False, description="run each GPU actor's first batch twice and keep the second, so that "
                                            "compilation and CUDA-graph capture stay out of the timings")


class OutputConfig(_Section):
    uri: str | None = Field(None, description="output folder, local or URI; default: ./runs/<job>-<time>")
    resume: bool = Field(True, description="skip ids already written to this output")


class JobConfig(_Section):
    input: InputConfig = InputConfig()
    model: ModelConfig = ModelConfig()
    sparsity: SparsitySection = SparsitySection()
    generation: GenerationConfig = GenerationConfig()
    media: MediaConfig = MediaConfig()
    resources: ResourcesConfig = ResourcesConfig()
    output: OutputConfig = OutputConfig()

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None,
             base: dict[str, Any] | None = None) -> "JobConfig":
        """`base` (a job's own defaults) <- YAML file <- `overrides` ({"section.field": value})."""
        data: dict[str, Any] = _deep_copy(base or {})
        if path is not None:
            try:
                loaded = yaml.safe_load(Path(path).read_text()) or {}
            except (OSError, yaml.YAMLError) as error:
                raise ConfigError(f"cannot read config {path}: {error}") from None
            if not isinstance(loaded, dict):
                raise ConfigError(f"config {path} must be a mapping of sections, got {type(loaded).__name__}")
            _merge(data, loaded)
        for dotted, value in (overrides or {}).items():
            section, _, field = dotted.partition(".")
            if not field:
                raise ConfigError(f"override {dotted!r} must name section.field")
            data.setdefault(section, {})
            if not isinstance(data[section], dict):
                raise ConfigError(f"{section}: must be a mapping, got {data[section]!r}")
            data[section][field] = value
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise ConfigError(_describe(error, path)) from None


def _merge(into: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _deep_copy(data: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def _describe(error: ValidationError, path) -> str:
    where = f" in {path}" if path else ""
    lines = [f"invalid job configuration{where}:"]
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  {field}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)
