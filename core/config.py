"""The contract's environment variables (and ``.env``), read once per entry point and passed down;
nothing here connects to anything. Every variable: README.md, "Settings"."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.errors import ConfigurationError

DEV_MANAGEMENT_TOKEN = "dev-management-token"  # noqa: S105 - the documented dev-only default
#: Shorter management tokens are refused outside ``dev``: a guessable key makes signatures worthless.
MIN_MANAGEMENT_TOKEN_LENGTH = 16
# Defaults of settings, shared with the Redis writers whose own defaults they are (seconds).
DEFAULT_PARKED_RETENTION_SECONDS = 1_209_600  # 14 days
DEFAULT_DEDUPE_TTL_SECONDS = 604_800  # 7 days, Smartcar's recommendation
DEFAULT_OUTPUT_STREAM_RETENTION_SECONDS = 86_400  # 1 day
DEFAULT_JOB_RESULT_TTL_SECONDS = 60  # how long RQ keeps a finished job (hash, body, result)
DEFAULT_VEHICLE_STATE_TTL_SECONDS = 2_592_000  # 30 days


def key_list(secret: SecretStr | None) -> tuple[bytes, ...]:
    """The entries of a comma-separated list of keys (a rotation), UTF-8 encoded, in order."""
    raw = secret.get_secret_value() if secret is not None else ""
    return tuple(part.strip().encode() for part in raw.split(",") if part.strip())


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        env_ignore_empty=True,  # `SPOOL_DIR=` (in the environment or .env) means unset
    )

    redis_url: str = "redis://localhost:6379/0"
    database_url: str = "sqlite:///./smartcar-ingest.db"
    smartcar_management_token: SecretStr | None = None
    smartcar_client_id: str | None = None
    smartcar_client_secret: SecretStr | None = None
    smartcar_api_url: str = "https://vehicle.api.smartcar.com/v3"
    smartcar_token_url: str = "https://iam.smartcar.com/oauth2/token"  # noqa: S105 - a URL, not a secret
    ingest_queue: str = "smartcar-events"
    output_stream: str = "smartcar:vehicle-events"
    parked_stream: str = "smartcar:parked"
    dedupe_ttl_seconds: int = Field(default=DEFAULT_DEDUPE_TTL_SECONDS, gt=0)
    max_body_bytes: int = Field(default=262_144, gt=0)
    spool_dir: str | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["json", "console"] = "json"

    # Extensions beyond the contract, with defaults that suit production.
    redis_timeout_seconds: float = Field(default=0.5, gt=0)
    body_timeout_seconds: float = Field(default=10.0, gt=0)
    allow_evicting_redis: bool = False
    redis_max_connections: int = Field(default=64, gt=0)
    job_timeout_seconds: int = Field(default=120, gt=0)
    job_retries: int = Field(default=5, ge=0)
    metrics_port: int = Field(default=9100, ge=0, le=65535)
    admin_port: int = Field(default=9000, ge=0, le=65535)
    admin_host: str = "0.0.0.0"
    spool_max_bytes: int = Field(default=1_073_741_824, gt=0)
    parked_retention_seconds: int = Field(default=DEFAULT_PARKED_RETENTION_SECONDS, gt=0)
    output_stream_retention_seconds: int = Field(default=DEFAULT_OUTPUT_STREAM_RETENTION_SECONDS, gt=0)
    job_result_ttl_seconds: int = Field(default=DEFAULT_JOB_RESULT_TTL_SECONDS, ge=0)
    vehicle_state_prefix: str = Field(default="smartcar:vehicle-state:", min_length=1)
    vehicle_state_ttl_seconds: int = Field(default=DEFAULT_VEHICLE_STATE_TTL_SECONDS, gt=0)
    max_delivery_age_seconds: int | None = Field(default=None, gt=0)
    header_timeout_seconds: float = Field(default=10.0, gt=0)
    max_header_bytes: int = Field(default=16_384, ge=1024)
    dev_mode: bool = False

    # Quota-aware enrichment (core.smartcar.reads): what the workers read from Smartcar, and how often.
    vehicle_info_ttl_seconds: int = Field(default=86_400, ge=0)
    signals_max_age_seconds: int = Field(default=300, ge=0)
    smartcar_requests_per_minute: float | None = Field(default=None, gt=0)
    smartcar_burst: int | None = Field(default=None, ge=1)
    enrich_wait_seconds: float = Field(default=10.0, ge=0)

    # Smartcar Connect: capturing user_id on the redirect (docs/migration.md, phase 2).
    smartcar_application_id: str | None = None
    connect_redirect_uri: str | None = None
    connect_scope: str = "read_vehicle_info read_battery read_charge read_location read_odometer"
    connect_mode: Literal["live", "simulated", "test"] | None = None
    connect_state_secret: SecretStr | None = None
    connect_state_ttl_seconds: int = Field(default=3600, gt=0)
    connect_start_enabled: bool = False

    @field_validator("log_level", "log_format", "connect_mode", mode="before")
    @classmethod
    def _any_case(cls, value: object, info: ValidationInfo) -> object:
        if isinstance(value, str):
            value = value.strip().upper() if info.field_name == "log_level" else value.strip().lower()
            return value or None
        return value

    @model_validator(mode="after")
    def _burst_needs_a_rate(self) -> Settings:
        if self.smartcar_burst is not None and self.smartcar_requests_per_minute is None:
            raise ValueError("SMARTCAR_BURST needs SMARTCAR_REQUESTS_PER_MINUTE (unset both for no limit)")
        return self

    @property
    def management_tokens(self) -> tuple[bytes, ...]:
        """The first answers VERIFY, all verify ``SC-Signature``."""
        return key_list(self.smartcar_management_token)

    @property
    def delivery_max_age_seconds(self) -> int:
        """How old a signed delivery may be (``MAX_DELIVERY_AGE_SECONDS``, else ``DEDUPE_TTL_SECONDS``)."""
        return self.max_delivery_age_seconds or self.dedupe_ttl_seconds

    def require_management_token(self) -> None:
        """Outside ``DEV_MODE`` each must also be long enough and none the public dev default."""
        if not self.management_tokens:
            raise ConfigurationError(
                "SMARTCAR_MANAGEMENT_TOKEN is not set: copy the Application Management Token from the "
                "Smartcar Dashboard into it (a comma-separated list is accepted during rotation)."
            )
        if self.dev_mode:
            return
        for position, token in enumerate(self.management_tokens, start=1):
            if token == DEV_MANAGEMENT_TOKEN.encode():
                raise ConfigurationError(
                    f"SMARTCAR_MANAGEMENT_TOKEN entry {position} is the public dev default: set the Application "
                    "Management Token from the Smartcar Dashboard (the default is accepted only by `dev`)."
                )
            if len(token) < MIN_MANAGEMENT_TOKEN_LENGTH:
                raise ConfigurationError(
                    f"SMARTCAR_MANAGEMENT_TOKEN entry {position} is shorter than {MIN_MANAGEMENT_TOKEN_LENGTH} "
                    "characters: it is not an Application Management Token (copy it from the Smartcar Dashboard)."
                )

    def require_client_credentials(self) -> None:
        names = ("smartcar_client_id", "smartcar_client_secret")
        if missing := " and ".join(name.upper() for name in names if getattr(self, name) is None):
            raise ConfigurationError(
                f"{missing} not set: create API credentials in the Smartcar Dashboard and set both variables."
            )


def load_settings() -> Settings:
    """Validation failures become one :class:`ConfigurationError` line."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']).upper() or 'settings'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigurationError(f"invalid settings: {problems}") from None
