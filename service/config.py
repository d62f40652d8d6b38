"""One settings object for the whole service: defaults here, environment variables (VIT_*) over
them, command-line flags over those."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The post's DeiT-Tiny (ImageNet weights from the hub or its cache) and the bundled demo model,
# which works offline; when DeiT's weights cannot be had, the demo model becomes the default.
SHAPES_VIT = Path(__file__).parent / "demo" / "shapes-vit"
DEFAULT_MODELS = ["deit_tiny_patch16_224", f"shapes-vit=local-dir:{SHAPES_VIT}"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VIT_", extra="ignore")

    # -- models and devices
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_MODELS),
        description="[ALIAS=]SPEC per model; the first available one is the default",
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N, or a comma list such as cuda:0,cuda:1")
    replicas_per_device: int | None = Field(
        None, ge=1, le=16, description="model copies per device (default: 1 per GPU; on CPU one per core, at most 4)"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="half types on CUDA only")
    threads: int | None = Field(
        None, ge=1, description="torch intra-op threads (default: the CPU cores shared evenly between CPU replicas)"
    )
    tune_allocator: bool = Field(True, description="keep freed memory in the process for the next batch (glibc)")
    # -- batching and limits
    max_batch_size: int = Field(16, ge=1, le=1024, description="most images in one batch; a full batch starts at once")
    max_delay_ms: float = Field(
        5.0, ge=0, le=10_000,
        description="longest wait for more images: for requests still decoding, and after a batch for its clients to come back",
    )
    max_queue: int = Field(256, ge=1, description="queued images per model before 503 + Retry-After")
    request_timeout_s: float = Field(60.0, gt=0, description="504 when a request takes longer")
    max_pixels: int = Field(40_000_000, ge=1, description="images with more pixels are refused (413)")
    max_upload_mb: float = Field(20.0, gt=0, description="request bodies larger than this are refused (413)")
    max_images: int = Field(16, ge=1, le=1024, description="images in one multipart or JSON request")
    max_maximizations: int = Field(
        8, ge=1, le=1024, description="activation maximizations running at once per model before 503 + Retry-After"
    )
    # -- HTTP
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_key: SecretStr | None = Field(None, description="when set, every endpoint but health needs X-API-Key")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list, description="origins allowed by CORS (default: none)")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_json: bool = Field(False, description="structured JSON log lines")

    @field_validator("models", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, v):
        """VIT_MODELS=a,b works as well as a JSON list."""
        if isinstance(v, str):
            if v.strip().startswith("["):
                return json.loads(v)
            return [s for s in (p.strip() for p in v.split(",")) if s]
        return v

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        if not self.models:
            raise ValueError("at least one --model is needed")
        return self

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)
