"""Tests for orchestrator.loader: every kind of mistake is reported with file, line and path."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from orchestrator.errors import DefinitionError, Problem
from orchestrator.loader import Loaded, load, load_string, version_of
from orchestrator.model import FlowResource, TaskStep
from orchestrator.settings import Settings

REPO = Path(__file__).resolve().parent.parent

HEAD = """\
apiVersion: orchestrator/v1
kind: Flow
metadata:
  name: demo
spec:
  steps:
"""  # the steps start on line 7


def flow_text(steps: str, head: str = HEAD) -> str:
    return head + textwrap.indent(textwrap.dedent(steps).lstrip("\n"), "    ")


def problems(text: str, file: str = "flows/demo.yaml", **kw) -> list[Problem]:
    with pytest.raises(DefinitionError) as info:
        load_string(text, file=file, **kw)
    assert str(info.value)  # the exception's text lists the problems
    return info.value.problems


def only(text: str, **kw) -> Problem:
    found = problems(text, **kw)
    assert len(found) == 1, [str(p) for p in found]
    return found[0]


# -- loading what is right -------------------------------------------------------------


def test_load_string_returns_loaded_resources() -> None:
    loaded = load_string(flow_text("- {id: a, task: x.a}\n"), file="f.yaml")
    assert len(loaded) == 1
    (item,) = loaded
    assert isinstance(item, Loaded)
    assert item.kind == "Flow"
    assert item.name == "demo"
    assert isinstance(item.resource, FlowResource)
    assert isinstance(item.resource.spec.steps[0], TaskStep)
    assert item.source is not None and item.source.file == "f.yaml"


def test_the_example_flows_load_cleanly() -> None:
    loaded = load(REPO / "flows")
    names = {item.name for item in loaded}
    assert {"text", "etl"} <= names
    assert {item.kind for item in loaded} == {
        "Flow",
        "Schedule",
        "Variable",
        "Service",
        "EventSubscription",
    }
    for item in loaded:
        assert item.source is not None and item.source.file.endswith((".yaml", ".yml"))


@pytest.mark.parametrize("name", ["text.yaml", "etl.yaml"])
def test_each_example_flow_loads_alone(name) -> None:
    (item,) = load(REPO / "flows" / name)
    assert item.name == name.removesuffix(".yaml")


def test_multi_document_file(tmp_path: Path) -> None:
    two = (
        flow_text("- {id: a, task: x.a}\n")
        + "---\n"
        + flow_text("- {id: b, task: x.b}\n", HEAD.replace("name: demo", "name: other"))
    )
    path = tmp_path / "two.yaml"
    path.write_text(two)
    loaded = load(path)
    assert [item.name for item in loaded] == ["demo", "other"]
    assert loaded[1].source.line == 9  # the second document starts after the separator


def test_error_in_second_document_has_the_line_in_the_file() -> None:
    text = (
        flow_text("- {id: a, task: x.a}\n")
        + "---\n"
        + flow_text(
            """
        - id: b
          task: x.b
          priority: urgent
        """,
            HEAD.replace("name: demo", "name: other"),
        )
    )
    p = only(text)
    assert (p.file, p.line, p.path) == ("flows/demo.yaml", 17, "spec.steps[0].priority")


def test_the_same_flow_twice_is_an_error() -> None:
    text = flow_text("- {id: a, task: x.a}\n") + "---\n" + flow_text("- {id: b, task: x.b}\n")
    p = only(text)
    assert (p.line, p.path) == (9, "metadata.name")
    assert "defined twice" in p.message


def test_folder_is_loaded_recursively(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yaml").write_text(flow_text("- {id: a, task: x.a}\n"))
    (tmp_path / "sub" / "b.yml").write_text(
        flow_text("- {id: b, task: x.b}\n", HEAD.replace("demo", "bee"))
    )
    (tmp_path / "notes.txt").write_text("not a definition")
    (tmp_path / ".hidden.yaml").write_text("this: [is not loaded")
    loaded = load(tmp_path)
    assert sorted(item.name for item in loaded) == ["bee", "demo"]


def test_problems_in_several_files_are_all_reported(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(flow_text("- {id: a, task: x.a, queue: [1]}\n"))
    (tmp_path / "b.yaml").write_text(
        flow_text("- {id: b, tsk: x.b}\n", HEAD.replace("demo", "bee"))
    )
    with pytest.raises(DefinitionError) as info:
        load(tmp_path)
    files = sorted(Path(p.file).name for p in info.value.problems)
    assert files == ["a.yaml", "b.yaml"]
    assert all(p.line == 7 for p in info.value.problems)


def test_missing_path_is_a_definition_error(tmp_path: Path) -> None:
    with pytest.raises(DefinitionError, match="no such file"):
        load(tmp_path / "nope.yaml")


# -- errors: file, line and field path -------------------------------------------------


def test_yaml_syntax_error() -> None:
    text = flow_text(
        """
        - id: a
          task: x.a
          with: {x: [1, 2}
        """
    )
    p = only(text)
    assert p.file == "flows/demo.yaml"
    assert p.line == 9
    assert p.message.startswith("invalid YAML")


def test_yaml_syntax_error_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(flow_text("- id: a\n  task: x.a\n bad: [\n"))
    with pytest.raises(DefinitionError) as info:
        load(path)
    (p,) = info.value.problems
    assert p.file == str(path)
    assert p.line == 9
    assert "invalid YAML" in p.message


def test_unknown_field() -> None:
    p = only(
        flow_text(
            """
            - id: a
              task: x.a
              retyr: {maxAttempts: 2}
            """
        )
    )
    assert (p.file, p.line, p.path) == ("flows/demo.yaml", 9, "spec.steps[0].retyr")
    assert p.message == "unknown field 'retyr'; did you mean 'retry'?"


def test_unknown_field_in_spec() -> None:
    text = HEAD.replace("  steps:\n", "  step:\n    - {id: a, task: x.a}\n")
    found = problems(text)
    unknown = [p for p in found if p.path == "spec.step"]
    assert len(unknown) == 1
    assert unknown[0].line == 6
    assert "unknown field 'step'" in unknown[0].message


def test_task_typo_names_the_unknown_field() -> None:
    found = problems(
        flow_text(
            """
            - id: a
              tsk: x.a
            """
        )
    )
    assert any(p.path == "spec.steps[0].tsk" and p.line == 8 for p in found), [
        str(p) for p in found
    ]


def test_wrong_type() -> None:
    p = only(
        flow_text(
            """
            - id: a
              task: x.a
              priority: high
            """
        )
    )
    assert (p.line, p.path) == (9, "spec.steps[0].priority")
    assert "expected an integer" in p.message and "'high'" in p.message


def test_wrong_type_of_a_duration() -> None:
    p = only(
        flow_text(
            """
            - id: a
              task: x.a
              timeout: soon
            """
        )
    )
    assert (p.line, p.path) == (9, "spec.steps[0].timeout")
    assert "duration" in p.message


def test_missing_required_field() -> None:
    text = HEAD.replace("  steps:\n", "  description: nothing to do\n")
    p = only(text)
    assert (p.file, p.line, p.path) == ("flows/demo.yaml", 5, "spec.steps")
    assert p.message == "required field 'steps' is missing"


def test_missing_metadata_name() -> None:
    text = flow_text("- {id: a, task: x.a}\n").replace("  name: demo\n", "  labels: {a: b}\n")
    p = only(text)
    assert (p.line, p.path) == (3, "metadata.name")
    assert "required field 'name' is missing" in p.message


def test_bad_metadata_name() -> None:
    p = only(flow_text("- {id: a, task: x.a}\n").replace("name: demo", "name: Demo_Flow"))
    assert (p.line, p.path) == (4, "metadata.name")


def test_bad_api_version() -> None:
    text = flow_text("- {id: a, task: x.a}\n").replace("orchestrator/v1", "orchestrator/v2")
    p = only(text)
    assert (p.file, p.line, p.path) == ("flows/demo.yaml", 1, "apiVersion")
    assert "expected apiVersion 'orchestrator/v1'" in p.message and "v2" in p.message


def test_unknown_kind() -> None:
    p = only(flow_text("- {id: a, task: x.a}\n").replace("kind: Flow", "kind: Flw"))
    assert (p.line, p.path) == (2, "kind")
    assert "'Flw'" in p.message and "Flow" in p.message


def test_document_that_is_not_a_mapping() -> None:
    p = only("- just\n- a list\n")
    assert p.line == 1
    assert "expected a mapping" in p.message


def test_duplicate_step_ids() -> None:
    p = only(
        flow_text(
            """
            - id: a
              task: x.a
            - id: p
              parallel:
                - id: a
                  task: x.b
            """
        )
    )
    assert (p.line, p.path) == (11, "spec.steps[1].parallel[0].id")
    assert "duplicate step id 'a'" in p.message and "spec.steps[0]" in p.message


def test_expression_syntax_error() -> None:
    p = only(
        flow_text(
            """
            - id: a
              task: x.a
              with:
                x: "${inputs.}"
            """
        )
    )
    assert p.line in (9, 10)
    assert p.path.startswith("spec.steps[0].with")
    assert "invalid expression" in p.message and "${inputs.}" in p.message


def test_expression_syntax_error_in_when() -> None:
    p = only(
        flow_text(
            """
            - id: a
              task: x.a
              when: "${inputs.x ==}"
            """
        )
    )
    assert (p.line, p.path) == (9, "spec.steps[0].when")


def test_reference_to_unknown_step() -> None:
    p = only(
        flow_text(
            """
            - id: a
              task: x.a
              with: {x: "${steps.zz.output}"}
            """
        )
    )
    assert (p.line, p.path) == (9, "spec.steps[0].with")
    assert "unknown step 'zz'" in p.message


def test_reference_to_unknown_step_in_outputs() -> None:
    text = flow_text("- {id: a, task: x.a}\n") + "  outputs:\n    n: ${steps.b.output}\n"
    p = only(text)
    assert (p.line, p.path) == (8, "spec.outputs")
    assert "the flow's outputs refers to unknown step 'b'" in p.message


def test_reference_to_a_later_step() -> None:
    p = only(
        flow_text(
            """
            - id: a
              task: x.a
              with: {x: "${steps.b.output}"}
            - id: b
              task: x.b
            """
        )
    )
    assert (p.line, p.path) == (9, "spec.steps[0].with")
    assert "refers to step 'b'" in p.message and "does not finish before" in p.message


def test_reference_to_own_output_is_a_cycle() -> None:
    p = only(
        flow_text(
            """
            - id: a
              task: x.a
              with: {x: "${steps.a.output}"}
            """
        )
    )
    assert (p.line, p.path) == (9, "spec.steps[0].with")
    assert "its own result (a cycle)" in p.message


def test_reference_to_the_enclosing_step_is_a_cycle() -> None:
    p = only(
        flow_text(
            """
            - id: s
              steps:
                - id: a
                  task: x.a
                  with: {x: "${steps.s.output}"}
            """
        )
    )
    assert p.path == "spec.steps[0].steps[0].with"
    assert p.line == 11


def test_reference_to_a_parallel_sibling() -> None:
    p = only(
        flow_text(
            """
            - id: p
              parallel:
                - id: a
                  task: x.a
                - id: b
                  task: x.b
                  with: {x: "${steps.a.output}"}
            """
        )
    )
    assert (p.line, p.path) == (13, "spec.steps[0].parallel[1].with")
    assert "refers to step 'a'" in p.message and "parallel branch" in p.message


def test_reference_to_an_earlier_step_and_a_parallel_output_is_fine() -> None:
    (loaded,) = load_string(
        flow_text(
            """
            - id: a
              task: x.a
            - id: p
              parallel:
                - {id: b, task: x.b, with: {x: "${steps.a.output}"}}
                - id: s
                  steps:
                    - {id: c, task: x.c}
                    - {id: d, task: x.d, with: {x: "${steps.c.output}"}}
            - {id: e, task: x.e, with: {p: "${steps.p.output}", d: "${steps.d.output}"}}
            """
        )
    )
    assert loaded.name == "demo"


def test_reading_a_foreach_body_step_from_outside() -> None:
    p = only(
        flow_text(
            """
            - id: each
              forEach: "${inputs.items}"
              do:
                - id: body
                  task: x.body
            - id: after
              task: x.after
              with: {x: "${steps.body.output}"}
            """
        )
    )
    assert (p.line, p.path) == (14, "spec.steps[1].with")
    assert "inside a forEach body" in p.message and "'body'" in p.message


def test_timeout_reaching_visibility_timeout() -> None:
    text = flow_text(
        """
        - id: a
          task: x.a
          timeout: 25s
        - id: b
          task: x.b
          timeout: 60s
        """
    )
    settings = Settings(visibility_timeout_s=60)
    p = only(text, settings=settings)
    assert (p.line, p.path) == (12, "spec.steps[1].timeout")
    assert "visibility timeout (60s)" in p.message and "'b'" in p.message
    # Without settings, or with a long enough visibility timeout, the same flow loads.
    assert load_string(text)
    assert load_string(text, settings=Settings(visibility_timeout_s=3600))


def test_default_timeout_reaching_visibility_timeout() -> None:
    head = HEAD.replace("  steps:\n", "  defaults: {timeout: 2m}\n  steps:\n")
    text = head + "    - {id: a, task: x.a}\n"
    p = only(text, settings=Settings(visibility_timeout_s=60))
    assert p.path == "spec.steps[0].timeout"
    assert p.line == 8


def test_all_problems_of_a_document_are_reported_at_once() -> None:
    found = problems(
        flow_text(
            """
            - id: a
              task: x.a
              priority: high
            - id: b
              task: x.b
              retyr: {}
            """
        )
    )
    assert sorted((p.line, p.path) for p in found) == [
        (9, "spec.steps[0].priority"),
        (12, "spec.steps[1].retyr"),
    ]


def test_problem_text_names_file_line_and_path() -> None:
    p = only(flow_text("- {id: a, task: x.a, priority: high}\n"))
    assert str(p).startswith("flows/demo.yaml:7: spec.steps[0].priority: expected an integer")
    assert p.as_dict()["path"] == "spec.steps[0].priority"


# -- versions --------------------------------------------------------------------------


def test_version_is_stable_for_the_same_content() -> None:
    text = flow_text("- {id: a, task: x.a, with: {b: 1, a: 2}}\n")
    (one,) = load_string(text)
    (two,) = load_string(text)
    # Formatting and key order do not change the version; only content does.
    reordered = flow_text(
        """
        - task: x.a
          id: a
          with:
            a: 2
            b: 1
        """
    )
    (three,) = load_string("# a comment\n" + reordered)
    assert version_of(one.resource) == version_of(two.resource) == version_of(three.resource)
    assert len(version_of(one.resource)) == 12


def test_version_changes_with_content() -> None:
    (one,) = load_string(flow_text("- {id: a, task: x.a}\n"))
    (two,) = load_string(flow_text("- {id: a, task: x.b}\n"))
    (three,) = load_string(flow_text("- {id: a, task: x.a, timeout: 5s}\n"))
    versions = {version_of(x.resource) for x in (one, two, three)}
    assert len(versions) == 3


# -- limits: durations, size, nesting ---------------------------------------------------


@pytest.mark.parametrize(
    ("field", "yaml_value", "path"),
    [
        ("timeout: .nan", "nan", "spec.steps[0].timeout"),
        ("timeout: .inf", "inf", "spec.steps[0].timeout"),
        ("timeout: -.inf", "-inf", "spec.steps[0].timeout"),
        ("retry: {initialDelay: .nan}", "nan", "spec.steps[0].retry.initialDelay"),
        ("retry: {maxDelay: .inf}", "inf", "spec.steps[0].retry.maxDelay"),
    ],
)
def test_nan_and_infinite_durations_are_problems_at_their_field(field, yaml_value, path) -> None:
    p = only(flow_text(f"- id: a\n  task: x.a\n  {field}\n"))
    assert (p.file, p.line, p.path) == ("flows/demo.yaml", 9, path)
    assert p.message == f"a duration must be a finite number of seconds; got {yaml_value}"


def test_every_kind_of_duration_is_checked_in_a_document() -> None:
    text = flow_text(
        """
        - {id: s, sleep: .inf}
        - {id: w, wait: {signal: go, timeout: .nan}}
        - {id: ap, approval: {approvers: [a], timeout: -1s}}
        - {id: r, task: x.r, retry: {initialDelay: -1}}
        - {id: big, task: x.b, timeout: 36501d}
        """
    ).replace("spec:\n", "spec:\n  defaults: {timeout: .nan}\n")
    found = {p.path: p.line for p in problems(text)}
    assert found == {
        "spec.defaults.timeout": 6,
        "spec.steps[0].sleep": 8,
        "spec.steps[1].wait.timeout": 9,
        "spec.steps[2].approval.timeout": 10,
        "spec.steps[3].retry.initialDelay": 11,
        "spec.steps[4].timeout": 12,
    }


def test_nan_duration_in_json_is_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "nan.json"
    path.write_text(
        '{"apiVersion": "orchestrator/v1", "kind": "Flow", "metadata": {"name": "n"},\n'
        ' "spec": {"steps": [\n'
        '   {"id": "a", "task": "x.a", "timeout": NaN},\n'
        '   {"id": "b", "sleep": Infinity}]}}\n'
    )
    with pytest.raises(DefinitionError) as info:
        load(path)
    found = [(p.line, p.path, p.message) for p in info.value.problems]
    assert found == [
        (3, "spec.steps[0].timeout", "a duration must be a finite number of seconds; got nan"),
        (4, "spec.steps[1].sleep", "a duration must be a finite number of seconds; got inf"),
    ]


def test_service_timeout_is_checked_too() -> None:
    text = (
        "apiVersion: orchestrator/v1\nkind: Service\nmetadata: {name: s}\n"
        "spec:\n  address: https://example.com\n  timeout: .nan\n"
    )
    p = only(text)
    assert (p.line, p.path) == (6, "spec.timeout")


def _padded(size: int) -> str:
    text = flow_text("- {id: a, task: x.a}\n")
    return text + "#" * (size - len(text) - 1) + "\n"


def test_load_string_refuses_text_over_max_definition_bytes() -> None:
    settings = Settings(max_definition_bytes=2048)
    assert load_string(_padded(2048), settings=settings)
    p = only(_padded(2049), settings=settings)
    assert p.file == "flows/demo.yaml"
    assert p.message == (
        "the definition is 2,049 bytes, over the limit of 2,048 (ORCHESTRATOR_MAX_DEFINITION_BYTES)"
    )


def test_load_refuses_files_over_max_definition_bytes(tmp_path: Path) -> None:
    (tmp_path / "ok.yaml").write_text(_padded(2048))
    (tmp_path / "big.yaml").write_text(_padded(5000).replace("demo", "bigg"))
    with pytest.raises(DefinitionError) as info:
        load(tmp_path, Settings(max_definition_bytes=2048))
    (p,) = info.value.problems
    assert p.file == str(tmp_path / "big.yaml")
    assert "5,000 bytes, over the limit of 2,048 (ORCHESTRATOR_MAX_DEFINITION_BYTES)" in p.message


def test_without_settings_the_limit_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from orchestrator.settings import get_settings

    monkeypatch.setenv("ORCHESTRATOR_MAX_DEFINITION_BYTES", "1024")
    get_settings.cache_clear()
    try:
        p = only(_padded(1025))
        assert "over the limit of 1,024" in p.message
        assert load_string(_padded(1024))
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()


def test_a_deeply_nested_document_is_refused_naming_the_limit() -> None:
    deep = "[" * 5000 + "]" * 5000
    p = only(flow_text(f"- {{id: a, task: x.a, with: {{v: {deep}}}}}\n"))
    assert (p.file, p.line) == ("flows/demo.yaml", 7)
    assert "nested more than 100 levels deep" in p.message


def _nested_steps(levels: int) -> dict:
    """A flow whose steps nest ``levels`` deep, through every kind of step that holds steps."""
    step: dict = {"id": "leaf", "task": "x.leaf", "with": {"v": [1, {"k": 2}]}}
    for i in range(levels - 1):
        kind = i % 7
        if kind == 0:
            step = {"id": f"seq{i}", "steps": [step]}
        elif kind == 1:
            step = {"id": f"par{i}", "parallel": [step, {"id": f"p{i}", "task": "x.p"}]}
        elif kind == 2:
            step = {"id": f"try{i}", "try": [step], "catch": [{"id": f"c{i}", "task": "x.c"}]}
        elif kind == 3:
            step = {"id": f"each{i}", "forEach": "${inputs.items}", "do": step}
        elif kind == 4:
            step = {"id": f"t{i}", "task": "x.t", "compensate": step}
        elif kind == 5:
            step = {"id": f"sw{i}", "switch": [{"when": "${inputs.x}", "steps": [step]}]}
        else:
            step = {"id": f"fin{i}", "try": [{"id": f"f{i}", "task": "x.f"}], "finally": [step]}
    return {
        "apiVersion": "orchestrator/v1",
        "kind": "Flow",
        "metadata": {"name": "deep"},
        "spec": {"steps": [step]},
    }


def test_steps_nested_to_the_limit_load_compile_and_draw() -> None:
    import json

    from orchestrator.app import create_app
    from orchestrator.compiler import describe, render_canvas
    from orchestrator.graph import to_dot, to_mermaid
    from orchestrator.loader import MAX_STEP_NESTING
    from orchestrator.plan import Plan

    (loaded,) = load_string(json.dumps(_nested_steps(MAX_STEP_NESTING)))
    flow = loaded.resource
    settings = Settings()
    plan = Plan(flow, version_of(flow), settings)
    assert plan.nodes["leaf"]
    app = create_app(settings, set_as_current=False)
    try:
        described = describe(plan, app)
        assert "leaf" in described["steps"] and render_canvas(described["canvas"])
    finally:
        app.close()
    assert "leaf" in to_mermaid(flow) and "leaf" in to_dot(flow)
    assert FlowResource.model_validate(flow.document()) == flow


def test_steps_nested_beyond_the_limit_are_refused() -> None:
    import json

    from orchestrator.loader import MAX_STEP_NESTING

    text = json.dumps(_nested_steps(MAX_STEP_NESTING + 1), indent=1)
    p = only(text)
    assert p.message == (
        f"steps are nested more than {MAX_STEP_NESTING} levels deep (a step inside a step is "
        "one level more); refusing the flow"
    )
    assert p.path.startswith("spec.steps[0].do.try[0].parallel[0].steps[0].finally[0].switch[0]")
    assert '"id": "leaf"' in text.splitlines()[p.line]  # the 33rd level is the leaf


def test_a_flow_built_in_python_nested_500_deep_is_a_definition_error() -> None:
    from orchestrator.loader import validate_flow
    from orchestrator.model import FlowSpec, Metadata, SequenceStep

    step: TaskStep | SequenceStep = TaskStep(id="leaf", task="x.leaf")
    for i in range(500):
        step = SequenceStep(id=f"s{i}", steps=[step])
    flow = FlowResource(metadata=Metadata(name="deep"), spec=FlowSpec(steps=[step]))
    with pytest.raises(DefinitionError, match="steps are nested more than 32 levels deep"):
        validate_flow(flow)


# -- forEach over a literal list ----------------------------------------------------------


@pytest.mark.parametrize("items", ["${[1, 2, 3, 4]}", "[1, 2, 3, 4]", "${[0] * 4}"])
def test_foreach_over_a_static_list_longer_than_the_limit_is_refused(items) -> None:
    text = flow_text(f'- {{id: each, forEach: "{items}", do: {{id: d, task: x.d}}}}\n')
    p = only(text, settings=Settings(max_foreach_items=3))
    assert (p.line, p.path) == (7, "spec.steps[0].forEach")
    assert p.message == (
        "step 'each': forEach over 4 items, over the limit of 3 (ORCHESTRATOR_MAX_FOREACH_ITEMS)"
    )


@pytest.mark.parametrize("items", ["${[1, 2, 3]}", "${inputs.items}", "${[inputs.a] * 9}"])
def test_foreach_within_the_limit_or_known_only_at_run_time_loads(items) -> None:
    text = flow_text(f'- {{id: each, forEach: "{items}", do: {{id: d, task: x.d}}}}\n')
    assert load_string(text, settings=Settings(max_foreach_items=3))


# -- subflow cycles ------------------------------------------------------------------------


def test_a_flow_that_starts_itself_is_refused() -> None:
    p = only(
        flow_text(
            """
            - {id: a, task: x.a}
            - id: again
              flow: demo
            """
        )
    )
    assert (p.file, p.line, p.path) == ("flows/demo.yaml", 9, "spec.steps[1].flow")
    assert p.message == (
        "subflow cycle: demo → demo (a flow may not start itself, directly or through other flows)"
    )


def test_flows_that_start_each_other_are_refused_wherever_the_call_is() -> None:
    a = flow_text(
        """
        - id: choose
          switch:
            - when: ${inputs.go}
              steps:
                - {id: call, flow: bee}
        """
    )
    b = flow_text(
        "- {id: t, try: [{id: x, task: x.x}], catch: [{id: back, flow: demo}]}\n",
        HEAD.replace("demo", "bee"),
    )
    found = problems(b + "---\n" + a)
    assert [(p.line, p.path) for p in found] == [(7, "spec.steps[0].catch[0].flow")]
    assert found[0].message.startswith("subflow cycle: bee → demo → bee ")


def test_a_chain_of_subflows_without_a_cycle_loads() -> None:
    a = flow_text("- {id: call, flow: bee}\n")
    b = flow_text("- {id: call, flow: sea}\n", HEAD.replace("demo", "bee"))
    c = flow_text("- {id: work, task: x.w}\n", HEAD.replace("demo", "sea"))
    assert len(load_string(a + "---\n" + b + "---\n" + c)) == 3


def test_subflow_calls_are_found_in_every_kind_of_block() -> None:
    from orchestrator.loader import subflow_calls

    text = (
        flow_text(
            """
        - id: p
          parallel:
            - {id: p1, flow: one}
            - {id: p2, steps: [{id: s1, flow: two}]}
        - id: e
          forEach: ${inputs.items}
          do: {id: each, flow: three}
        - {id: t, task: x.t, compensate: {id: undo, flow: four}}
        - {id: again, flow: one}
        """
        )
        + "  onFailure:\n    - {id: alarm, flow: five}\n"
    )
    (loaded,) = load_string(text)
    assert subflow_calls(loaded.resource) == {
        "one": ("spec", "steps", 0, "parallel", 0, "flow"),
        "two": ("spec", "steps", 0, "parallel", 1, "steps", 0, "flow"),
        "three": ("spec", "steps", 1, "do", "flow"),
        "four": ("spec", "steps", 2, "compensate", "flow"),
        "five": ("spec", "onFailure", 0, "flow"),
    }


def test_find_subflow_cycle() -> None:
    from orchestrator.loader import find_subflow_cycle

    assert find_subflow_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_subflow_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_subflow_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert find_subflow_cycle({"a": {"missing"}}) is None
    # Only cycles through the given flows count: b ⇄ c was there before a.
    calls = {"a": {"b"}, "b": {"c"}, "c": {"b"}}
    assert find_subflow_cycle(calls, through=["a"]) is None
    assert find_subflow_cycle(calls, through=["a", "c"]) == ["c", "b", "c"]
    # The shortest cycle through a flow is named.
    assert find_subflow_cycle({"a": {"b", "z"}, "b": {"c"}, "c": {"a"}, "z": {"a"}}) == [
        "a",
        "z",
        "a",
    ]


def test_find_subflow_cycle_walks_long_chains_without_recursion() -> None:
    from orchestrator.loader import find_subflow_cycle

    n = 50_000
    calls = {f"f{i}": {f"f{i + 1}"} for i in range(n)}
    assert find_subflow_cycle(calls) is None
    calls[f"f{n}"] = {"f0"}
    cycle = find_subflow_cycle(calls, through=["f0"])
    assert cycle is not None and len(cycle) == n + 2 and cycle[0] == cycle[-1] == "f0"


def test_a_zero_timeout_is_refused_at_its_field() -> None:
    """Celery would read a soft limit of 0 as none, with a hard limit of 1 s."""
    text = (
        "apiVersion: orchestrator/v1\nkind: Flow\nmetadata: {name: z}\n"
        "spec:\n  steps:\n    - {id: a, task: t.a, timeout: 0}\n"
    )
    with pytest.raises(DefinitionError) as info:
        load_string(text)
    (problem,) = info.value.problems
    assert problem.path == "spec.steps[0].timeout" and "more than 0" in problem.message
