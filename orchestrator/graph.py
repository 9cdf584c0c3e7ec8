"""Drawings of a flow: Mermaid and Graphviz DOT, optionally coloured by step status.

Both formats are rendered from one small intermediate graph (nodes, clusters and
edges) built from the flow model, so they always show the same thing:

* a task is a box labelled with its step id and task name;
* a parallel step is a fan-out node, one branch per lane, and a fan-in node;
* a forEach body sits in a cluster labelled ``for each <expr>`` with its concurrency;
* a switch is a decision node whose edges carry each case's condition;
* a subflow is a box naming the flow it runs;
* a try block is a cluster; ``catch`` and ``finally`` hang off it on labelled edges;
* a compensation is reached from its step by a dashed edge; ``onFailure`` steps
  hang off a "run failed" node.

Node ids are derived from step ids but sanitised (letters, digits and ``_``, with a
prefix per role), so no step id can collide with a keyword of either language.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from .model import (
    AnyStep,
    FlowResource,
    ForEachStep,
    HttpStep,
    ParallelStep,
    SequenceStep,
    ServiceStep,
    SubflowStep,
    SwitchStep,
    TaskStep,
    TryStep,
    step_kind,
)

__all__ = ["STATUS_COLOURS", "to_dot", "to_mermaid"]

#: Step status -> (fill, stroke). Statuses not listed are drawn uncoloured.
STATUS_COLOURS: dict[str, tuple[str, str]] = {
    "succeeded": ("#c8e6c9", "#2e7d32"),
    "failed": ("#ffcdd2", "#c62828"),
    "running": ("#bbdefb", "#1565c0"),
    "skipped": ("#e0e0e0", "#757575"),
    "cancelled": ("#e0e0e0", "#757575"),
    "waiting": ("#ffe082", "#ff8f00"),
    "retrying": ("#ffe082", "#ff8f00"),
    "compensated": ("#ffe082", "#ff8f00"),
}

#: When a step inside forEach ran several times (``ID[0]``, ``ID[1]``...), the
#: drawing shows the first of these statuses that any instance has.
_AGGREGATE_ORDER = (
    "failed",
    "running",
    "retrying",
    "waiting",
    "pending",
    "compensated",
    "cancelled",
    "succeeded",
    "skipped",
)


@dataclass
class _Node:
    id: str
    lines: list[str]
    shape: str  # box, fork, join, decision, start, finish, failed
    status: str | None = None


@dataclass
class _Cluster:
    id: str
    lines: list[str]
    status: str | None = None
    items: list[_Node | _Cluster] = field(default_factory=list)


@dataclass
class _Edge:
    src: str
    dst: str
    label: str | None = None
    dashed: bool = False


# Where a drawn step can be left from: a node or cluster id, and the label its
# outgoing edge carries (a switch's "no match", say).
_Exit = tuple[str, str | None]


class _Graph:
    """The intermediate drawing of one flow."""

    def __init__(self, resource: FlowResource, statuses: dict[str, str] | None):
        self.name = resource.name
        self.statuses = statuses or {}
        self.root = _Cluster("", [])
        self.clusters: dict[str, _Cluster] = {}
        self.edges: list[_Edge] = []
        self._stack = [self.root]
        self._used: set[str] = set()
        self._build(resource)

    # -- building -----------------------------------------------------------------------

    def _build(self, resource: FlowResource) -> None:
        spec = resource.spec
        start = self._node("start", ["start"], "start")
        entries, exits = self._block(spec.steps)
        self._connect([(start, None)], entries)
        finish = self._node("finish", ["end"], "finish")
        self._connect(exits, [finish])
        if spec.on_failure:
            failed = self._node("run_failed", ["run failed"], "failed")
            with self._cluster("onFailure", ["onFailure"], None):
                entries, _ = self._block(spec.on_failure)
            self._connect([(failed, "onFailure")], entries, dashed=True)

    def _ident(self, prefix: str, raw: str) -> str:
        base = prefix + re.sub(r"[^A-Za-z0-9_]", "_", raw)
        ident, n = base, 1
        while ident in self._used:
            n += 1
            ident = f"{base}_{n}"
        self._used.add(ident)
        return ident

    def _node(self, raw: str, lines: list[str], shape: str, status: str | None = None) -> str:
        prefix = "s_" if shape in ("box", "fork", "decision", "subflow") else "x_"
        node = _Node(self._ident(prefix, raw), lines, shape, status)
        self._stack[-1].items.append(node)
        return node.id

    @contextmanager
    def _cluster(self, raw: str, lines: list[str], status: str | None) -> Iterator[str]:
        cluster = _Cluster(self._ident("c_", raw), lines, status)
        self._stack[-1].items.append(cluster)
        self.clusters[cluster.id] = cluster
        self._stack.append(cluster)
        try:
            yield cluster.id
        finally:
            self._stack.pop()

    def _connect(
        self,
        exits: list[_Exit],
        entries: list[str],
        label: str | None = None,
        dashed: bool = False,
    ) -> None:
        for src, exit_label in exits:
            for dst in entries:
                self.edges.append(_Edge(src, dst, exit_label or label, dashed))

    def _block(self, steps: list[AnyStep]) -> tuple[list[str], list[_Exit]]:
        """Draw steps in order; their first entries and last exits ([] for no steps)."""
        first: list[str] = []
        exits: list[_Exit] = []
        for i, step in enumerate(steps):
            entries, step_exits = self._step(step)
            if i == 0:
                first = entries
            else:
                self._connect(exits, entries)
            exits = step_exits
        return first, exits

    def _status(self, step_id: str) -> str | None:
        if step_id in self.statuses:
            return self.statuses[step_id]
        prefix = step_id + "["
        seen = {s for k, s in self.statuses.items() if k.startswith(prefix)}
        return next((s for s in _AGGREGATE_ORDER if s in seen), None)

    def _step(self, step: AnyStep) -> tuple[list[str], list[_Exit]]:
        status = self._status(step.id)
        notes = []
        if step.when is not None:
            notes.append(f"when {step.when}")
        if step.on_error == "continue":
            notes.append("on error: continue")
        entries: list[str]
        exits: list[_Exit]
        if isinstance(step, TaskStep | ServiceStep | HttpStep):
            what = (
                step.task
                if isinstance(step, TaskStep)
                else f"service {step.service}"
                if isinstance(step, ServiceStep)
                else f"{step.http.method} {step.http.url}"
            )
            anchor = self._node(step.id, [step.id, what, *notes], "box", status)
            entries, exits = [anchor], [(anchor, None)]
        elif isinstance(step, SequenceStep):
            with self._cluster(step.id, [f"{step.id} (sequence)", *notes], status) as anchor:
                entries, exits = self._block(step.steps)
        elif isinstance(step, ParallelStep):
            fork = self._node(step.id, [step.id, "parallel: fan-out", *notes], "fork", status)
            join = self._node(step.id, ["fan-in"], "join", status)
            for branch in step.parallel:
                b_entries, b_exits = self._step(branch)
                self._connect([(fork, None)], b_entries)
                self._connect(b_exits, [join])
            anchor, entries, exits = join, [fork], [(join, None)]
        elif isinstance(step, ForEachStep):
            concurrency = (
                f"concurrency {step.concurrency}" if step.concurrency else "concurrency: all"
            )
            lines = [step.id, f"for each {step.for_each}", concurrency, *notes]
            with self._cluster(step.id, lines, status) as anchor:
                entries, exits = self._block(step.do if isinstance(step.do, list) else [step.do])
        elif isinstance(step, SwitchStep):
            anchor = self._node(step.id, [step.id, "switch", *notes], "decision", status)
            entries, exits = [anchor], []
            for case in step.switch:
                label = "default" if case.default is not None else str(case.when)
                c_entries, c_exits = self._block(case.steps or case.default or [])
                if c_entries:
                    self._connect([(anchor, label)], c_entries)
                    exits += c_exits
                else:
                    exits.append((anchor, label))
            if not any(case.default is not None for case in step.switch):
                exits.append((anchor, "no match"))
        elif isinstance(step, TryStep):
            with self._cluster(step.id, [f"try {step.id}", *notes], status) as anchor:
                entries, exits = self._block(step.try_)
            caught: list[_Exit] = []
            if step.catch:
                c_entries, caught = self._block(step.catch)
                self._connect([(anchor, "catch")], c_entries)
            if step.finally_:
                f_entries, f_exits = self._block(step.finally_)
                self._connect(exits + caught, f_entries, label="finally")
                if not step.catch:
                    self._connect([(anchor, "finally (on error)")], f_entries)
                exits = f_exits
            else:
                exits = exits + caught
        elif isinstance(step, SubflowStep):
            anchor = self._node(
                step.id, [step.id, f"subflow {step.flow}", *notes], "subflow", status
            )
            entries, exits = [anchor], [(anchor, None)]
        else:  # a kind this module does not know yet: a plain box named by its kind
            kind = step_kind(step) or type(step).__name__
            anchor = self._node(step.id, [step.id, kind, *notes], "box", status)
            entries, exits = [anchor], [(anchor, None)]
        if step.compensate is not None:
            c_entries, _ = self._step(step.compensate)
            self._connect([(anchor, "compensate")], c_entries, dashed=True)
        return entries, exits

    # -- helpers for the renderers ------------------------------------------------------

    def first_node(self, cluster_id: str) -> str:
        """A node inside a cluster: DOT edges to a cluster attach to it (lhead/ltail)."""
        stack = list(self.clusters[cluster_id].items)
        while stack:
            item = stack.pop(0)
            if isinstance(item, _Node):
                return item.id
            stack[:0] = item.items
        raise ValueError(f"cluster {cluster_id} is empty")


# -- Mermaid ------------------------------------------------------------------------------

_MERMAID_SHAPES = {
    "box": ('["', '"]'),
    "subflow": ('[["', '"]]'),
    "fork": ('{{"', '"}}'),
    "join": ('(("', '"))'),
    "decision": ('{"', '"}'),
    "start": ('(("', '"))'),
    "finish": ('((("', '")))'),
    "failed": ('>"', '"]'),
}


def _mermaid_text(lines: list[str]) -> str:
    # Mermaid entity codes: '#' first, since every other escape starts with it.
    out = []
    for line in lines:
        for ch, code in (("#", "#35;"), ('"', "#quot;"), ("<", "#lt;"), (">", "#gt;")):
            line = line.replace(ch, code)
        out.append(line.replace("|", "#124;"))
    return "<br/>".join(out)


def to_mermaid(resource: FlowResource, statuses: dict[str, str] | None = None) -> str:
    """The flow as a Mermaid flowchart; ``statuses`` (step key -> status) colours the steps."""
    g = _Graph(resource, statuses)
    out = [f"%% flow {g.name}", "flowchart TD"]
    classes: list[tuple[str, str]] = []
    styles: list[str] = []

    def emit(items: list[_Node | _Cluster], depth: int) -> None:
        pad = "  " * depth
        for item in items:
            if isinstance(item, _Node) and item.status in STATUS_COLOURS:
                classes.append((item.id, item.status))
            elif isinstance(item, _Cluster) and item.status in STATUS_COLOURS:
                # Mermaid applies classDef to nodes only; subgraphs take `style`.
                fill, stroke = STATUS_COLOURS[item.status]
                styles.append(f"  style {item.id} fill:{fill},stroke:{stroke},stroke-width:2px")
            if isinstance(item, _Node):
                left, right = _MERMAID_SHAPES[item.shape]
                out.append(f"{pad}{item.id}{left}{_mermaid_text(item.lines)}{right}")
            else:
                out.append(f'{pad}subgraph {item.id} ["{_mermaid_text(item.lines)}"]')
                emit(item.items, depth + 1)
                out.append(f"{pad}end")

    emit(g.root.items, 1)
    for e in g.edges:
        arrow = "-.->" if e.dashed else "-->"
        label = f'|"{_mermaid_text([e.label])}"|' if e.label else ""
        out.append(f"  {e.src} {arrow}{label} {e.dst}")
    used = {status for _, status in classes}
    for status in STATUS_COLOURS:
        if status in used:
            fill, stroke = STATUS_COLOURS[status]
            out.append(f"  classDef {status} fill:{fill},stroke:{stroke},stroke-width:2px")
    for ident, status in classes:
        out.append(f"  class {ident} {status}")
    out.extend(styles)
    return "\n".join(out) + "\n"


# -- Graphviz DOT -------------------------------------------------------------------------

_DOT_SHAPES = {
    "box": "box",
    "subflow": "box3d",
    "fork": "hexagon",
    "join": "circle",
    "decision": "diamond",
    "start": "circle",
    "finish": "doublecircle",
    "failed": "octagon",
}


def _dot_string(lines: list[str]) -> str:
    escaped = [line.replace("\\", "\\\\").replace('"', '\\"') for line in lines]
    return '"' + "\\n".join(escaped) + '"'


def to_dot(resource: FlowResource, statuses: dict[str, str] | None = None) -> str:
    """The flow as a Graphviz digraph; ``statuses`` (step key -> status) fills the steps."""
    g = _Graph(resource, statuses)
    out = [
        f"digraph {_dot_string([g.name])} {{",
        "  rankdir=TB;",
        "  compound=true;",
        '  fontname="Helvetica";',
        '  node [shape=box, style="rounded,filled", fillcolor=white, fontname="Helvetica"];',
        '  edge [fontname="Helvetica", fontsize=10];',
    ]

    def colours(status: str | None) -> str:
        if status not in STATUS_COLOURS:
            return ""
        fill, stroke = STATUS_COLOURS[status]
        return f', fillcolor="{fill}", color="{stroke}"'

    def emit(items: list[_Node | _Cluster], depth: int) -> None:
        pad = "  " * depth
        for item in items:
            if isinstance(item, _Node):
                attrs = f"label={_dot_string(item.lines)}, shape={_DOT_SHAPES[item.shape]}"
                out.append(f"{pad}{item.id} [{attrs}{colours(item.status)}];")
            else:
                out.append(f"{pad}subgraph cluster_{item.id} {{")
                out.append(f"{pad}  label={_dot_string(item.lines)};")
                if item.status in STATUS_COLOURS:
                    fill, stroke = STATUS_COLOURS[item.status]
                    out.append(
                        f'{pad}  style="rounded,filled"; fillcolor="{fill}"; color="{stroke}";'
                    )
                else:
                    out.append(f'{pad}  style="rounded,dashed";')
                emit(item.items, depth + 1)
                out.append(f"{pad}}}")

    emit(g.root.items, 1)
    for e in g.edges:
        attrs = []
        src, dst = e.src, e.dst
        if src in g.clusters:
            attrs.append(f"ltail=cluster_{src}")
            src = g.first_node(src)
        if dst in g.clusters:
            attrs.append(f"lhead=cluster_{dst}")
            dst = g.first_node(dst)
        if e.label:
            attrs.append(f"label={_dot_string([e.label])}")
        if e.dashed:
            attrs.append("style=dashed")
        suffix = f" [{', '.join(attrs)}]" if attrs else ""
        out.append(f"  {src} -> {dst}{suffix};")
    out.append("}")
    return "\n".join(out) + "\n"
