"""Settings: one object, read from ``MNIST_*`` environment variables (or a ``.env`` file)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "default_models_dir", "get_settings"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def default_models_dir() -> Path:
    """``models/`` beside the package: the bundled model in a checkout and in the image."""
    return PROJECT_ROOT / "models"


class Settings(BaseSettings):
    """Every knob of the service. Environment variable = ``MNIST_`` + field name in capitals."""

    model_config = SettingsConfigDict(env_prefix="MNIST_", env_file=".env", extra="ignore")

    # Model
    model_dir: Path = Field(
        default_factory=default_models_dir, description="folder of versioned checkpoints and the CURRENT pointer"
    )
    model_path: Path | None = Field(
        None, description="serve this checkpoint file instead of the pointer (disables the watcher)"
    )
    device: str = Field("auto", description="auto (cuda, mps, cpu), cpu, cuda, cuda:N or mps")
    reload_interval: float = Field(1.0, ge=0, description="seconds between checks of the CURRENT pointer; 0 disables")
    canary_min_accuracy: float = Field(
        0.9, ge=0, le=1, description="a new model must reach this on the bundled canary digits"
    )
    admin_token: SecretStr | None = Field(
        None, description="bearer token for /admin/*; unset disables those routes (404)"
    )

    # Server
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    access_log: bool = Field(True, description="one structured line per request")
    graceful_timeout: float = Field(30.0, gt=0, description="seconds in-flight requests get after SIGTERM")
    keepalive_timeout: float = Field(
        5.0, gt=0, description="seconds an idle keep-alive connection stays open (uvicorn's timeout_keep_alive)"
    )
    header_timeout: float = Field(
        10.0, gt=0, description="seconds a client has to send a request's head (line and headers); then 408, closed"
    )
    max_header_bytes: int = Field(64 * 1024, ge=1024, description="largest request head; over it 431, closed")
    max_connections: int = Field(
        8192,
        ge=1,
        description="open connections per worker; past it uvicorn answers 503 (its limit_concurrency): a bound on "
        "sockets and memory, far above what the compute budgets admit",
    )
    backlog: int = Field(4096, ge=64, description="connections the kernel queues per listening socket")
    torch_threads: int = Field(
        1, ge=0, description="intra-op threads per worker (torch and numpy's BLAS); 0 keeps their defaults"
    )
    microbatch: bool = Field(
        True, description="run concurrent small /predict requests as one forward pass (docs/performance.md)"
    )
    microbatch_max_rows: int = Field(64, ge=1, le=4096, description="most images in one micro-batched forward pass")
    microbatch_max_wait_ms: float = Field(
        0.0, ge=0, le=1000, description="how long a micro-batch waits for more requests; 0: one event-loop turn"
    )
    fast_lane: bool = Field(
        True, description="answer small /predict bodies without the framework's routing layers (docs/performance.md)"
    )

    # Limits: what one request may cost, checked before the work starts (app/serving.py)
    max_body_bytes: int = Field(32 * 1024 * 1024, gt=0, description="largest request body, enforced while reading")
    max_json_bytes: int = Field(
        8 * 1024 * 1024,
        gt=0,
        description="largest JSON body (parsed JSON takes several times its size in memory): use uint8 or .npy for "
        "bigger batches",
    )
    max_batch_size: int = Field(10_000, ge=1, description="most images or vectors in one request")
    max_image_pixels: int = Field(
        2048 * 2048,
        gt=0,
        description="most pixels one image may decode to (a JPEG decodes at 1/2, 1/4 or 1/8 scale when that is "
        "enough, so a 12-megapixel phone photo counts as ~0.2 megapixels)",
    )
    max_request_pixels: int = Field(
        4 * 2048 * 2048, gt=0, description="most decoded pixels of all the images in one request together"
    )
    max_images_per_request: int = Field(64, ge=1, description="most images (PNG, JPEG, WebP) in one request")
    body_timeout: float = Field(
        30.0, gt=0, description="seconds a client has to send its whole body; then 408 and the connection is closed"
    )
    queue_timeout: float = Field(
        2.0,
        gt=0,
        description="seconds a request may wait for this worker (not counting its upload) before it is answered "
        "503 + Retry-After",
    )
    max_inflight: int = Field(
        2048, ge=1, description="prediction requests in progress per worker; more are answered 503 + Retry-After"
    )
    max_buffered_bytes: int = Field(
        256 * 1024 * 1024, gt=0, description="request bodies one worker may hold at once (being read or computed)"
    )
    compute_slots: int = Field(
        0,
        ge=0,
        description="large requests computed at once per worker; 0: the CPUs this process may use (affinity and "
        "cgroup quota) divided by the workers",
    )

    @model_validator(mode="after")
    def _check_device(self) -> Settings:
        # Fail at startup, not on the first request. "auto" and "cpu" cannot fail: not importing
        # torch for them keeps `python -m app` from loading it in the supervisor process too.
        if self.device not in ("auto", "cpu"):
            from app.registry import pick_device  # torch: only for a device that needs checking

            pick_device(self.device)
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()
