"""Service settings: flags or `HARDBATCH_*` environment variables (pydantic-settings)."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from hardbatch.sampler.plans import PlanConfig
from hardbatch.services.core.secrets import secret_problem
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_PLAN = PlanConfig()


class Settings(BaseSettings):
    """Everything the sampler service reads at start.

    Each field `x` can be set with the environment variable `HARDBATCH_X` (e.g.
    `HARDBATCH_API_TOKEN`, `HARDBATCH_REDIS_URL`), or by the matching `hardbatch serve` flag.
    """

    # Errors never echo the input: it holds the token and the password.
    model_config = SettingsConfigDict(env_prefix="HARDBATCH_", extra="ignore",
                                      hide_input_in_errors=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    redis_url: str | None = Field(
        default=None, description="Redis to read runs from; none starts an embedded Redis server."
    )
    api_token: SecretStr | None = Field(
        default=None, description="Bearer token that state-changing endpoints need (none: open)."
    )
    auth_reads: bool = Field(default=False, description="Make read endpoints need the token too.")
    redis_password: SecretStr | None = Field(
        default=None, description="Filled into redis:// URLs that name no password.")

    # Limits on what one request may ask for.
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    max_limit: int = Field(
        default=10_000, ge=1, description="Most samples one top-k query returns."
    )
    max_lookup_ids: int = Field(default=100_000, ge=1, description="Most ids one lookup may name.")
    max_bins: int = Field(default=10_000, ge=1)
    max_batches: int = Field(default=4096, ge=1)
    max_batch_size: int = Field(default=65_536, ge=1)
    max_world_size: int = Field(default=4096, ge=1)
    max_round_ids: int = Field(default=1 << 24, ge=1, description="Most ids one round may hold.")

    # Background work.
    refresh_s: float = Field(
        default=2.0, gt=0, description="How often plan priorities and run stats follow the table."
    )
    snapshot_interval_s: float = Field(default=30.0, gt=0, description="Table snapshots to Redis.")
    plan_ttl_s: int = Field(
        default=7 * 24 * 3600, ge=1, description="How long composed rounds stay in Redis."
    )
    plan_cache_rounds: int = Field(default=16, ge=1, description="Composed rounds kept in memory.")
    plan_grace_s: int = Field(
        default=3600, ge=1,
        description="How long a round stays in Redis once every rank has fetched it (a worker "
                    "group that restarts fetches it again).")
    plan_max_rounds: int = Field(default=16, ge=1, description="Rounds a run keeps in Redis.")
    round_wait_s: float = Field(
        default=5.0, ge=0, le=60,
        description="How long composing round r waits for all of round r-1's losses (what "
                    "makes plans reproducible); keep it below the workers' request timeout.")
    idle_evict_s: float = Field(
        default=900.0, gt=0, description="Unload a run's table after this long without requests.")
    redis_timeout_s: float = Field(
        default=5.0, gt=0, description="Redis socket timeout: a stalled Redis fails requests "
                                       "that need it (503) after this long instead of hanging.")
    ready_timeout_s: float = Field(
        default=0.5, gt=0, le=0.9,
        description="Socket timeout of the background Redis ping /readyz reports: under 1 s, so "
                    "a stalled Redis turns /readyz into a 503 within a second or so.")

    # Default plan config of a run (a run can override it through its plan-config endpoint);
    # the defaults are PlanConfig's own, so the two cannot drift apart.
    plan_alpha: float = _PLAN.alpha
    plan_lam: float = _PLAN.lam
    plan_eps: float = _PLAN.eps
    plan_beta: float = _PLAN.beta
    plan_anneal_frac: float = _PLAN.anneal_frac
    plan_total_rounds: int | None = _PLAN.total_rounds
    plan_hardness: str = _PLAN.hardness

    @model_validator(mode="after")
    def _check_plan_defaults(self) -> Settings:
        self.default_plan_config()  # raises ValueError with the reason
        return self

    @model_validator(mode="after")
    def _refuse_placeholder_secrets(self) -> Settings:
        given = {"HARDBATCH_API_TOKEN": self.api_token,
                 "HARDBATCH_REDIS_PASSWORD": self.redis_password}
        problems = [secret_problem(name, v.get_secret_value())
                    for name, v in given.items() if v is not None]
        url_password = urlsplit(self.redis_url or "").password
        if url_password is not None:
            problems.append(secret_problem("the password in HARDBATCH_REDIS_URL",
                                           unquote(url_password)))
        found = [p for p in problems if p]
        if found:
            raise ValueError("; ".join(found))
        return self

    def default_plan_config(self) -> PlanConfig:
        return PlanConfig(
            alpha=self.plan_alpha, lam=self.plan_lam, eps=self.plan_eps, beta=self.plan_beta,
            anneal_frac=self.plan_anneal_frac, total_rounds=self.plan_total_rounds,
            hardness=self.plan_hardness,
        )

    def token(self) -> str | None:
        return self.api_token.get_secret_value() if self.api_token else None
