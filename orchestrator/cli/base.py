"""What every command shares: settings and the client made on first use, the root group's
error handling and exit statuses, the ``--json`` option, and the helpers that format
output (tables on stdout, errors on stderr).

Exit status: 0 on success, 1 on a failed run, an invalid definition or a refused
operation (:func:`fail`), 2 on wrong usage (Click's own usage errors included).
"""

from __future__ import annotations

import json
import re
import sys
from datetime import datetime
from typing import TYPE_CHECKING, Any, NoReturn, overload

import click
import kombu.exceptions
import redis
from pydantic import ValidationError
from rich.console import Console
from rich.text import Text

from ..errors import DefinitionError, OrchestratorError
from ..settings import Settings
from ..status import ENDED

if TYPE_CHECKING:  # the client pulls in Celery; commands import it when they need it
    from ..client import Client

STATUS_STYLES = {
    "succeeded": "green",
    "failed": "red",
    "running": "blue",
    "pending": "",
    "skipped": "bright_black",
    "cancelled": "bright_black",
    "waiting": "yellow",
    "retrying": "yellow",
    "compensated": "yellow",
}
RUN_STATUSES = ("pending", "running", "waiting", *ENDED)

POLL_S = 0.2

# -- shared plumbing ----------------------------------------------------------------------


class Env:
    """Settings and the client, made on first use so commands that need no Redis open none."""

    def __init__(self) -> None:
        self._settings: Settings | None = None
        self._client: Client | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            try:
                self._settings = Settings()
            except ValidationError as exc:
                raise click.UsageError(f"invalid ORCHESTRATOR_* setting: {exc}") from exc
        return self._settings

    @property
    def client(self) -> Client:
        if self._client is None:
            from ..client import Client  # Celery: only commands that talk to Redis pay for it

            self._client = Client(self.settings)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def redact(url: str) -> str:
    return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", url)


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class Cli(click.Group):
    """The root group: turns the package's errors into messages on stderr and exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DefinitionError as exc:
            for problem in exc.problems:
                click.echo(str(problem), err=True)
            sys.exit(1)
        except OrchestratorError as exc:
            fail(str(exc))
        except redis.RedisError as exc:
            env = ctx.find_object(Env)
            url = redact(env.settings.redis_url) if env and env._settings else "Redis"
            fail(f"cannot reach Redis at {url}: {exc} (set ORCHESTRATOR_REDIS_URL)")
        except kombu.exceptions.OperationalError as exc:
            env = ctx.find_object(Env)
            url = redact(env.settings.broker_url) if env and env._settings else "the broker"
            fail(f"cannot reach the broker at {url}: {exc} (set ORCHESTRATOR_BROKER_URL)")


def out_console() -> Console:
    """Rich output on stdout; piped output is not wrapped at 80 columns."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=160)
    return console


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def cell(value: Any, style: str = "") -> Text:
    """A table cell holding user data verbatim (never read as Rich markup)."""
    if value is None:
        return Text("-", style="bright_black")
    return Text(value if isinstance(value, str) else str(value), style=style)


def status_cell(status: str | None) -> Text:
    return cell(status, STATUS_STYLES.get(status or "", ""))


def fmt_when(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


@overload
def fmt_clock(ts: float) -> str: ...
@overload
def fmt_clock(ts: float | None) -> str | None: ...
def fmt_clock(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts).strftime("%H:%M:%S.%f")[:-3]


def fmt_duration(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m {secs:02d}s"


def error_text(error: Any) -> str | None:
    if not error:
        return None
    if isinstance(error, dict):
        text = f"{error.get('type') or 'Error'}: {error.get('message')}"
        return f"{text} (step {error['step']})" if error.get("step") else text
    return str(error)


json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")


def event_line(event: dict[str, Any]) -> str:
    details = []
    for k, v in event.items():
        if k in ("id", "ts", "type", "step"):
            continue
        if k == "error" and isinstance(v, dict):  # the step is in its own column
            v = f"{v.get('type') or 'Error'}: {v.get('message')}"
        elif not isinstance(v, str):
            v = json.dumps(v, ensure_ascii=False)
        details.append(f"{k}={v}")
    ts = event.get("ts")
    when = fmt_clock(float(ts)) if ts is not None else "-"
    return "  ".join([when, f"{event.get('type', '?'):<16}", event.get("step") or "-", *details])
