"""The rules a flow must follow that its schema cannot say, found by walking the definition.

Step ids are unique; every ``${...}`` parses and reads only what exists where it is written,
and a step reads only steps that finish before it starts (which is also how a cycle shows);
steps nest at most ``MAX_STEP_NESTING`` levels; a static forEach list fits the item limit;
time limits stay under the broker's visibility timeout; and flows do not start each other
as subflows in a circle. Each problem is a (field path, message) pair, which
:mod:`.loader` turns into a :class:`~orchestrator.errors.Problem` with file and line.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from . import expressions
from .errors import ExpressionError
from .model import (
    AnyStep,
    ApprovalStep,
    EventSubscriptionResource,
    FlowResource,
    ForEachStep,
    HttpStep,
    ParallelStep,
    SequenceStep,
    ServiceResource,
    ServiceStep,
    SleepStep,
    SubflowStep,
    SwitchStep,
    TaskStep,
    TryStep,
    WaitStep,
    child_blocks,
)
from .policy import hard_time_limit
from .settings import Settings, get_settings
from .yamlsource import format_path

#: Deepest nesting of steps in steps (a top-level step is level 1; a sequence, parallel
#: branch, forEach body, switch case, try/catch/finally block or compensation is one more).
MAX_STEP_NESTING = 32


#: Where a problem is: the keys and indexes down to it, ``("spec", "steps", 0, "with")``.
Path = tuple[Any, ...]


def check_flow(flow: FlowResource, settings: Settings | None = None) -> list[tuple[Path, str]]:
    """Rules beyond the schema, as (field path, message) pairs."""
    checker = _FlowChecker(flow, settings)
    checker.run()
    return checker.problems


def check_subscription(sub: EventSubscriptionResource) -> list[tuple[Path, str]]:
    """An EventSubscription's filter and inputs read only ``event``."""
    spec = sub.spec
    found = _check_only_roots(spec.inputs, ("spec", "inputs"), {"event"})
    if spec.filter is not None:
        path: Path = ("spec", "filter")
        try:
            roots = expressions.parse_condition(spec.filter).names()
        except ExpressionError as exc:
            return [*found, (path, str(exc))]
        found += _roots_problem(roots, path, {"event"})
    return found


def check_service(service: ServiceResource) -> list[tuple[Path, str]]:
    """A Service's headers and address read only ``vars``."""
    found = _check_only_roots(service.spec.headers, ("spec", "headers"), {"vars"})
    return found + _check_only_roots(service.spec.address, ("spec", "address"), {"vars"})


def _check_only_roots(value: Any, path: Path, allowed: set[str]) -> list[tuple[Path, str]]:
    try:
        expressions.check(value)
    except ExpressionError as exc:
        return [(path, str(exc))]
    return _roots_problem(expressions.root_names(value), path, allowed)


def _roots_problem(roots: set[str], path: Path, allowed: set[str]) -> list[tuple[Path, str]]:
    extra = sorted(roots - allowed)
    if not extra:
        return []
    return [(path, f"expressions here can read only {', '.join(sorted(allowed))}; not {extra[0]}")]


class _FlowChecker:
    def __init__(self, flow: FlowResource, settings: Settings | None):
        self.flow = flow
        self.settings = settings
        self.problems: list[tuple[Path, str]] = []
        self.paths: dict[str, Path] = {}
        self.steps: dict[str, AnyStep] = {}
        self.depth: dict[str, int] = {}  # enclosing forEach count

    def run(self) -> None:
        spec = self.flow.spec
        base: Path = ("spec",)
        if self._too_deep():  # the checks below recurse once per level
            return
        self._index(spec.steps, (*base, "steps"), 0)
        if spec.on_failure:
            self._index(spec.on_failure, (*base, "onFailure"), 0)
        if not self.problems:  # references are only meaningful once ids are unique
            done = self._block(spec.steps, (*base, "steps"), set())
            everything = {s for s, d in self.depth.items() if d == 0}
            if spec.on_failure:
                self._block(spec.on_failure, (*base, "onFailure"), everything)
            self._refs(spec.outputs, (*base, "outputs"), everything | done, None)
        for name, field in spec.inputs.items():
            if field.required and "default" in field.model_fields_set:
                self.problems.append(
                    ((*base, "inputs", name), "an input cannot be both required and have a default")
                )
        self._limits()

    def _too_deep(self) -> bool:
        """Whether steps nest deeper than MAX_STEP_NESTING (checked without recursion)."""
        spec = self.flow.spec
        stack: list[tuple[AnyStep, Path, int]] = []
        for key, steps in (("steps", spec.steps), ("onFailure", spec.on_failure or [])):
            stack += [(s, ("spec", key, i), 1) for i, s in enumerate(steps)]
        while stack:
            step, path, level = stack.pop()
            if level > MAX_STEP_NESTING:
                self.problems.append(
                    (
                        path,
                        f"steps are nested more than {MAX_STEP_NESTING} levels deep "
                        "(a step inside a step is one level more); refusing the flow",
                    )
                )
                return True
            stack += [(s, p, level + 1) for s, p in _children(step, path)]
        return False

    def _index(self, steps: list[AnyStep], path: Path, depth: int) -> None:
        for i, step in enumerate(steps):
            p = (*path, i)
            if step.id in self.paths:
                self.problems.append(
                    (
                        (*p, "id"),
                        f"duplicate step id {step.id!r} (first at "
                        f"{format_path(self.paths[step.id])})",
                    )
                )
            else:
                self.paths[step.id] = p
                self.steps[step.id] = step
                self.depth[step.id] = depth
            for sub, subpath, d in _nested(step, p, depth):
                self._index(sub, subpath, d)

    def _block(self, steps: list[AnyStep], path: Path, before: set[str]) -> set[str]:
        """Check a sequence; ``before`` are the steps that end before it starts."""
        visible = set(before)
        for i, step in enumerate(steps):
            p = (*path, i)
            self._step(step, p, visible)
            visible |= {step.id} | self._inside(step)
        return visible - before

    def _step(self, step: AnyStep, path: Path, before: set[str]) -> None:
        sid = step.id
        if step.when is not None:
            self._condition(step.when, (*path, "when"), before, sid)
        if isinstance(step, TaskStep | SubflowStep | ServiceStep):
            self._refs(step.with_, (*path, "with"), before, sid)
        elif isinstance(step, HttpStep):
            self._refs(step.http.model_dump(by_alias=True), (*path, "http"), before, sid)
        elif isinstance(step, SequenceStep):
            self._block(step.steps, (*path, "steps"), before)
        elif isinstance(step, ParallelStep):
            ids = [b.id for b in step.parallel]
            for i, branch in enumerate(step.parallel):
                self._step(branch, (*path, "parallel", i), before)
            if len(set(ids)) != len(ids):
                self.problems.append(((*path, "parallel"), "branch ids must differ"))
        elif isinstance(step, ForEachStep):
            self._refs(step.for_each, (*path, "forEach"), before, sid)
            self._foreach_literal(step, (*path, "forEach"))
            body = step.do if isinstance(step.do, list) else [step.do]
            self._block(body, (*path, "do"), before)
        elif isinstance(step, SwitchStep):
            self._switch(step, path, before)
        elif isinstance(step, TryStep):
            tried = self._block(step.try_, (*path, "try"), before)
            caught: set[str] = set()
            if step.catch:
                caught = self._block(step.catch, (*path, "catch"), before | tried)
            if step.finally_:
                self._block(step.finally_, (*path, "finally"), before | tried | caught)
            if not step.catch and not step.finally_:
                self.problems.append((path, "a try step needs `catch`, `finally` or both"))
        elif isinstance(step, ApprovalStep):
            a = step.approval
            self._refs(a.model_dump(by_alias=True), (*path, "approval"), before, sid)
            if a.on_timeout == "escalate" and not (a.escalate_to and a.timeout):
                self.problems.append(
                    (
                        (*path, "approval", "escalateTo"),
                        "onTimeout: escalate needs escalateTo and a timeout",
                    )
                )
        elif isinstance(step, SleepStep):
            if (step.sleep is None) == (step.until is None):
                self.problems.append(
                    (path, "a sleep step has either `sleep: <duration>` or `until: <time>`")
                )
            if step.until is not None:
                self._refs(step.until, (*path, "until"), before, sid)
        elif isinstance(step, WaitStep):
            self._wait(step, path, before)
        if step.compensate is not None:
            self._step(step.compensate, (*path, "compensate"), before | {sid} | self._inside(step))

    def _switch(self, step: SwitchStep, path: Path, before: set[str]) -> None:
        defaults = [i for i, c in enumerate(step.switch) if c.default is not None]
        for i, case in enumerate(step.switch):
            cp = (*path, "switch", i)
            if (case.default is None) == (case.steps is None):
                self.problems.append((cp, "a case has either `when` with `steps`, or `default`"))
                continue
            if case.default is not None and case.when is not None:
                self.problems.append(((*cp, "when"), "the default case has no `when`"))
            if case.steps is not None and case.when is None:
                self.problems.append(((*cp, "when"), "a case needs `when` (or use `default`)"))
            if case.when is not None:
                self._condition(case.when, (*cp, "when"), before, step.id)
            key = "default" if case.default is not None else "steps"
            self._block(case.default or case.steps or [], (*cp, key), before)
        if len(defaults) > 1 or (defaults and defaults[0] != len(step.switch) - 1):
            self.problems.append(((*path, "switch"), "at most one default case, and last"))

    def _wait(self, step: WaitStep, path: Path, before: set[str]) -> None:
        w = step.wait
        if (w.signal is None) == (w.flow is None and w.run is None):
            self.problems.append(
                (
                    (*path, "wait"),
                    "wait for either `signal: NAME` or "
                    "`flow: NAME` with `run: <run id expression>`",
                )
            )
        elif w.signal is None and not (w.flow and w.run):
            self.problems.append(((*path, "wait"), "waiting on a run needs both `flow` and `run`"))
        if w.run is not None:
            self._refs(w.run, (*path, "wait", "run"), before, step.id)

    def _foreach_literal(self, step: ForEachStep, path: Path) -> None:
        """A forEach over a static list longer than max_foreach_items would fail every run."""
        try:
            template = expressions.parse_condition(step.for_each)
            if template.names():  # reads inputs, steps, ...: known only at run time
                return
            items = template.evaluate({})
        except ExpressionError:  # reported by _refs, or by the run as it would be now
            return
        settings = self.settings if self.settings is not None else get_settings()
        limit = settings.max_foreach_items
        if isinstance(items, list) and len(items) > limit:
            self.problems.append(
                (
                    path,
                    f"step {step.id!r}: forEach over {len(items):,} items, over the limit of "
                    f"{limit:,} (ORCHESTRATOR_MAX_FOREACH_ITEMS)",
                )
            )

    def _inside(self, step: AnyStep) -> set[str]:
        """Steps nested in ``step`` at its own forEach depth (readable after it ends)."""
        out: set[str] = set()
        depth = self.depth.get(step.id, 0)
        for sub, _p, d in _nested(step, (), depth):
            if d != depth:
                continue
            for s in sub:
                out.add(s.id)
                out |= self._inside(s)
        return out

    def _condition(self, when: str | bool, path: Path, before: set[str], reader: str) -> None:
        try:
            parsed = expressions.parse_condition(when)
        except ExpressionError as exc:
            self.problems.append((path, str(exc)))
            return
        self._no_event(parsed.names(), path)
        self._check_refs(parsed.step_refs(), path, before, reader)

    def _refs(self, value: Any, path: Path, before: set[str], reader: str | None) -> None:
        try:
            expressions.check(value)
        except ExpressionError as exc:
            self.problems.append((path, str(exc)))
            return
        self._no_event(expressions.root_names(value), path)
        self._check_refs(expressions.step_refs(value), path, before, reader)

    def _no_event(self, roots: set[str], path: Path) -> None:
        if "event" in roots:
            self.problems.append(
                (path, "`event` is only defined in an EventSubscription's filter and inputs")
            )

    def _check_refs(self, refs: set[str], path: Path, before: set[str], reader: str | None) -> None:
        who = f"step {reader!r}" if reader else "the flow's outputs"
        for ref in sorted(refs):
            if ref not in self.paths:
                known = ", ".join(sorted(self.paths)) or "none"
                self.problems.append(
                    (path, f"{who} refers to unknown step {ref!r} (steps: {known})")
                )
            elif ref == reader:
                self.problems.append((path, f"{who} refers to its own result (a cycle)"))
            elif ref not in before:
                why = (
                    "it runs inside a forEach body: read the forEach step's output instead"
                    if self.depth.get(ref, 0) > (self.depth.get(reader, 0) if reader else 0)
                    else "it does not finish before this step starts (a cycle, a later "
                    "step, or a parallel branch)"
                )
                self.problems.append((path, f"{who} refers to step {ref!r}, but {why}"))

    def _limits(self) -> None:
        """Time limits must stay under the broker's visibility timeout (see README)."""
        if self.settings is None:
            return
        vt = self.settings.visibility_timeout_s
        defaults = self.flow.spec.defaults
        for sid, path in self.paths.items():
            timeout = self.steps[sid].timeout
            if timeout is None and defaults is not None:
                timeout = defaults.timeout
            if timeout is not None and hard_time_limit(timeout) >= vt:
                self.problems.append(
                    (
                        (*path, "timeout"),
                        f"step {sid!r}: timeout {timeout:g}s reaches the broker's "
                        f"visibility timeout ({vt}s); a step still running then "
                        "would be delivered again. Raise "
                        "ORCHESTRATOR_VISIBILITY_TIMEOUT_S or shorten it",
                    )
                )


def _nested(step: AnyStep, path: Path, depth: int):
    """(steps, path, forEach depth) for each step list directly inside ``step``."""
    cases = iter(enumerate(step.switch)) if isinstance(step, SwitchStep) else None
    for key, steps in child_blocks(step):
        if key == "switch" and cases is not None:
            i, case = next(cases)
            yield (
                steps,
                (*path, "switch", i, "default" if case.default is not None else "steps"),
                depth,
            )
        else:
            yield steps, (*path, key), depth + 1 if key == "do" else depth


# -- subflow cycles ----------------------------------------------------------------------


def subflow_calls(flow: FlowResource) -> dict[str, Path]:
    """The flows ``flow`` starts as subflows, each with the path of the first step that does.

    Subflow names are literal (``flow: NAME``), so this is the flow's static call graph.
    """
    calls: dict[str, Path] = {}
    spec = flow.spec
    stack: list[tuple[AnyStep, Path]] = []
    for key, steps in (("onFailure", spec.on_failure or []), ("steps", spec.steps)):
        stack += [(s, ("spec", key, i)) for i, s in reversed(list(enumerate(steps)))]
    while stack:  # iterative, depth first, in document order
        step, path = stack.pop()
        if isinstance(step, SubflowStep):
            calls.setdefault(step.flow, (*path, "flow"))
        stack += reversed(list(_children(step, path)))
    return calls


def _children(step: AnyStep, path: Path) -> Iterator[tuple[AnyStep, Path]]:
    """The steps directly inside ``step``, each with its path in the document.

    Unlike :func:`_nested`, a single step (``compensate``, a ``do`` that is not a list)
    gets the path it is written at, so its line can be found.
    """
    for sub, subpath, _depth in _nested(step, path, 0):
        single = subpath[-1] == "compensate" or (
            subpath[-1] == "do" and not isinstance(getattr(step, "do", None), list)
        )
        if single:
            yield sub[0], subpath
        else:
            yield from ((s, (*subpath, i)) for i, s in enumerate(sub))


def find_subflow_cycle(
    calls: Mapping[str, Iterable[str]], through: Iterable[str] | None = None
) -> list[str] | None:
    """A shortest cycle of flows that start each other as subflows, as ``[a, b, a]``.

    ``calls`` maps a flow's name to the names of the flows it starts (a name missing from
    it starts none). Only cycles through a flow of ``through`` (default: every flow in
    ``calls``) count, so cycles that were deployed before do not block an unrelated deploy.
    None when there is none. Iterative and linear in the size of ``calls``: the flows on
    some cycle are found first, then one breadth-first walk from the first of ``through``
    among them.
    """
    cyclic = _on_cycles(calls)
    for start in sorted(calls if through is None else set(through)):
        if start not in cyclic:
            continue
        parent: dict[str, str] = {}
        frontier = sorted(set(calls.get(start, ())))
        for name in frontier:
            parent.setdefault(name, start)
        while frontier:
            if start in parent:
                break
            following: list[str] = []
            for name in frontier:
                for nxt in sorted(set(calls.get(name, ()))):
                    if nxt not in parent:
                        parent[nxt] = name
                        following.append(nxt)
            frontier = following
        if start in parent:
            cycle = [start]
            node = parent[start]
            while node != start:
                cycle.append(node)
                node = parent[node]
            cycle.append(start)
            return [cycle[0], *reversed(cycle[1:-1]), start]
    return None


def _on_cycles(calls: Mapping[str, Iterable[str]]) -> set[str]:
    """The flows that lie on some cycle (Tarjan's strongly connected components, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: set[str] = set()

    def enter(node: str) -> tuple[str, Iterator[str]]:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        return node, iter(sorted(set(calls.get(node, ()))))

    for root in sorted(calls):
        if root in index:
            continue
        work = [enter(root)]
        while work:
            node, following = work[-1]
            for nxt in following:
                if nxt not in index:
                    work.append(enter(nxt))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:  # every call of ``node`` is walked
                work.pop()
                if work:
                    caller = work[-1][0]
                    low[caller] = min(low[caller], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in set(calls.get(node, ())):
                        out.update(component)
    return out


def subflow_cycle_message(cycle: list[str]) -> str:
    return (
        f"subflow cycle: {' → '.join(cycle)} (a flow may not start itself, directly or "
        "through other flows)"
    )
