"""Tests for orchestrator.yamlsource: safe loading with lines, and located validation errors."""

from __future__ import annotations

import os
import textwrap
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator.errors import DefinitionError, Problem
from orchestrator.yamlsource import (
    MAX_ALIAS_NODES,
    MAX_NESTING,
    SourceDoc,
    format_path,
    iter_definition_files,
    load_path,
    load_text,
    problems_from_validation_error,
)


def yaml_text(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def problems_of(text: str, file: str | None = "flow.yaml") -> list[Problem]:
    with pytest.raises(DefinitionError) as info:
        load_text(yaml_text(text), file)
    return info.value.problems


FLOW = """
apiVersion: orchestrator/v1
kind: Flow
metadata:
  name: demo
spec:
  steps:
    - name: fetch
      task: http.get
      with:
        url: https://example.com
    - name: wait
      seconds: 5
"""


# --------------------------------------------------------------------------- loading


def test_lines_of_nested_keys_and_list_items() -> None:
    (doc,) = load_text(yaml_text(FLOW), "flow.yaml")
    assert doc.file == "flow.yaml" and doc.index == 0 and doc.line == 1
    assert doc.data["spec"]["steps"][0]["with"] == {"url": "https://example.com"}
    assert doc.lines[()] == 1
    assert doc.lines[("metadata", "name")] == 4
    assert doc.lines[("spec", "steps")] == 6
    assert doc.lines[("spec", "steps", 0)] == 7
    assert doc.lines[("spec", "steps", 0, "task")] == 8
    assert doc.lines[("spec", "steps", 0, "with", "url")] == 10
    assert doc.lines[("spec", "steps", 1)] == 11
    assert doc.lines[("spec", "steps", 1, "seconds")] == 12


def test_line_of_uses_the_longest_known_prefix() -> None:
    (doc,) = load_text(yaml_text(FLOW))
    assert doc.file is None
    assert doc.line_of(("spec", "steps", 1, "seconds")) == 12
    assert doc.line_of(("spec", "steps", 1, "task")) == 11  # missing: the parent mapping
    assert doc.line_of(("nope", "deeper")) == 1
    assert doc.line_of(()) == 1


def test_flow_style_items_have_their_own_lines() -> None:
    (doc,) = load_text("a: [1,\n  2]\nb: {c: 1,\n  d: 2}\n")
    assert doc.lines[("a", 1)] == 2
    assert doc.lines[("b", "d")] == 4


def test_multi_document_file_has_per_document_lines() -> None:
    text = yaml_text(
        """
        # leading comment
        kind: Flow
        metadata: {name: one}
        ---
        kind: Flow
        metadata:
          name: two
        ---
        ---
        kind: Worker
        ---
        """
    )
    docs = load_text(text, "many.yaml")
    assert [d.data["kind"] for d in docs] == ["Flow", "Flow", "Worker"]
    assert [d.line for d in docs] == [2, 5, 10]
    assert [d.index for d in docs] == [0, 1, 3]  # the empty third document still counts
    assert docs[1].lines[("metadata", "name")] == 7
    assert docs[2].lines[("kind",)] == 10


def test_empty_text_has_no_documents() -> None:
    assert load_text("") == []
    assert load_text("# only a comment\n---\n") == []


def test_syntax_error_names_file_and_line() -> None:
    (problem,) = problems_of(
        """
        kind: Flow
        spec:
          steps: [a, b
          name: x
        """
    )
    assert problem.file == "flow.yaml"
    assert problem.line == 4
    assert problem.message.startswith("invalid YAML: ")
    assert "flow sequence" in problem.message


def test_bad_indentation_is_a_syntax_error() -> None:
    (problem,) = problems_of("kind: Flow\n  name: x\n")
    assert (problem.line, problem.message) == (
        2,
        "invalid YAML: mapping values are not allowed here",
    )
    assert str(problem).startswith("flow.yaml:2: invalid YAML")


def test_duplicate_key_is_an_error_naming_both_lines() -> None:
    (problem,) = problems_of(
        """
        kind: Flow
        spec:
          timeout: 10
          retries: 2
          timeout: 20
        """
    )
    assert problem.path == "spec.timeout"
    assert problem.line == 5
    assert problem.message == "duplicate key 'timeout' (first at line 3, again at line 5)"


def test_non_mapping_document_is_an_error() -> None:
    problems = problems_of("kind: Flow\n---\n- a\n- b\n---\njust text\n")
    assert [(p.line, p.message) for p in problems] == [
        (3, "expected a mapping (a resource with apiVersion, kind, metadata, spec), got a list"),
        (6, "expected a mapping (a resource with apiVersion, kind, metadata, spec), got a string"),
    ]


def test_non_string_keys_are_errors() -> None:
    problems = problems_of(
        """
        kind: Flow
        spec:
          1: one
          yes: two
          "2": fine
        """
    )
    assert [(p.path, p.line) for p in problems] == [("spec.1", 3), ("spec.yes", 4)]
    assert problems[0].message == "key '1' is read as an integer 1; keys must be strings (quote it)"
    assert "boolean true" in problems[1].message


def test_on_key_stays_a_string_but_values_keep_yaml_booleans() -> None:
    (doc,) = load_text("kind: Flow\non:\n  push: yes\nOff: no\nenabled: on\n")
    assert doc.data == {"kind": "Flow", "on": {"push": True}, "Off": False, "enabled": True}
    assert doc.lines[("on", "push")] == 3


def test_dates_stay_text() -> None:
    (doc,) = load_text("kind: Flow\nsince: 2024-01-31\n2024-02-01: key\n")
    assert doc.data == {"kind": "Flow", "since": "2024-01-31", "2024-02-01": "key"}


@pytest.mark.parametrize(
    "value",
    [
        '!!python/object/apply:os.system ["echo hi"]',
        "!!python/name:os.system",
        "!!python/object/new:os.system [echo hi]",
        "!!binary aGk=",
        "!custom thing",
    ],
)
def test_python_and_other_tags_are_rejected_without_running(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    def refuse(*args: object) -> int:
        raise AssertionError("os.system must never be called")

    monkeypatch.setattr(os, "system", refuse)
    (problem,) = problems_of(f"kind: Flow\nspec:\n  run: {value}\n")
    assert problem.path == "spec.run"
    assert problem.line == 3
    assert problem.message.startswith("unsupported tag ")


def test_badly_tagged_scalar_is_an_error() -> None:
    (problem,) = problems_of("kind: Flow\nretries: !!int many\n")
    assert (problem.path, problem.message) == ("retries", "cannot read 'many' as !!int")


def test_anchors_aliases_and_merge_keys_work() -> None:
    (doc,) = load_text(
        yaml_text(
            """
            kind: Flow
            defaults: &defaults
              retries: 3
              timeout: 10
            steps:
              - <<: *defaults
                timeout: 20
              - env: &env [A, B]
                again: *env
            """
        )
    )
    steps = doc.data["steps"]
    assert steps[0] == {"retries": 3, "timeout": 20}
    assert doc.lines[("steps", 0, "timeout")] == 7
    assert doc.lines[("steps", 0, "retries")] == 3  # where the merged value is written
    assert steps[1]["again"] == ["A", "B"]
    assert steps[1]["again"] is not steps[1]["env"]  # each use is its own copy


def test_alias_bomb_is_refused() -> None:
    lines = ["kind: Flow", "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for level, prev in zip("bcdefghi", "abcdefgh", strict=True):
        lines.append(f"{level}: &{level} [" + ", ".join([f"*{prev}"] * 10) + "]")
    (problem,) = problems_of("\n".join(lines) + "\n")
    assert problem.line == 1
    assert problem.message == (
        f"aliases expand to over {MAX_ALIAS_NODES} nodes; refusing the document"
    )


def test_moderate_alias_use_is_fine() -> None:
    text = "kind: Flow\na: &a [1, 2, 3]\n" + "".join(f"k{i}: *a\n" for i in range(100))
    (doc,) = load_text(text)
    assert doc.data["k99"] == [1, 2, 3]


def test_recursive_alias_is_refused() -> None:
    (problem,) = problems_of("kind: Flow\nloop: &loop\n  again: *loop\n")
    assert problem.path == "loop.again"
    assert "contains it" in problem.message


def test_billion_laughs_is_refused_quickly_and_in_little_memory() -> None:
    # Nine levels of ten aliases: 10**9 strings if expanded. Composing keeps aliases as
    # references; building stops after MAX_ALIAS_NODES copies.
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level, prev in zip("bcdefghij", "abcdefghi", strict=True):
        lines.append(f"{level}: &{level} [" + ", ".join([f"*{prev}"] * 10) + "]")
    text = "kind: Flow\n" + "\n".join(lines) + "\n"
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(DefinitionError, match="aliases expand to over"):
            load_text(text, "bomb.yaml")
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 5 and peak < 50 * 2**20, (elapsed, peak)


def test_merge_keys_count_towards_alias_expansion() -> None:
    lines = ["a: &a {" + ", ".join(f"k{i}: {i}" for i in range(100)) + "}"]
    for level, prev in zip("bcdef", "abcde", strict=True):
        lines.append(
            f"{level}: &{level} [" + ", ".join(f"{{<<: *{prev}}}" for _ in range(10)) + "]"
        )
    with pytest.raises(DefinitionError, match="aliases expand to over"):
        load_text("kind: Flow\n" + "\n".join(lines) + "\n")


def _nested_yaml(levels: int) -> str:
    """A document whose value ``v`` makes it ``levels`` mappings and lists deep."""
    return "kind: Flow\nv: " + "[" * (levels - 1) + "]" * (levels - 1) + "\n"


def test_nesting_up_to_the_limit_loads() -> None:
    (doc,) = load_text(_nested_yaml(MAX_NESTING))
    value, depth = doc.data, 1
    value = value["v"]
    while value:
        value, depth = value[0], depth + 1
    assert depth == MAX_NESTING - 1  # the innermost list is empty: level MAX_NESTING


@pytest.mark.parametrize("levels", [MAX_NESTING + 1, 5_000, 200_000])
def test_yaml_nested_beyond_the_limit_is_refused_naming_it(levels: int) -> None:
    (problem,) = problems_of(_nested_yaml(levels), "deep.yaml")
    assert problem.file == "deep.yaml" and problem.line == 2
    assert problem.message == (
        f"the document is nested more than {MAX_NESTING} levels deep (mappings and lists); "
        "refusing it"
    )


def test_block_style_nesting_is_refused_too() -> None:
    text = "".join("  " * i + f"k{i}:\n" for i in range(MAX_NESTING + 5)) + "  " * 105 + "x\n"
    (problem,) = problems_of(text, "deep.yaml")
    assert "nested more than 100 levels" in problem.message
    assert problem.line == MAX_NESTING + 1


def test_aliases_cannot_build_deeper_than_the_limit() -> None:
    # Each anchor is 60 levels deep (within the limit); using one inside the other is 120.
    inner = "[" * 59 + "]" * 59
    text = f"kind: Flow\na: &a {inner}\nb: " + "[" * 59 + "*a" + "]" * 59 + "\n"
    (problem,) = problems_of(text, "alias.yaml")
    assert problem.message.startswith(f"the document is nested more than {MAX_NESTING} levels")
    assert problem.path.startswith("b[0][0]")


def test_all_structural_problems_of_a_file_are_reported_together() -> None:
    problems = problems_of("kind: Flow\nkind: Job\n---\n[1]\n")
    assert [p.line for p in problems] == [2, 4]


# --------------------------------------------------------------------------- files


def test_load_path_yaml(tmp_path: Path) -> None:
    path = tmp_path / "flow.yaml"
    path.write_text(yaml_text(FLOW))
    (doc,) = load_path(path)
    assert doc.file == str(path)
    assert doc.line_of(("spec", "steps", 0, "task")) == 8


def test_json_file_has_lines_and_json_numbers(tmp_path: Path) -> None:
    path = tmp_path / "flow.json"
    path.write_text('{\n  "kind": "Flow",\n  "spec": {\n    "on": true,\n    "big": 1e5\n  }\n}\n')
    (doc,) = load_path(path)
    assert doc.data == {"kind": "Flow", "spec": {"on": True, "big": 100000.0}}
    assert doc.lines[("spec", "on")] == 4
    assert doc.lines[("spec", "big")] == 5


def test_json_that_yaml_cannot_read_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "flow.json"
    path.write_text('{"kind": "Flow", "url": "http:\\/\\/example.com"}')
    (doc,) = load_path(path)
    assert doc.data["url"] == "http://example.com"
    assert doc.line == 1


def test_invalid_json_reports_the_json_line(tmp_path: Path) -> None:
    path = tmp_path / "flow.json"
    path.write_text('{\n  "kind": "Flow",\n  "spec": {,}\n}\n')
    with pytest.raises(DefinitionError) as info:
        load_path(path)
    (problem,) = info.value.problems
    assert (problem.file, problem.line) == (str(path), 3)
    assert problem.message.startswith("invalid JSON: ")


@pytest.mark.parametrize("levels", [MAX_NESTING + 1, 100_000])
def test_json_nested_beyond_the_limit_is_refused_before_json_loads(
    tmp_path: Path, levels: int
) -> None:
    path = tmp_path / "deep.json"
    value = "[" * levels + "]" * levels
    path.write_text('{"kind": "Flow",\n "strings": "[[[{{{\\"[[[",\n "v": ' + value[1:-1] + "}")
    with pytest.raises(DefinitionError) as info:
        load_path(path)
    (problem,) = info.value.problems
    assert (problem.file, problem.line) == (str(path), 3)
    assert f"nested more than {MAX_NESTING} levels deep" in problem.message


def test_json_nested_to_the_limit_loads_and_brackets_in_strings_do_not_count(
    tmp_path: Path,
) -> None:
    path = tmp_path / "deep.json"
    value = "[" * (MAX_NESTING - 1) + "]" * (MAX_NESTING - 1)
    path.write_text('{"kind": "Flow", "s": "[[[[\\"[[[[", "v": ' + value + "}")
    (doc,) = load_path(path)
    assert doc.data["s"] == '[[[["[[[['


def test_json_with_an_integer_python_cannot_read_is_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    path.write_text('{"kind": "Flow", "n": 1' + "0" * 5000 + "}")
    with pytest.raises(DefinitionError) as info:
        load_path(path)
    (problem,) = info.value.problems
    assert problem.message.startswith("invalid JSON: Exceeds the limit (4300 digits)")


def test_file_over_max_bytes_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("kind: Flow\n" + "# padding\n" * 1000)
    size = path.stat().st_size
    with pytest.raises(DefinitionError) as info:
        load_path(path, max_bytes=size - 1)
    (problem,) = info.value.problems
    assert problem.file == str(path)
    assert problem.message == (
        f"the file is {size:,} bytes, over the limit of {size - 1:,} "
        "(ORCHESTRATOR_MAX_DEFINITION_BYTES)"
    )
    assert load_path(path, max_bytes=size)[0].data == {"kind": "Flow"}


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a named pipe")
def test_pipe_is_read_only_up_to_max_bytes(tmp_path: Path) -> None:
    pipe = tmp_path / "flow.yaml"
    os.mkfifo(pipe)
    written: list[int] = []

    def write() -> None:
        try:
            with open(pipe, "wb") as f:
                for _ in range(100):  # 100 KiB, far over the limit
                    written.append(f.write(b"# " + b"x" * 1021 + b"\n"))
        except BrokenPipeError:  # the reader stopped reading: what should happen
            pass

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    with pytest.raises(DefinitionError) as info:
        load_path(pipe, max_bytes=4096)
    writer.join(10)
    assert sum(written) < 100 * 1024  # it stopped reading at the limit
    (problem,) = info.value.problems
    assert problem.message == (
        "the file is over the limit of 4,096 bytes (ORCHESTRATOR_MAX_DEFINITION_BYTES)"
    )


def test_text_over_max_bytes_is_refused_counting_utf8_bytes() -> None:
    text = "kind: Flow\nname: " + "é" * 600 + "\n"  # 618 characters, 1218 bytes
    with pytest.raises(DefinitionError) as info:
        load_text(text, "t.yaml", max_bytes=1024)
    (problem,) = info.value.problems
    assert problem.message == (
        "the definition is 1,218 bytes, over the limit of 1,024 (ORCHESTRATOR_MAX_DEFINITION_BYTES)"
    )
    assert load_text(text, max_bytes=1218)[0].data["name"] == "é" * 600


def test_json_duplicate_keys_are_caught(tmp_path: Path) -> None:
    path = tmp_path / "flow.json"
    path.write_text('{\n  "kind": "Flow",\n  "kind": "Job"\n}\n')
    with pytest.raises(DefinitionError) as info:
        load_path(path)
    assert info.value.problems[0].line == 3


def test_unreadable_file_raises(tmp_path: Path) -> None:
    with pytest.raises(DefinitionError, match="cannot read"):
        load_path(tmp_path / "missing.yaml")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"kind: \xff\xfe\n")
    with pytest.raises(DefinitionError, match="not UTF-8"):
        load_path(binary)


def test_iter_definition_files(tmp_path: Path) -> None:
    for name in [
        "b.yaml",
        "a.yml",
        "c.json",
        "notes.txt",
        "sub/deeper/z.yaml",
        "sub/a.YAML",
        "sub/readme.md",
        ".hidden/x.yaml",
    ]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("kind: Flow\n")
    single = tmp_path / "notes.txt"
    found = iter_definition_files([tmp_path, single, tmp_path / "b.yaml"])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "a.yml",
        "b.yaml",
        "c.json",
        "sub/a.YAML",
        "sub/deeper/z.yaml",
        "notes.txt",  # named explicitly, so taken whatever its suffix
    ]


def test_iter_definition_files_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DefinitionError) as info:
        iter_definition_files([tmp_path, missing])
    (problem,) = info.value.problems
    assert problem.file == str(missing)
    assert "no such file" in problem.message


# --------------------------------------------------------------------------- validation errors


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskStep(Strict):
    kind: Literal["task"]
    task: str
    retries: int = 0
    with_: dict[str, str] = Field(default_factory=dict, alias="with")


class WaitStep(Strict):
    kind: Literal["wait"]
    seconds: float


class Spec(Strict):
    mode: Literal["serial", "parallel", "race"] = "serial"
    steps: list[Annotated[TaskStep | WaitStep, Field(discriminator="kind")]]
    label: int | str = 0


class Metadata(Strict):
    name: str


class Resource(Strict):
    apiVersion: str
    kind: str
    metadata: Metadata
    spec: Spec


def validate(text: str, **kwargs: object) -> tuple[SourceDoc, list[Problem]]:
    (doc,) = load_text(yaml_text(text), "flow.yaml")
    with pytest.raises(ValidationError) as info:
        Resource.model_validate(doc.data)
    return doc, problems_from_validation_error(info.value, doc, **kwargs)  # type: ignore[arg-type]


BAD_FLOW = """
apiVersion: orchestrator/v1
kind: Flow
metadata: {}
spec:
  mode: sideways
  steps:
    - kind: task
      task: http.get
      retries: lots
      with:
        url: [1, 2]
      retires: 3
    - kind: wait
      seconds: soon
    - kind: sleep
    - kind: task
  label: [x]
"""


def test_validation_problems_have_real_paths_lines_and_messages() -> None:
    _, problems = validate(BAD_FLOW)
    got = {(p.path, p.line): p.message for p in problems}
    assert all(p.file == "flow.yaml" for p in problems)
    assert got == {
        ("metadata.name", 3): "required field 'name' is missing",
        ("spec.mode", 5): "expected one of 'serial', 'parallel', 'race'; got 'sideways'",
        ("spec.steps[0].retries", 9): "expected an integer, got a string 'lots'",
        ("spec.steps[0].with.url", 11): "expected a string, got a list",
        ("spec.steps[0].retires", 12): "unknown field 'retires'",
        ("spec.steps[1].seconds", 14): "expected a number, got a string 'soon'",
        ("spec.steps[2].kind", 15): "expected one of 'task', 'wait'; got 'sleep'",
        ("spec.steps[3].task", 16): "required field 'task' is missing",
        ("spec.label", 17): "expected an integer or a string, got a list",
    }


def test_did_you_mean_uses_known_fields() -> None:
    seen: list[tuple] = []

    def known_fields(loc: tuple) -> list[str]:
        seen.append(loc)
        return ["kind", "task", "retries", "with"]

    _, problems = validate(BAD_FLOW, known_fields=known_fields)
    (unknown,) = [p for p in problems if p.path == "spec.steps[0].retires"]
    assert unknown.message == "unknown field 'retires'; did you mean 'retries'?"
    assert seen == [("spec", "steps", 0, "task")]  # pydantic's loc, union tag included


def test_yaml_boolean_given_for_a_string_gets_a_hint() -> None:
    _, problems = validate(
        """
        apiVersion: orchestrator/v1
        kind: Flow
        metadata:
          name: no
        spec:
          steps: []
        """
    )
    (problem,) = problems
    assert (problem.path, problem.line) == ("metadata.name", 4)
    assert problem.message == (
        "expected a string, got a boolean false (quote the value to keep it as text)"
    )


def test_tag_equal_to_a_key_name_is_still_stripped() -> None:
    # pydantic's loc here is ("spec", "steps", 0, "task", "task"): a tag, then the real key.
    _, problems = validate(
        """
        apiVersion: orchestrator/v1
        kind: Flow
        metadata: {name: x}
        spec:
          steps:
            - kind: task
              task: 5
        """
    )
    (problem,) = problems
    assert (problem.path, problem.line) == ("spec.steps[0].task", 7)


def test_base_path_prefixes_the_path() -> None:
    (doc,) = load_text(yaml_text(BAD_FLOW), "flow.yaml")
    with pytest.raises(ValidationError) as info:
        Spec.model_validate(doc.data["spec"])
    problems = problems_from_validation_error(info.value, doc, base_path=("spec",))
    assert ("spec.steps[1].seconds", 14) in {(p.path, p.line) for p in problems}


def test_other_messages_pass_through_without_prefix() -> None:
    from pydantic import field_validator

    class Named(Strict):
        name: str

        @field_validator("name")
        @classmethod
        def lower(cls, value: str) -> str:
            if value != value.lower():
                raise ValueError("must be lower case")
            return value

    (doc,) = load_text("name: Demo\n")
    with pytest.raises(ValidationError) as info:
        Named.model_validate(doc.data)
    (problem,) = problems_from_validation_error(info.value, doc)
    assert (problem.path, problem.line, problem.message) == ("name", 1, "must be lower case")


def test_single_literal_and_missing_top_level_field() -> None:
    class Versioned(Strict):
        apiVersion: Literal["orchestrator/v1"]
        kind: str

    (doc,) = load_text("\n\napiVersion: v2\n", "v.yaml")
    with pytest.raises(ValidationError) as info:
        Versioned.model_validate(doc.data)
    problems = problems_from_validation_error(info.value, doc)
    assert [(p.path, p.line, p.message) for p in problems] == [
        ("apiVersion", 3, "expected 'orchestrator/v1'; got 'v2'"),
        ("kind", 3, "required field 'kind' is missing"),
    ]


def test_format_path() -> None:
    assert format_path(("spec", "steps", 0, "with", "x")) == "spec.steps[0].with.x"
    assert format_path(()) == ""
    assert format_path((0, "a")) == "[0].a"
    assert format_path(("env", "a.b")) == 'env["a.b"]'
