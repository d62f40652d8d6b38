"""One settings object for the whole service: defaults here, environment variables (VIT_*) over
them, command-line flags over those."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The post's DeiT-Tiny (ImageNet weights from the hub or its cache) and the bundled demo model,
# which works offline; when DeiT's weights cannot be had, the demo model becomes the default.
SHAPES_VIT = Path(__file__).parent / "demo" / "shapes-vit"
DEFAULT_MODELS = ["deit_tiny_patch16_224", f"shapes-vit=local-dir:{SHAPES_VIT}"]

# Seconds a 503 (a full queue, a spent budget, a model still loading, the connection limit, Ray
# Serve's back-pressure) asks the client to wait before it tries again: its Retry-After header.
RETRY_AFTER_S = 2


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
    decode_on_device: bool = Field(
        False, description="decode JPEG uploads answered as JSON on the model's device, batched (nvJPEG on CUDA): "
        "takes decoding off the CPU of a GPU host",
    )
    tune_allocator: bool = Field(True, description="keep freed memory in the process for the next batch (glibc)")
    # -- batching and limits
    max_batch_size: int = Field(16, ge=1, le=1024, description="most images in one batch; a full batch starts at once")
    max_delay_ms: float = Field(
        5.0, ge=0, le=10_000,
        description="longest wait for more images: for requests still decoding, and after a batch for its "
        "clients to come back",
    )
    max_queue: int = Field(256, ge=1, description="queued images per model before 503 + Retry-After")
    request_timeout_s: float = Field(60.0, gt=0, description="504 when a request takes longer")
    max_pixels: int = Field(40_000_000, ge=1, description="images with more pixels are refused (413)")
    max_upload_mb: float = Field(20.0, gt=0, description="request bodies larger than this are refused (413)")
    max_images: int = Field(16, ge=1, le=1024, description="images in one multipart or JSON request "
                            "(at most --max-queue; default 16, or --max-queue when smaller)")
    max_pixels_in_flight: int | None = Field(
        None, ge=1,
        description="pixels decoded or drawn at once across all requests; beyond it a request waits up to 5 s, "
        "then 503 (default: 2 x --max-pixels)",
    )
    max_forwards_in_flight: int = Field(
        20_000, ge=1,
        description="forward passes of faithfulness scoring (images x frames x settings x (steps + 1) x 2) committed "
        "at once across all requests; a request that needs more is refused (413), beyond it a request waits up to "
        "5 s, then 503",
    )
    max_bodies_mb: float | None = Field(
        None, gt=0, description="request body megabytes held at once across all requests, beyond it 503 "
        "(default: 4 x --max-upload-mb)"
    )
    read_timeout_s: float = Field(
        10.0, gt=0, description="longest wait for a request's headers, and for each next piece of its body (408)"
    )
    keep_alive_s: float = Field(5.0, gt=0, description="an idle keep-alive connection is closed after this long")
    max_connections: int | None = Field(
        None, ge=1, description="open connections; a new one beyond it closes the longest-idle one, or gets 503 "
        "when all are busy (default: 1000, or fewer to stay 128 below the file-handle limit)",
    )
    max_header_kb: float = Field(32.0, gt=0, le=1024,
                                 description="request line and headers larger than this are refused (431)")
    max_maximizations: int = Field(
        8, ge=1, le=1024, description="activation maximizations running at once per model before 503 + Retry-After"
    )
    # -- HTTP
    workers: int = Field(
        1, ge=1, le=64, description="server processes sharing the port, each with its own models, queue and limits "
        "(docs/workers.md)",
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_key: SecretStr | None = Field(None, description="when set, every endpoint but health needs X-API-Key")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list,
                                                         description="origins allowed by CORS (default: none)")
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

    @field_validator("models")
    @classmethod
    def _known_sources(cls, v: list[str]) -> list[str]:
        """Each spec parses: an unknown source prefix is a usage error at start (exit 2), naming the known ones."""
        from service.models import ModelSpec

        for text in v:
            ModelSpec.parse(text)
        return v

    @field_validator("device")
    @classmethod
    def _known_devices(cls, v: str) -> str:
        """auto, or devices the service runs on (whether they are present is checked at start)."""
        if v.strip() == "auto":
            return "auto"
        parts = [p.strip() for p in v.split(",") if p.strip()]
        bad = [p for p in parts if not re.fullmatch(r"(cpu|cuda)(:\d+)?", p)]
        if bad or not parts:
            raise ValueError(f"device {', '.join(bad) or repr(v)} is not one the service runs on: "
                             "give auto, cpu, cuda, cuda:N, or a comma list such as cuda:0,cuda:1")
        return v

    @field_validator("api_key")
    @classmethod
    def _usable_key(cls, v: SecretStr | None) -> SecretStr | None:
        """A key that is set must be one a client can send: an empty or blank one (an unset shell
        variable, VIT_API_KEY=) would otherwise switch authentication off. Fail closed."""
        if v is None:
            return v
        key = v.get_secret_value()
        if not key.strip():
            raise ValueError("the API key is set but empty or blank (an unset shell variable?); refusing to start "
                             "without authentication: give a real key, or leave --api-key out to serve without one")
        if not all("\x21" <= c <= "\x7e" for c in key):
            raise ValueError("the API key must be printable ASCII without spaces (it is sent as a header value)")
        return v

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if not self.models:
            raise ValueError("at least one --model is needed")
        if "max_images" not in self.model_fields_set:
            self.max_images = min(self.max_images, self.max_queue)  # the default follows a smaller queue
        if self.max_images > self.max_queue:
            # such a request could never be queued: it would always get 503, even on an idle server
            raise ValueError(f"--max-images ({self.max_images}) must not exceed --max-queue ({self.max_queue}): "
                             "a request with more images than the queue holds could never be admitted")
        if self.max_pixels_in_flight is not None and self.max_pixels_in_flight < self.max_pixels:
            raise ValueError(f"--max-pixels-in-flight ({self.max_pixels_in_flight}) must be at least --max-pixels "
                             f"({self.max_pixels}), or an image within the limit could never be decoded")
        if self.max_bodies_mb is not None and self.max_bodies_mb < self.max_upload_mb:
            raise ValueError(f"--max-bodies-mb ({self.max_bodies_mb:g}) must be at least "
                             f"--max-upload-mb ({self.max_upload_mb:g})")
        return self

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def pixels_in_flight(self) -> int:
        return self.max_pixels_in_flight or 2 * self.max_pixels

    @property
    def body_bytes_in_flight(self) -> int:
        return int(self.max_bodies_mb * 1024 * 1024) if self.max_bodies_mb else 4 * self.max_upload_bytes

    @property
    def connection_limit(self) -> int:
        """--max-connections, or 1000 kept 128 below the soft file-handle limit (RLIMIT_NOFILE):
        model files, logs and the event loop need handles too, and a refused client must still
        get its 503 rather than a dropped connection."""
        if self.max_connections is not None:
            return self.max_connections
        try:
            import resource

            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        except (ImportError, ValueError, OSError):
            return 1000
        if soft == getattr(resource, "RLIM_INFINITY", -1) or soft <= 0:
            return 1000
        return max(16, min(1000, soft - 128))
