"""The flow model: plain pydantic data shared by YAML, the DSL, the compiler, CLI and API.

It knows nothing of Celery or Redis. Field names are snake_case in Python and
camelCase in documents (``maxAttempts``, ``onError``); both are accepted on input and
documents are always written back with the camelCase aliases, so a model
serialises to the same YAML a user would write.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    Tag,
    WithJsonSchema,
    field_validator,
)

API_VERSION: Final = "orchestrator/v1"
NAME_RE = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
STEP_ID_RE = r"^[A-Za-z_][A-Za-z0-9_-]{0,99}$"

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


#: The longest duration a definition may give (100 years): a sleep or timeout that
#: long is a mistake, and one much longer would overflow a date (year 9999) or an int.
MAX_DURATION_S = 36_500 * 86_400.0


def parse_duration(value: Any) -> float:
    """Seconds from ``250ms``, ``1.5s``, ``10m``, ``48h``, ``2d`` or a bare number.

    NaN, infinities, negative values and anything over :data:`MAX_DURATION_S` are
    refused (a ``ValueError``, which pydantic reports at the field).
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s, 250ms, 10m, 48h or a number of seconds")
    try:
        if isinstance(value, int | float):
            seconds = float(value)
        elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
            seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        else:
            raise ValueError(
                "expected a duration like 30s, 250ms, 10m, 48h or a number of seconds; "
                f"got {value!r}"
            )
    except OverflowError:  # an int with hundreds of digits
        seconds = math.inf
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"a duration must be a finite number of seconds; got {value!r}")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    if seconds > MAX_DURATION_S:
        raise ValueError(
            f"a duration can be at most {format_duration(MAX_DURATION_S)} (100 years); "
            f"got {_shown(value)}"
        )
    return seconds


def _shown(value: Any) -> str:
    if isinstance(value, int) and value.bit_length() > 128:
        return "a number of over 38 digits"  # repr() of a huge int may even raise
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def format_duration(seconds: float) -> str | float:
    """The shortest exact unit form of a duration, for writing definitions back."""
    for unit in ("d", "h", "m", "s"):
        n = seconds / _UNIT_SECONDS[unit]
        if n >= 1 and n == int(n):
            return f"{int(n)}{unit}"
    ms = seconds * 1000
    if ms == int(ms):
        return f"{int(ms)}ms"
    return seconds


DURATION_PATTERN = r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d)?\s*$"
Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str | float),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0, "maximum": MAX_DURATION_S},
                {"type": "string", "pattern": DURATION_PATTERN},
            ],
            "description": "a duration: 250ms, 1.5s, 10m, 48h, 2d, or a number of seconds "
            "(at most 36500d)",
        }
    ),
]
StepId = Annotated[str, Field(pattern=STEP_ID_RE)]
Expression = str | bool


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", populate_by_name=True, serialize_by_alias=True, frozen=False
    )


class RetryPolicy(_Model):
    """How a failed step is tried again; ``maxAttempts`` counts the first try."""

    max_attempts: int | None = Field(None, alias="maxAttempts", ge=1, le=1000)
    backoff: Literal["fixed", "linear", "exponential"] | None = None
    initial_delay: Duration | None = Field(None, alias="initialDelay")
    max_delay: Duration | None = Field(None, alias="maxDelay")
    jitter: bool | None = None


RATE_RE = r"^\d+(\.\d+)?/(s|m|h)$"


class StepOptions(_Model):
    """Options every step may set, and that ``defaults`` sets for all of them."""

    queue: str | None = None
    priority: int | None = Field(None, ge=0, le=9)
    retry: RetryPolicy | None = None
    timeout: Duration | None = None
    rate_limit: str | None = Field(None, alias="rateLimit", pattern=RATE_RE)

    @field_validator("timeout")
    @classmethod
    def _positive_timeout(cls, value: float | None) -> float | None:
        # Celery reads a soft limit of 0 as "none", and the hard limit would be 1 s.
        if value is not None and value <= 0:
            raise ValueError("a step timeout must be more than 0 (leave it out for the default)")
        return value


class StepDefaults(StepOptions):
    on_error: Literal["fail", "continue"] | None = Field(None, alias="onError")


class StepBase(StepOptions):
    id: StepId
    description: str | None = None
    when: Expression | None = None
    on_error: Literal["fail", "continue"] | None = Field(None, alias="onError")
    compensate: Step | None = None


class TaskStep(StepBase):
    """Call a registered Celery task by name with keyword arguments."""

    task: str = Field(pattern=r"^[A-Za-z_][\w.:-]*$")
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")


class SequenceStep(StepBase):
    """A nested sequence; its output is the output of its last step."""

    steps: list[Step] = Field(min_length=1)


class ParallelStep(StepBase):
    """Branches that run at once; the output maps each branch id to its output."""

    parallel: list[Step] = Field(min_length=1)


class ForEachStep(StepBase):
    """Run ``do`` for each item of a list known at run time; output is the results in order."""

    for_each: str = Field(alias="forEach")
    do: Step | list[Step]
    concurrency: int | None = Field(None, ge=1)


class SwitchCase(_Model):
    when: Expression | None = None
    default: list[Step] | None = None
    steps: list[Step] | None = None


class SwitchStep(StepBase):
    """The first case whose ``when`` holds runs; ``default`` runs when none does."""

    switch: list[SwitchCase] = Field(min_length=1)


class TryStep(StepBase):
    """An error boundary: ``catch`` runs when a step of ``try`` fails, ``finally`` always."""

    try_: list[Step] = Field(alias="try", min_length=1)
    catch: list[Step] | None = None
    finally_: list[Step] | None = Field(None, alias="finally")


class ServiceStep(StepBase):
    """Call a deployed ``Service`` over HTTP; ``with`` is checked against its inputs."""

    service: str = Field(pattern=NAME_RE, max_length=63)
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")


HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")


class HttpSpec(_Model):
    """One HTTP request; every string may hold expressions."""

    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"] = "GET"
    url: str = Field(min_length=1)
    headers: dict[str, str] = Field(default_factory=dict)
    query: dict[str, Any] | None = None
    json_: Any = Field(None, alias="json")
    body: str | None = None
    expect: int | list[int] | None = Field(
        None, description="accepted status codes (default: any 2xx)"
    )

    @field_validator("method", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("expect")
    @classmethod
    def _statuses(cls, value: int | list[int] | None) -> int | list[int] | None:
        for code in [value] if isinstance(value, int) else value or []:
            if not 100 <= code <= 599:
                raise ValueError(f"expected HTTP status codes (100-599); got {code}")
        return value


class HttpStep(StepBase):
    """One HTTP request; non-2xx is an error (retryable for 5xx, 429 and timeouts)."""

    http: HttpSpec


class SubflowStep(StepBase):
    """Run another flow as a child run and wait for it; the output is the child's outputs."""

    flow: str = Field(pattern=NAME_RE, max_length=63)
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")


class ApprovalSpec(_Model):
    """Who may decide, for how long, and what happens when nobody does."""

    approvers: list[str] = Field(default_factory=list)
    message: str | None = None
    timeout: Duration | None = None
    on_timeout: Literal["reject", "approve", "escalate"] = Field("reject", alias="onTimeout")
    escalate_to: list[str] | None = Field(None, alias="escalateTo")


class ApprovalStep(StepBase):
    """Wait for a human decision; the output is ``{decision, by, comment, at}``."""

    approval: ApprovalSpec


class SleepStep(StepBase):
    """A durable wait: ``sleep`` a duration, or ``until`` a time (ISO 8601 or epoch seconds)."""

    sleep: Duration | None = None
    until: str | None = None


class WaitSpec(_Model):
    signal: str | None = Field(None, pattern=r"^[A-Za-z0-9_.:-]{1,100}$")
    flow: str | None = Field(None, pattern=NAME_RE)
    run: str | None = None
    status: Literal["succeeded", "failed", "compensated", "cancelled"] = "succeeded"
    timeout: Duration | None = None


class WaitStep(StepBase):
    """Wait for a named signal (output: its payload) or for another run to reach a status."""

    wait: WaitSpec


#: The key whose presence says what kind a step is, in the order they are tried.
STEP_KINDS: dict[str, str] = {
    "task": "task",
    "service": "service",
    "http": "http",
    "flow": "subflow",
    "approval": "approval",
    "sleep": "sleep",
    "until": "sleep",
    "wait": "wait",
    "parallel": "parallel",
    "forEach": "forEach",
    "switch": "switch",
    "try": "try",
    "steps": "sequence",
}


def step_kind(value: Any) -> str | None:
    """The tag of a step given as a dict or a model; None when it has no (or two) kinds."""
    if isinstance(value, BaseModel):
        return _KIND_OF_CLASS.get(type(value))
    if not isinstance(value, dict):
        return None
    found = [tag for key, tag in STEP_KINDS.items() if key in value]
    return found[0] if len(found) == 1 else None


Step = Annotated[
    Annotated[TaskStep, Tag("task")]
    | Annotated[ServiceStep, Tag("service")]
    | Annotated[HttpStep, Tag("http")]
    | Annotated[SequenceStep, Tag("sequence")]
    | Annotated[ParallelStep, Tag("parallel")]
    | Annotated[ForEachStep, Tag("forEach")]
    | Annotated[SwitchStep, Tag("switch")]
    | Annotated[TryStep, Tag("try")]
    | Annotated[SubflowStep, Tag("subflow")]
    | Annotated[ApprovalStep, Tag("approval")]
    | Annotated[SleepStep, Tag("sleep")]
    | Annotated[WaitStep, Tag("wait")],
    Discriminator(
        step_kind,
        custom_error_type="step_kind",
        custom_error_message=(
            "a step needs exactly one of the kind fields: " + ", ".join(STEP_KINDS)
        ),
    ),
]
AnyStep = (
    TaskStep
    | ServiceStep
    | HttpStep
    | SequenceStep
    | ParallelStep
    | ForEachStep
    | SwitchStep
    | TryStep
    | SubflowStep
    | ApprovalStep
    | SleepStep
    | WaitStep
)

_KIND_OF_CLASS: dict[type[BaseModel], str] = {
    TaskStep: "task",
    ServiceStep: "service",
    HttpStep: "http",
    SequenceStep: "sequence",
    ParallelStep: "parallel",
    ForEachStep: "forEach",
    SwitchStep: "switch",
    TryStep: "try",
    SubflowStep: "subflow",
    ApprovalStep: "approval",
    SleepStep: "sleep",
    WaitStep: "wait",
}


def child_blocks(step: AnyStep) -> list[tuple[str, list[AnyStep]]]:
    """The step lists directly inside ``step``, each as (the key it is written under, steps).

    In document order: ``steps`` (sequence), ``parallel`` (all branches as one list),
    ``do`` (forEach; a single step becomes a list of one), one ``switch`` entry per case
    in case order (its ``default`` or ``steps``), ``try`` / ``catch`` / ``finally`` (only
    the non-empty ones), then ``compensate`` (a list of one) for any kind. Not recursive:
    the compiler, the loader's checks and the graph walk the tree with it each their way.
    """
    blocks: list[tuple[str, list[AnyStep]]] = []
    if isinstance(step, SequenceStep):
        blocks.append(("steps", step.steps))
    elif isinstance(step, ParallelStep):
        blocks.append(("parallel", step.parallel))
    elif isinstance(step, ForEachStep):
        blocks.append(("do", step.do if isinstance(step.do, list) else [step.do]))
    elif isinstance(step, SwitchStep):
        blocks += [("switch", case.default or case.steps or []) for case in step.switch]
    elif isinstance(step, TryStep):
        for key, lst in (("try", step.try_), ("catch", step.catch), ("finally", step.finally_)):
            if lst:
                blocks.append((key, lst))
    if step.compensate is not None:
        blocks.append(("compensate", [step.compensate]))
    return blocks


class InputField(_Model):
    """One trigger input, JSON-Schema-like."""

    type: Literal["string", "integer", "number", "boolean", "object", "array"] = "string"
    format: Literal["date", "date-time", "email", "uri"] | None = None
    required: bool = False
    default: Any = None
    enum: list[Any] | None = None
    minimum: float | None = None
    maximum: float | None = None
    description: str | None = None


class Metadata(_Model):
    name: str = Field(pattern=NAME_RE, max_length=63)
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class WebhookSpec(_Model):
    """``POST /v1/hooks/{flow}`` starts runs when signed with the named secret Variable."""

    secret: str = Field(pattern=NAME_RE, max_length=63, description="a secret Variable's name")


class FlowSpec(_Model):
    description: str | None = None
    initial_state: Literal["started", "stopped"] = Field("started", alias="initialState")
    inputs: dict[str, InputField] = Field(default_factory=dict)
    defaults: StepDefaults | None = None
    steps: list[Step] = Field(min_length=1)
    outputs: dict[str, Any] = Field(default_factory=dict)
    on_failure: list[Step] | None = Field(None, alias="onFailure")
    webhook: WebhookSpec | None = None

    @field_validator("inputs")
    @classmethod
    def _input_names(cls, value: dict[str, InputField]) -> dict[str, InputField]:
        for name in value:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
                raise ValueError(f"input name {name!r} must be an identifier")
        return value


class _Resource(_Model):
    """The envelope every document shares: apiVersion, kind, metadata, spec."""

    api_version: Literal["orchestrator/v1"] = Field(API_VERSION, alias="apiVersion")
    metadata: Metadata
    if TYPE_CHECKING:  # each kind's own Literal field; not a field of the envelope
        kind: str

    @property
    def name(self) -> str:
        return self.metadata.name

    def document(self) -> dict[str, Any]:
        """The definition as a plain JSON-able dict, defaults left out."""
        body = self.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_unset=True)
        return {"apiVersion": self.api_version, "kind": self.kind, **body}


class FlowResource(_Resource):
    """A ``kind: Flow`` document."""

    kind: Literal["Flow"] = "Flow"
    spec: FlowSpec


for _cls in (
    StepBase,
    TaskStep,
    ServiceStep,
    HttpStep,
    SequenceStep,
    ParallelStep,
    ForEachStep,
    SwitchStep,
    TryStep,
    SubflowStep,
    ApprovalStep,
    SleepStep,
    WaitStep,
    SwitchCase,
    FlowSpec,
    FlowResource,
):
    _cls.model_rebuild()


class ScheduleSpec(_Model):
    """When Celery beat starts runs of a flow."""

    flow: str = Field(pattern=NAME_RE, max_length=63)
    cron: str
    timezone: str = "UTC"
    inputs: dict[str, Any] = Field(default_factory=dict)
    catchup: Literal["skip", "once"] = "skip"

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        if len(value.split()) != 5 or not croniter.is_valid(value):
            raise ValueError(
                f"expected a five-field cron expression like '0 2 * * *'; got {value!r}"
            )
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"expected an IANA time zone like 'Europe/Paris'; got {value!r}"
            ) from None
        return value


class ScheduleResource(_Resource):
    """A ``kind: Schedule`` document."""

    kind: Literal["Schedule"] = "Schedule"
    spec: ScheduleSpec


# -- variables, services, event subscriptions -----------------------------------------

#: ``${env.NAME}`` in a Variable's value: read from the worker's environment at use.
ENV_REF = re.compile(r"\$\{\s*env\.([A-Za-z_][A-Za-z0-9_]*)\s*\}")


class VariableSpec(_Model):
    """A named value flows read as ``${vars.NAME}``; a secret only as ``${env.NAME}``."""

    value: Any
    secret: bool = False
    description: str | None = None

    @field_validator("secret")
    @classmethod
    def _secret_from_env(cls, secret: bool, info: Any) -> bool:
        value = info.data.get("value")
        if secret and not (isinstance(value, str) and ENV_REF.search(value)):
            raise ValueError(
                "a secret's value must come from the environment, like value: ${env.API_TOKEN}, "
                "so that it is never stored in Redis"
            )
        return secret

    @field_validator("value")
    @classmethod
    def _only_env(cls, value: Any) -> Any:
        if isinstance(value, str) and "${" in ENV_REF.sub("", value):
            raise ValueError("a variable's value may only refer to the environment, as ${env.NAME}")
        return value


class VariableResource(_Resource):
    """A ``kind: Variable`` document."""

    kind: Literal["Variable"] = "Variable"
    spec: VariableSpec


class ServiceSpec(_Model):
    """An HTTP microservice steps call by name, with typed inputs and outputs."""

    description: str | None = None
    address: str = Field(
        pattern=r"^(https?://|\$\{)\S+$",
        description="the URL the call goes to; may start with ${vars.NAME}",
    )
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    headers: dict[str, str] = Field(
        default_factory=dict, description="may read ${vars.NAME} (secrets included)"
    )
    inputs: dict[str, InputField] = Field(default_factory=dict)
    outputs: dict[str, InputField] = Field(default_factory=dict)
    timeout: Duration | None = None

    @field_validator("method", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class ServiceResource(_Resource):
    """A ``kind: Service`` document."""

    kind: Literal["Service"] = "Service"
    spec: ServiceSpec


CHANNEL_RE = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$"


class EventSubscriptionSpec(_Model):
    """Start a run of ``flow`` for every event on ``channel`` that passes ``filter``."""

    channel: str = Field(pattern=CHANNEL_RE)
    flow: str = Field(pattern=NAME_RE, max_length=63)
    filter: Expression | None = None
    inputs: dict[str, Any] = Field(default_factory=dict)


class EventSubscriptionResource(_Resource):
    """A ``kind: EventSubscription`` document."""

    kind: Literal["EventSubscription"] = "EventSubscription"
    spec: EventSubscriptionSpec
