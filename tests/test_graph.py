"""Drawings of flows (orchestrator/graph.py): Mermaid and DOT, every step kind, status colours."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from orchestrator.graph import STATUS_COLOURS, to_dot, to_mermaid
from orchestrator.loader import load_string

EVERY_KIND = """
apiVersion: orchestrator/v1
kind: Flow
metadata:
  name: every-kind
spec:
  inputs:
    items: {type: array, default: [1, 2]}
  steps:
    - id: fetch-data
      task: demo.fetch
      compensate:
        id: undo-fetch
        task: demo.undo
    - id: fan
      parallel:
        - id: left
          task: demo.left
        - id: right
          steps:
            - {id: r1, task: demo.r1}
            - {id: r2, task: demo.r2}
    - id: each
      forEach: "${inputs.items}"
      concurrency: 4
      do:
        - id: handle
          task: demo.handle
          with: {item: "${item}"}
    - id: route
      switch:
        - when: "${len(inputs.items) > 1}"
          steps:
            - {id: many, task: demo.many}
        - default:
            - {id: few, task: demo.few}
    - id: guarded
      try:
        - {id: risky, task: demo.risky}
      catch:
        - {id: recover, task: demo.recover}
      finally:
        - {id: cleanup, task: demo.cleanup}
  onFailure:
    - {id: notify, task: demo.notify}
"""

TEXT = """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: text}
spec:
  steps:
    - {id: upper, task: text.upper}
    - id: fan
      parallel:
        - {id: reverse, task: text.reverse}
        - {id: spaces, task: text.count_spaces}
"""

NODE_DEF = re.compile(r"^\s*([A-Za-z0-9_]+)(\[\[|\[|\{\{|\{|\(\(\(|\(\(|>)")
SUBGRAPH = re.compile(r"^\s*subgraph ([A-Za-z0-9_]+) \[")
EDGE = re.compile(r"^\s*(\S+) (-->|-\.->)(?:\|\"([^|]*)\"\|)? (\S+)$")


def flow(text: str):
    (loaded,) = load_string(text)
    return loaded.resource


def mermaid_parts(text: str) -> tuple[set[str], set[str], list[tuple[str, str, str | None, str]]]:
    """(node ids, subgraph ids, edges as (src, arrow, label, dst)) of a Mermaid flowchart."""
    nodes, subgraphs, edges = set(), set(), []
    for line in text.splitlines():
        if m := SUBGRAPH.match(line):
            subgraphs.add(m.group(1))
        elif m := EDGE.match(line):
            edges.append((m.group(1), m.group(2), m.group(3), m.group(4)))
        elif m := NODE_DEF.match(line):
            nodes.add(m.group(1))
    return nodes, subgraphs, edges


def labelled(edges, label: str) -> list[tuple[str, str, str | None, str]]:
    return [e for e in edges if e[2] == label]


def test_mermaid_text_flow_is_a_chain_then_fan_out_and_fan_in() -> None:
    out = to_mermaid(flow(TEXT))
    assert out.splitlines()[1] == "flowchart TD"
    nodes, _subgraphs, edges = mermaid_parts(out)
    pairs = {(src, dst) for src, _a, _l, dst in edges}
    assert 's_upper["upper<br/>text.upper"]' in out
    assert 's_fan{{"fan<br/>parallel: fan-out"}}' in out
    assert {
        ("x_start", "s_upper"),
        ("s_upper", "s_fan"),
        ("s_fan", "s_reverse"),
        ("s_fan", "s_spaces"),
        ("s_reverse", "x_fan"),
        ("s_spaces", "x_fan"),
        ("x_fan", "x_finish"),
    } == pairs
    assert {"x_start", "s_upper", "s_fan", "x_fan", "s_reverse", "s_spaces", "x_finish"} == nodes


def test_mermaid_draws_every_step_kind() -> None:
    out = to_mermaid(flow(EVERY_KIND))
    nodes, subgraphs, edges = mermaid_parts(out)
    # Every edge joins things that are drawn.
    for src, _arrow, _label, dst in edges:
        assert src in nodes | subgraphs, src
        assert dst in nodes | subgraphs, dst
    # forEach: a subgraph labelled with its expression and concurrency, body inside.
    assert 'subgraph c_each ["each<br/>for each ${inputs.items}<br/>concurrency 4"]' in out
    body = out.split("subgraph c_each", 1)[1].split("end", 1)[0]
    assert "s_handle" in body
    # parallel: fan-out to both branches (one of them a sequence), fan-in after.
    assert ("s_fan", "-->", None, "s_left") in edges
    assert ("s_fan", "-->", None, "s_r1") in edges
    assert ("s_r1", "-->", None, "s_r2") in edges
    assert ("s_r2", "-->", None, "x_fan") in edges
    assert 'subgraph c_right ["right (sequence)"]' in out
    # switch: a decision with the case condition and default on its edges.
    assert 's_route{"route<br/>switch"}' in out
    assert ("s_route", "-->", "${len(inputs.items) #gt; 1}", "s_many") in edges
    assert ("s_route", "-->", "default", "s_few") in edges
    # try: catch leaves the try block, finally follows both ways out.
    assert ("c_guarded", "-->", "catch", "s_recover") in edges
    assert {(e[0], e[3]) for e in labelled(edges, "finally")} == {
        ("s_risky", "s_cleanup"),
        ("s_recover", "s_cleanup"),
    }
    assert ("s_cleanup", "-->", None, "x_finish") in edges
    # compensate: dashed; onFailure hangs off "run failed".
    assert ("s_fetch_data", "-.->", "compensate", "s_undo_fetch") in edges
    assert ("x_run_failed", "-.->", "onFailure", "s_notify") in edges
    assert 'subgraph c_onFailure ["onFailure"]' in out
    # No status given: no colours.
    assert "classDef" not in out and "style " not in out


def test_switch_without_default_can_fall_through() -> None:
    text = """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: fall-through}
spec:
  steps:
    - id: route
      switch:
        - when: "${true}"
          steps: [{id: hit, task: t.hit}]
    - {id: after, task: t.after}
"""
    _nodes, _subgraphs, edges = mermaid_parts(to_mermaid(flow(text)))
    assert ("s_route", "-->", "no match", "s_after") in edges
    assert ("s_hit", "-->", None, "s_after") in edges


def test_try_without_catch_goes_to_finally_on_error() -> None:
    text = """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: try-finally}
spec:
  steps:
    - id: guarded
      try: [{id: risky, task: t.risky}]
      finally: [{id: cleanup, task: t.cleanup}]
"""
    _nodes, _subgraphs, edges = mermaid_parts(to_mermaid(flow(text)))
    assert ("c_guarded", "-->", "finally (on error)", "s_cleanup") in edges
    assert ("s_risky", "-->", "finally", "s_cleanup") in edges


def test_mermaid_colours_steps_by_status() -> None:
    statuses = {
        "fetch-data": "succeeded",
        "left": "skipped",
        "r1": "retrying",
        "r2": "waiting",
        "each": "running",
        "handle[0]": "succeeded",
        "handle[1]": "failed",
        "many": "pending",
    }
    out = to_mermaid(flow(EVERY_KIND), statuses)
    for status in ("succeeded", "failed", "skipped", "retrying", "waiting"):
        fill, stroke = STATUS_COLOURS[status]
        assert f"classDef {status} fill:{fill},stroke:{stroke}" in out
    assert "classDef pending" not in out  # not a coloured status
    assert "class s_fetch_data succeeded" in out
    assert "class s_left skipped" in out
    assert "class s_r1 retrying" in out
    assert "class s_r2 waiting" in out
    # forEach instances: the worst one shows.
    assert "class s_handle failed" in out
    # Subgraphs take `style` (Mermaid ignores classDef on them).
    fill, stroke = STATUS_COLOURS["running"]
    assert f"style c_each fill:{fill},stroke:{stroke}" in out
    assert "class s_many" not in out
    assert STATUS_COLOURS["succeeded"][0].startswith("#")
    assert STATUS_COLOURS["waiting"] == STATUS_COLOURS["retrying"]


def test_dot_draws_every_step_kind_with_clusters_and_compound_edges() -> None:
    out = to_dot(flow(EVERY_KIND))
    assert out.startswith('digraph "every-kind" {')
    assert "compound=true;" in out
    assert "subgraph cluster_c_each {" in out
    assert 'label="each\\nfor each ${inputs.items}\\nconcurrency 4";' in out
    assert 's_fetch_data [label="fetch-data\\ndemo.fetch", shape=box];' in out
    assert 's_fan [label="fan\\nparallel: fan-out", shape=hexagon];' in out
    assert 's_route [label="route\\nswitch", shape=diamond];' in out
    assert 's_route -> s_many [label="${len(inputs.items) > 1}"];' in out
    assert 's_route -> s_few [label="default"];' in out
    # An edge from a cluster attaches to a node inside it, clipped at the cluster.
    assert 's_risky -> s_recover [ltail=cluster_c_guarded, label="catch"];' in out
    assert 's_risky -> s_cleanup [label="finally"];' in out
    assert 's_fetch_data -> s_undo_fetch [label="compensate", style=dashed];' in out
    assert 'x_run_failed -> s_notify [label="onFailure", style=dashed];' in out
    assert 'fillcolor="#' not in out.split("edge [", 1)[1]  # nothing coloured


def test_dot_fills_steps_by_status() -> None:
    out = to_dot(flow(EVERY_KIND), {"fetch-data": "failed", "each": "succeeded"})
    fill, stroke = STATUS_COLOURS["failed"]
    assert (
        f's_fetch_data [label="fetch-data\\ndemo.fetch", shape=box, '
        f'fillcolor="{fill}", color="{stroke}"];'
    ) in out
    fill, stroke = STATUS_COLOURS["succeeded"]
    cluster = out.split("subgraph cluster_c_each {", 1)[1].split("\n  }\n", 1)[0]
    assert f'style="rounded,filled"; fillcolor="{fill}"; color="{stroke}";' in cluster


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz is not installed")
@pytest.mark.parametrize("statuses", [None, {"fetch-data": "succeeded", "each": "running"}])
def test_graphviz_accepts_the_dot(statuses) -> None:
    proc = subprocess.run(
        ["dot", "-Tsvg"],
        input=to_dot(flow(EVERY_KIND), statuses),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert "<svg" in proc.stdout


def test_ids_are_sanitised_unique_and_never_keywords() -> None:
    text = """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: odd-ids}
spec:
  steps:
    - {id: a-b, task: t.one}
    - {id: a_b, task: t.two}
    - {id: end, task: t.three}
    - {id: graph, task: t.four}
    - {id: start, task: t.five}
    - id: subgraph
      parallel:
        - {id: node, task: t.six}
        - {id: edge, task: t.seven}
"""
    out = to_mermaid(flow(text))
    nodes, _subgraphs, edges = mermaid_parts(out)
    assert {"s_a_b", "s_a_b_2", "s_end", "s_graph", "s_start", "s_subgraph", "x_start"} <= nodes
    assert 's_a_b["a-b<br/>t.one"]' in out
    assert 's_a_b_2["a_b<br/>t.two"]' in out
    assert ("s_a_b", "-->", None, "s_a_b_2") in edges
    reserved = {"end", "graph", "subgraph", "node", "edge", "digraph", "strict", "flowchart"}
    for ident in nodes:
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", ident)
        assert ident not in reserved
    dot = to_dot(flow(text))
    ids = re.findall(r"^\s*([A-Za-z0-9_]+) \[label=", dot, re.M)
    assert len(ids) == len(set(ids))
    assert not set(ids) & reserved


def test_labels_are_escaped() -> None:
    text = """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: quotes}
spec:
  inputs:
    name: {type: string, default: x}
  steps:
    - id: route
      switch:
        - when: "${inputs.name == \\"a|b\\" or inputs.name < \\"#c\\"}"
          steps: [{id: hit, task: t.hit}]
        - default: [{id: miss, task: t.miss}]
"""
    out = to_mermaid(flow(text))
    assert '|"${inputs.name == #quot;a#124;b#quot; or inputs.name #lt; #quot;#35;c#quot;}"|' in out
    dot = to_dot(flow(text))
    assert 'label="${inputs.name == \\"a|b\\" or inputs.name < \\"#c\\"}"' in dot


def test_when_and_on_error_are_shown() -> None:
    text = """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: notes}
spec:
  steps:
    - {id: maybe, task: t.maybe, when: "${1 > 0}", onError: continue}
"""
    out = to_mermaid(flow(text))
    assert 's_maybe["maybe<br/>t.maybe<br/>when ${1 #gt; 0}<br/>on error: continue"]' in out


def test_subflow_is_a_box_naming_the_flow_it_runs() -> None:
    text = """
apiVersion: orchestrator/v1
kind: Flow
metadata: {name: parent}
spec:
  steps:
    - {id: child, flow: other-flow}
"""
    assert 's_child[["child<br/>subflow other-flow"]]' in to_mermaid(flow(text))
    assert 's_child [label="child\\nsubflow other-flow", shape=box3d];' in to_dot(flow(text))
