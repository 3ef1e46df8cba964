"""Request and response bodies of the REST API (they make the OpenAPI spec)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from hardbatch.sampler.plans import PlanConfig
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

# Request bodies: no coercion (false is not 0.0) and no unknown fields, so typos fail loudly.
STRICT = ConfigDict(strict=True, extra="forbid")


def _integral(v: Any) -> Any:
    # JSON Schema's "integer" includes 258.0; strict mode alone would refuse it.
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


#: An integer in a request body: 258 or 258.0, never "258" or true.
JsonInt = Annotated[int, BeforeValidator(_integral)]
# Constraints go before the validator, or the JSON schema shows them as raw "ge"/"le" keys.
RoundCount = Annotated[int, Field(ge=1, le=2**53 - 1), BeforeValidator(_integral)]

# Rounds and steps stay exact in JSON readers that parse numbers as doubles.
MAX_ROUND = 2**53 - 1

HardnessField = Literal["ema", "last_loss"]
PriorityField = Literal["loss", "uncertain"]
_PLAN = PlanConfig()


class RunSummary(BaseModel):
    run: str
    num_samples: int | None = Field(default=None, description="Dataset size (null while loading).")
    ready: bool = Field(description="Whether the service has loaded the run's table.")
    records: int | None = Field(default=None, description="Loss records appended to the log.")
    lag_records: int | None = Field(
        default=None, description="Records appended but not yet materialized."
    )
    world_size: int | None = Field(default=None, description="World size of the last plan request.")
    round: int | None = Field(default=None, description="Round of the last plan request.")


class RunList(BaseModel):
    runs: list[RunSummary]


class PlanConfigModel(BaseModel):
    """How a run's plans lean toward hard samples (see sampler/plans.py)."""

    model_config = STRICT

    alpha: float = Field(
        default=1.0, ge=0.0, le=16.0, description="Priority exponent; 0 is uniform."
    )
    lam: float = Field(default=0.1, ge=0.0, le=1.0, description="Uniform floor share.")
    eps: float = Field(
        default=1e-3, gt=0.0, le=1e6, description="Added to hardness before the power."
    )
    beta: float = Field(default=_PLAN.beta, ge=0.0, le=1.0,
                        description="Importance-weight exponent (1: unbiased).")
    anneal_frac: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Last fraction of total_rounds sampled uniformly."
    )
    total_rounds: RoundCount | None = Field(
        default=None, description="Rounds in the run; needed for annealing."
    )
    hardness: HardnessField = Field(default="ema", description="Table field used as hardness.")
    priority: PriorityField = Field(
        default="loss", description="loss: the hardest first; uncertain: p (1 - p) with "
        "p = exp(-hardness), so confidently wrong samples (often label errors) rank low.")
    strata: JsonInt = Field(default=_PLAN.strata, ge=1, le=256,
                            description="Priority bins a round is stratified into.")
    suspect_scorings: JsonInt = Field(
        default=_PLAN.suspect_scorings, ge=1, le=2**32 - 1,
        description="Scorings (or rounds) before a sample can be a suspected label error.")
    suspect_factor: float = Field(
        default=_PLAN.suspect_factor, ge=0.0, le=1e6,
        description="Suspect when hardness and last loss stay above this many times the "
                    "median hardness; 0 turns the noise guard off.")
    suspect_floor: float = Field(
        default=_PLAN.suspect_floor, ge=-1e6, le=1e6,
        description="The suspect level never goes below this (1.0: cross-entropy scale).")
    suspect_min_share: float = Field(
        default=_PLAN.suspect_min_share, ge=0.0, le=1.0,
        description="The guard engages only when at least this share of the scored samples "
                    "would be suspect.")
    size_factor: float = Field(
        default=_PLAN.size_factor, ge=0.0, le=1e3,
        description="Adaptive plan size: a round trains on this many times the share of the "
                    "scored samples carrying size_mass of their last losses; the other slots are "
                    "marked skip (weight -1). 0: every slot is trained.")
    size_mass: float = Field(default=_PLAN.size_mass, gt=0.0, le=1.0,
                             description="Share of the last losses the adaptive size counts for.")
    size_min: float = Field(default=_PLAN.size_min, gt=0.0, le=1.0,
                            description="Least share of a round the adaptive size trains on.")
    packed: bool = Field(
        default=_PLAN.packed,
        description="With an adaptive size, a round is full batches of the samples it trains "
                    "(fewer batches than asked for); false: the asked batches, shrunk.")
    seed: int | None = Field(
        default=None, ge=0, lt=2**63,
        description="Seeds the rounds' random streams; null: from the run's name.")

    def to_config(self) -> PlanConfig:
        return PlanConfig(**self.model_dump())

    @classmethod
    def from_config(cls, cfg: PlanConfig) -> PlanConfigModel:
        return cls(alpha=cfg.alpha, lam=cfg.lam, eps=cfg.eps, beta=cfg.beta,
                   anneal_frac=cfg.anneal_frac, total_rounds=cfg.total_rounds,
                   hardness=cfg.hardness, strata=cfg.strata,  # type: ignore[arg-type]
                   priority=cfg.priority,  # type: ignore[arg-type]
                   suspect_scorings=cfg.suspect_scorings, suspect_factor=cfg.suspect_factor,
                   suspect_floor=cfg.suspect_floor, suspect_min_share=cfg.suspect_min_share,
                   size_factor=cfg.size_factor, size_mass=cfg.size_mass, size_min=cfg.size_min,
                   packed=cfg.packed, seed=cfg.seed)


class RunDetail(BaseModel):
    run: str
    ready: bool
    error: str | None = Field(default=None, description="Why the table failed to load, if it did.")
    num_samples: int = Field(description="Dataset size N (ids 0..N-1).")
    ema_decay: float
    created_at: float = Field(description="Registration time, unix seconds.")
    entries: int = Field(description="Batches appended to the loss log.")
    records: int = Field(description="Loss records appended to the loss log.")
    duplicate_batches: int
    malformed_batches: int
    rejected_records: int = Field(description="Records refused (bad id or non-finite loss).")
    lag_records: int = Field(description="Records appended but not yet materialized.")
    applied_records: int | None = Field(
        default=None, description="Records in this service's table."
    )
    priorities_records: int | None = Field(
        default=None, description="Records the plan priorities were last rebuilt from (every "
        "refresh_s): a round composed now leans on these, not on later records."
    )
    plan_share: float | None = Field(
        default=None, description="Share of a round's slots a round composed now trains: 1, "
        "or below with an adaptive size (plan_config.size_factor x the share of samples "
        "carrying size_mass of the last losses).")
    seen_samples: int | None = None
    kept_fraction: float | None = Field(default=None, description="Share of scored records kept.")
    ingest_rate: float | None = Field(
        default=None, description="Records applied per second, recently."
    )
    hardness_quantiles: dict[str, float] = Field(default_factory=dict)
    world_size: int | None = Field(default=None, description="World size of the last plan request.")
    round: int | None = Field(default=None, description="Round of the last plan request.")
    plan_config: PlanConfigModel


class Sample(BaseModel):
    """One sample's hardness record; loss fields are null until it is first scored."""

    id: int
    seen: int = Field(description="Times scored.")
    kept: int = Field(description="Times the filter kept it.")
    last_loss: float | None = None
    ema: float | None = Field(
        default=None, description="Current hardness: its loss, averaged with a weight that "
                                  "decays by the rounds since each scoring.")
    last_step: int | None = None
    last_round: int | None = Field(default=None, description="Round of its last scoring.")
    suspect: bool = Field(
        default=False, description="Suspected label error: scored often, its loss stays far "
                                   "above the run's median (see /suspects). Plans give it "
                                   "weight 0.")


class SampleList(BaseModel):
    run: str
    order: Literal["hardest", "easiest"]
    by: HardnessField
    samples: list[Sample]


class SuspectList(BaseModel):
    """Suspected label errors, hardest first."""

    run: str
    total: int = Field(description="Suspects in the run (the list holds at most `limit`).")
    threshold: float | None = Field(
        default=None, description="Level above which the hardness and last loss of a sample "
                                  "scored at least min_scorings times (or last scored in round "
                                  "min_scorings or later) make it suspect; null when the guard "
                                  "is off.")
    min_scorings: int | None = None
    samples: list[Sample]


class LookupRequest(BaseModel):
    model_config = STRICT

    ids: list[JsonInt] = Field(description="Sample ids, each in [0, N).", min_length=1)


class LookupResponse(BaseModel):
    """Records of many samples, column by column, in the order asked."""

    run: str
    ids: list[int]
    seen: list[int]
    kept: list[int]
    last_loss: list[float | None]
    ema: list[float | None]
    last_step: list[int | None]


class Histogram(BaseModel):
    run: str
    field: HardnessField
    edges: list[float] = Field(description="bins + 1 bin edges over the seen samples' values.")
    counts: list[int]
    seen: int = Field(description="Samples counted (scored at least once).")
    unseen: int = Field(description="Samples never scored (not in the counts).")


class PlanRequest(BaseModel):
    model_config = STRICT

    rank: JsonInt = Field(ge=0, description="This worker's rank, in [0, world_size).")
    world_size: JsonInt = Field(ge=1, description="Ranks sharing the round.")
    round: JsonInt = Field(ge=0, le=MAX_ROUND, description="Round number; one round per call set.")
    batches: JsonInt = Field(ge=1, description=(
        "Batches per rank of a full round (the same for every rank); a packed round "
        "(plan_config.packed with an adaptive size) answers with fewer, full ones."))
    batch_size: JsonInt = Field(ge=1, description="Sample ids per batch.")
    with_weights: bool = Field(default=False, description="Include importance weights per id.")
    with_losses: bool = Field(default=False, description="Include the last known loss per id.")
    after_losses: bool = Field(
        default=False,
        description="Compose the round (if no rank has yet) from all of the previous round's "
                    "losses, waiting up to round_wait_s for them: workers that stream their "
                    "losses set it, and the plans of one seed are then reproducible.")


class Plan(BaseModel):
    """One rank's part of a round: `ids[b]` is batch b."""

    run: str
    round: int
    rank: int
    world_size: int
    batches: int = Field(description="Batches this rank trains this round (the same on every "
                                     "rank; fewer than asked for when the round is packed).")
    batch_size: int
    uniform: bool = Field(description="Whether the round was annealed to uniform sampling.")
    ids: list[list[int]]
    weights: list[list[float]] | None = None
    losses: list[list[float | None]] | None = Field(
        default=None, description="Last known loss per id; null for ids never scored."
    )


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    redis: bool
    runs: dict[str, str] = Field(description="run -> ready | loading | error message")
    reason: str | None = Field(default=None, description="Why not ready (none when ready).")


class ErrorBody(BaseModel):
    detail: str | list[dict[str, object]]
