"""One settings object for the whole service: defaults here, environment variables (VIT_*) over
them, command-line flags over those."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODELS = ["deit_tiny_patch16_224"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VIT_", env_nested_delimiter="__", extra="ignore")

    models: list[str] = Field(
        default_factory=lambda: list(DEFAULT_MODELS),
        description="[ALIAS=]SPEC per model; the first is the default. SPEC: timm name, hf-hub:org/repo, local-dir:/path",
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    device: str = Field("auto", description="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    max_batch_size: int = Field(16, ge=1, le=1024, description="a batch flushes when it holds this many images")
    max_delay_ms: float = Field(5.0, ge=0, le=10_000, description="... or when its oldest image has waited this long")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's choice)")
    max_pixels: int = Field(40_000_000, ge=1, description="uploads with more pixels are refused (413)")
    max_upload_mb: float = Field(20.0, gt=0, description="uploads larger than this are refused (413)")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
