"""Settings from the environment and `.env`; names follow the original design."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore",
                                      env_ignore_empty=True)

    host: str = "0.0.0.0"
    port: int = 3000

    model_repo_id: str = "Qwen/Qwen3-VL-2B-Thinking"
    hf_token: str | None = None
    device_map: str = "auto"
    torch_dtype: str = "auto"
    trust_remote_code: bool = False
    served_model_name: str | None = None
    load_model_on_startup: bool = True

    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.7, ge=0.0)
    max_stop_sequences: int = Field(4, ge=0)
    max_n: int = Field(4, ge=1)
    max_request_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_prompt_chars: int = Field(1_000_000, ge=1)
    max_json_depth: int = Field(64, ge=4)
    min_temperature: float = Field(0.01, gt=0.0, le=2.0)
    shutdown_grace_seconds: float = Field(10, ge=0)

    api_key: str | None = None

    persist_sessions: bool = False
    sessions_store: str = Field("", pattern="^(|memory|sqlite|redis)$")  # empty: sqlite if persist_sessions
    redis_url: str = "redis://127.0.0.1:6379/0"
    session_lease_seconds: float = Field(10, gt=0)
    sessions_db_path: str = "sessions.db"
    sessions_ttl_seconds: float = Field(600, ge=0)
    responses_ttl_seconds: float = Field(3600, ge=0)
    sessions_buffer_events: int = Field(4096, ge=8)
    sessions_max_finished: int = Field(1024, ge=0)
    sessions_max_finished_bytes: int = Field(256 * 1024 * 1024, ge=0)
    cancel_after_disconnect_seconds: float = Field(3600, ge=0)
    sse_ping_seconds: float = Field(15, gt=0)

    max_concurrent_requests: int = Field(16, ge=1)
    kv_cache_tokens: int = Field(4096, ge=64)  # per slot: prompt + max_tokens of one row
    prefill_chunk_tokens: int = Field(512, ge=16)
    prefill_stall_factor: float = Field(1.0, ge=0.0)  # while rows decode, a chunk adds <= this x a decode step; 0: off
    compile: str = Field("auto", pattern="^(auto|0|1)$")
    quantization: str = Field("none", pattern="^(none|int8)$")
    max_queued_requests: int = Field(64, ge=0)

    max_video_frames: int = Field(16, ge=1)
    max_video_decoded_frames: int = Field(4096, ge=2)
    max_images_per_request: int = Field(8, ge=0)
    max_videos_per_request: int = Field(2, ge=0)
    max_image_pixels: int = Field(40_000_000, ge=1)
    max_media_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_video_seconds: float = Field(600, gt=0)
    media_fetch_timeout_seconds: float = Field(10, gt=0)
    media_max_redirects: int = Field(3, ge=0)
    media_allow_private_networks: bool = False
    media_allowed_networks: str = ""
    allowed_media_domains: str = ""
    allowed_local_media_path: str | None = None

    @property
    def model_id(self) -> str:
        """The id clients see: never a local absolute path (a directory is named by its last part)."""
        if self.served_model_name:
            return self.served_model_name
        repo = self.model_repo_id.rstrip("/\\")
        if Path(repo).is_absolute() or repo.startswith((".", "~")) or Path(repo).exists():
            return Path(repo).name or repo
        return repo

    @property
    def store_kind(self) -> str:
        """memory, sqlite or redis: PERSIST_SESSIONS=1 keeps meaning sqlite when SESSIONS_STORE is unset."""
        return self.sessions_store or ("sqlite" if self.persist_sessions else "memory")

    @property
    def allowed_media_domain_list(self) -> list[str]:
        return [d.strip().lower() for d in self.allowed_media_domains.split(",") if d.strip()]


@lru_cache
def get_settings() -> Settings:
    return Settings()
