"""Tests for orchestrator.expressions: templates, conditions, functions and the sandbox."""

from __future__ import annotations

import re
import textwrap
import time
import tracemalloc
from typing import Any

import pytest

from orchestrator import expressions
from orchestrator.errors import DefinitionError, ExpressionError
from orchestrator.expressions import (
    check,
    evaluate_condition,
    parse_condition,
    parse_template,
    render,
    step_refs,
)
from orchestrator.loader import load_string

CTX: dict[str, Any] = {
    "inputs": {
        "name": "Ada",
        "count": 3,
        "ratio": 1.5,
        "flag": True,
        "nothing": None,
        "tags": ["a", "b"],
        "since": "2024-01-01",
        "accent": "é",
    },
    "steps": {
        "fetch": {
            "output": {"items": [1, 2, 3], "keys": ["k"], "meta": {"page": 1}},
            "status": "succeeded",
            "error": None,
            "attempts": 2,
        },
    },
    "vars": {"limit": 10},
    "run": {"id": "run-1", "flow": "demo"},
    "item": {"id": 7},
    "index": 4,
    "error": {"type": "ValueError", "message": "boom"},
}


def ev(text: str, context: dict[str, Any] = CTX) -> Any:
    return parse_template(text).evaluate(context)


# -- values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("${inputs.count}", 3),
        ("${inputs.ratio}", 1.5),
        ("${inputs.tags}", ["a", "b"]),
        ("${steps.fetch.output.meta}", {"page": 1}),
        ("${inputs.flag}", True),
        ("${inputs.nothing}", None),
        ("${ inputs.count }", 3),
        ("${[1, inputs.count]}", [1, 3]),
        ('${ {"n": inputs.name} }', {"n": "Ada"}),
        ("${(1, 2)}", (1, 2)),
        ("${true}", True),
        ("${false}", False),
        ("${null}", None),
        ("${True}", True),
        ("${None}", None),
    ],
)
def test_whole_string_keeps_type(text: str, expected: Any) -> None:
    template = parse_template(text)
    assert template.is_expression
    assert template.evaluate(CTX) == expected
    assert type(template.evaluate(CTX)) is type(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hello ${inputs.name}!", "hello Ada!"),
        ("n=${inputs.count}", "n=3"),
        ("r=${inputs.ratio}", "r=1.5"),
        ("flag=${inputs.flag}", "flag=true"),
        ("off=${not inputs.flag}", "off=false"),
        ("x=${inputs.nothing}", "x=null"),
        ("tags=${inputs.tags}", 'tags=["a", "b"]'),
        ("meta=${steps.fetch.output.meta}", 'meta={"page": 1}'),
        ("${inputs.accent}/${ [inputs.accent] }", 'é/["é"]'),
        ("${inputs.name}-${index}", "Ada-4"),
        (" ${inputs.count}", " 3"),
    ],
)
def test_formatting_inside_text(text: str, expected: str) -> None:
    template = parse_template(text)
    assert not template.is_expression
    assert template.evaluate(CTX) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("${inputs.tags[0]}", "a"),
        ("${inputs.tags[-1]}", "b"),
        ("${inputs.tags[0:1]}", ["a"]),
        ('${inputs["name"]}', "Ada"),
        ("${inputs['since']}", "2024-01-01"),
        ('${steps["fetch"].output["items"][1]}', 2),
        ("${steps.fetch.output.items}", [1, 2, 3]),
        ("${steps.fetch.output.keys}", ["k"]),
        ("${steps.fetch.output.meta.page}", 1),
        ("${steps.fetch.status}", "succeeded"),
        ("${steps.fetch.error}", None),
        ("${steps.fetch.attempts}", 2),
        ("${vars.limit}", 10),
        ("${item.id}", 7),
        ("${index}", 4),
        ("${run.id}", "run-1"),
        ("${run.flow}", "demo"),
        ("${error.message}", "boom"),
        ('${ {"a": 1}["a"] }', 1),
        ('${ "}" }', "}"),
        ('${ "a\\"}" }', 'a"}'),
    ],
)
def test_lookups(text: str, expected: Any) -> None:
    assert ev(text) == expected


def test_dotted_access_is_only_item_lookup() -> None:
    assert ev("${inputs.__class__}", {"inputs": {"__class__": "just a key"}}) == "just a key"


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("inputs.count > 2", True),
        ("inputs.count == 3", True),
        ("inputs.count != 3", False),
        ("inputs.count <= 2", False),
        ("1 < inputs.count < 5", True),
        ('"a" in inputs.tags', True),
        ('"z" not in inputs.tags', True),
        ('inputs.name == "Ada"', True),
        ("inputs.flag and inputs.count", 3),
        ('null or "x"', "x"),
        ("not inputs.flag", False),
        ("inputs.nothing is null", True),
        ("inputs.count * 2 + 1", 7),
        ("7 / 2", 3.5),
        ("7 // 2", 3),
        ("7 % 3", 1),
        ("-inputs.count", -3),
        ("2 ** 10", 1024),
        ('"a" + "b"', "ab"),
        ("[1] + [2]", [1, 2]),
        ('"many" if inputs.count > 2 else "few"', "many"),
        ('"many" if inputs.count > 5 else "few"', "few"),
    ],
)
def test_operators(expr: str, expected: Any) -> None:
    assert ev("${" + expr + "}") == expected


# -- functions ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("len(inputs.tags)", 2),
        ("str(inputs.count)", "3"),
        ("str(inputs.flag)", "true"),
        ("str(inputs.tags)", '["a", "b"]'),
        ('int("42")', 42),
        ('float("1.5")', 1.5),
        ("bool(0)", False),
        ("abs(-3)", 3),
        ("min(3, 1, 2)", 1),
        ("max(inputs.tags)", "b"),
        ("sum(steps.fetch.output.items)", 6),
        ("round(2.567, 1)", 2.6),
        ('lower("AbC")', "abc"),
        ("upper(inputs.name)", "ADA"),
        ('join(inputs.tags, ", ")', "a, b"),
        ('join([1, true, null], "-")', "1-true-null"),
        ("keys(steps.fetch.output.meta)", ["page"]),
        ("values(steps.fetch.output.meta)", [1]),
        ('contains(inputs.tags, "a")', True),
        ('contains("hello", "ell")', True),
        ('contains(inputs, "since")', True),
        ('contains(inputs, "until")', False),
        ('default(inputs.nothing, "x")', "x"),
        ('default(inputs.name, "x")', "Ada"),
        ("default(0, 5)", 0),
    ],
)
def test_functions(expr: str, expected: Any) -> None:
    assert ev("${" + expr + "}") == expected


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("now()", "unknown function 'now'"),
        ("lower(1)", "lower() needs a string, got an int"),
        ("keys(inputs.tags)", "keys() needs a mapping, got a list"),
        ("join(inputs.tags, 1)", "join() needs a string separator"),
        ("round(1.25, ndigits=1)", "keyword arguments are not allowed"),
        ('int("x")', "invalid literal"),
    ],
)
def test_function_errors(expr: str, message: str) -> None:
    with pytest.raises(ExpressionError, match=re.escape(message)):
        ev("${" + expr + "}")


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("${inputs.foo}", "inputs has no field 'foo'"),
        ('${inputs["foo"]}', "inputs has no field 'foo'"),
        ("${steps.fetch.output.nope}", "steps.fetch.output has no field 'nope'"),
        ("${steps.other.output}", "steps has no field 'other'"),
        ("${inputs.tags[5]}", "inputs.tags has no index 5"),
        ("${inputs.name.upper}", "inputs.name is a str, not a mapping"),
        ("${inputs.nothing.x}", "inputs.nothing is null, not a mapping"),
        ("${1 / 0}", "division by zero"),
        ('${1 + "a"}', "unsupported operand"),
    ],
)
def test_evaluation_errors_name_expression_and_problem(text: str, message: str) -> None:
    with pytest.raises(ExpressionError) as info:
        ev(text)
    assert message in str(info.value)
    assert repr(text) in str(info.value)


def test_root_missing_from_context() -> None:
    with pytest.raises(ExpressionError, match="'item' is not available here"):
        ev("${item.id}", {"inputs": {}})


@pytest.mark.parametrize("text", ["${foo}", "${inputs.x + foo.y}", "${len}", "${list}"])
def test_unknown_name(text: str) -> None:
    with pytest.raises(ExpressionError, match="unknown name"):
        parse_template(text)


@pytest.mark.parametrize("text", ["${inputs.}", "a ${inputs.count +} b", "${1 2}", "${x = 1}"])
def test_syntax_error_mentions_expression(text: str) -> None:
    with pytest.raises(ExpressionError, match="invalid expression") as info:
        parse_template(text)
    assert text[text.index("${") :].split("}")[0] in str(info.value)


def test_empty_expression() -> None:
    with pytest.raises(ExpressionError, match="empty"):
        parse_template("${ }")


@pytest.mark.parametrize("text", ["${inputs.name", "a ${ {'a': 1} b", '${ "}'])
def test_unterminated(text: str) -> None:
    with pytest.raises(ExpressionError, match="unterminated"):
        parse_template(text)


# -- escapes, caching, render -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$${inputs.name}", "${inputs.name}"),
        ("cost $${x} and ${inputs.count}", "cost ${x} and 3"),
        ("$${unterminated", "${unterminated"),
        ("$5 and $$", "$5 and $$"),
        ("$$${inputs.count}", "$${inputs.count}"),
    ],
)
def test_escapes(text: str, expected: str) -> None:
    template = parse_template(text)
    assert not template.is_expression
    assert template.evaluate(CTX) == expected


def test_parse_is_cached() -> None:
    assert parse_template("${inputs.count}") is parse_template("${inputs.count}")


def test_render_nested() -> None:
    value = {
        "${inputs.name}": "${inputs.count}",
        "list": ["x ${inputs.name}", 5, None, {"deep": "${steps.fetch.output.items}"}],
        "tuple": ("${index}",),
        "plain": "no templates",
    }
    assert render(value, CTX) == {
        "${inputs.name}": 3,
        "list": ["x Ada", 5, None, {"deep": [1, 2, 3]}],
        "tuple": (4,),
        "plain": "no templates",
    }


def test_render_leaves_plain_values_alone() -> None:
    text = "nothing to see"
    assert render(text, CTX) is text
    assert render(42, CTX) == 42
    assert render(None, CTX) is None


def test_rendered_value_is_not_rendered_again() -> None:
    assert render("${inputs.x}", {"inputs": {"x": "${inputs.y}"}}) == "${inputs.y}"


# -- references and checking --------------------------------------------------------------


def test_template_step_refs_and_names() -> None:
    template = parse_template(
        "a ${steps.fetch.output} b ${steps[\"load\"].status + steps['x-y'].error} "
        "${steps[vars.which].output} ${inputs.n}"
    )
    assert template.step_refs() == {"fetch", "load", "x-y"}
    assert template.names() == {"steps", "vars", "inputs"}
    assert parse_template("plain").step_refs() == set()


def test_step_refs_of_nested_value() -> None:
    value = {
        "url": "${steps.a.output.url}",
        "rows": ["${steps.b.output}", {"n": 'x ${len(steps["c"].output)}'}],
        "${steps.keyignored.output}": 1,
        "n": 3,
    }
    assert step_refs(value) == {"a", "b", "c"}
    assert step_refs("steps.a.output") == set()
    assert step_refs(None) == set()


def test_check() -> None:
    check({"a": ["${inputs.x}", {"b": "plain"}], "c": 1})
    with pytest.raises(ExpressionError, match="unknown name 'foo'"):
        check({"a": ["${inputs.x}", {"b": "${foo}"}]})
    with pytest.raises(ExpressionError, match="unterminated"):
        check(["fine", "${oops"])


# -- conditions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ("inputs.count > 2", True),
        ("inputs.count > 5", False),
        ("${inputs.count > 2}", True),
        ("  ${inputs.count > 5}\n", False),
        ('steps.fetch.status == "succeeded" and not inputs.nothing', True),
        ("inputs.tags", True),
        ("true", True),
        ("false", False),
        (True, True),
        (False, False),
    ],
)
def test_conditions(condition: str | bool, expected: bool) -> None:
    assert evaluate_condition(condition, CTX) is expected


def test_condition_template_reports_refs() -> None:
    assert parse_condition("steps.a.output > 1 and steps.b.status").step_refs() == {"a", "b"}
    assert parse_condition('${steps["c"].output}').step_refs() == {"c"}


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        ("${inputs.count} > 2", "must be a single"),
        ("inputs.count >", "invalid expression"),
        ("", "empty"),
        (1, "must be a string or a boolean"),
    ],
)
def test_bad_conditions(condition: Any, message: str) -> None:
    with pytest.raises(ExpressionError, match=message):
        parse_condition(condition)


# -- sandbox ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expr",
    [
        '"".__class__.__mro__',
        "inputs.__class__",
        "().__class__.__bases__[0].__subclasses__()",
        '__import__("os")',
        'open("/etc/passwd")',
        "(lambda: 1)()",
        "[x for x in (1, 2)]",
        "{x: 1 for x in (1, 2)}",
        "9**9**9",
        '"a"*10**9',
        "[1]*10**9",
        'getattr(inputs, "x")',
        'eval("1")',
        'exec("1")',
        "inputs.f()",
        "inputs.f",
        "inputs.name.upper()",
        "inputs.keys()",
        "f.__globals__",
        "(1).real",
        'f"{inputs}"',
        "max(*inputs.tags)",
        "[*inputs.tags]",
        "{**inputs}",
        "(x := 1)",
        "{1, 2}",
        "str.join",
        "type(inputs)",
        "len.__self__",
        "import os",
        "inputs.f.__globals__",
        "default.__globals__",
    ],
)
def test_sandbox_escapes_are_refused(expr: str) -> None:
    context = {"inputs": {"name": "x", "tags": ["a"]}}
    with pytest.raises(ExpressionError):
        ev("${" + expr + "}", context)


def test_context_values_are_never_called() -> None:
    calls: list[Any] = []
    context = {"inputs": {"f": lambda *a: calls.append(a)}}
    for expr in ("inputs.f()", "inputs.f(1)", 'inputs["f"]()', "max([1], key=inputs.f)"):
        with pytest.raises(ExpressionError):
            ev("${" + expr + "}", context)
    assert calls == []


# -- limits: no expression may exhaust CPU or memory ----------------------------------------

BIG: dict[str, Any] = {
    "inputs": {
        "one": 1,
        "flag": False,
        "row": [0] * 100_000,
        "n": 100_000,
        "base": 4_000_000,
        "x": "x",
        "billion": 10**9,
        "k": 100_000,
        "sep": "-" * 100_000,
        "items": ["a"] * 100,
        "text": "t" * 1_000_000,
        "huge": 10**5000,  # more digits than Python formats (4300), as a Python task may return
        "doc": {"rows": [{"id": i, "name": f"row {i}"} for i in range(40_000)]},  # ~1.3 MB
    }
}


def bounded(text: str, context: dict[str, Any] | None = None, match: str | None = None) -> str:
    """The ExpressionError that parsing (and evaluating, given a context) ``text`` raises,
    which must come within 0.5 s, and having allocated 20 MB at most."""

    def attempt() -> str:
        with pytest.raises(ExpressionError, match=match) as info:
            template = parse_template(text)
            if context is not None:
                template.evaluate(context)
        return str(info.value)

    started = time.perf_counter()
    message = attempt()
    elapsed = time.perf_counter() - started
    assert elapsed < 0.5, f"{text[:60]} took {elapsed:.2f} s"
    tracemalloc.start()  # apart: it slows down allocating (json.dumps 20 times: MAX_SECONDS)
    try:
        attempt()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000, f"{text[:60]} allocated {peak / 1e6:.0f} MB"
    return message


def refused(text: str, context: dict[str, Any] = BIG) -> str:
    return bounded(text, context)


@pytest.mark.parametrize(
    ("text", "limit"),
    [
        # the four of the issue: each operand is within simpleeval's own limits
        ("${4000000**4000000 > 0}", "MAX_INT_BITS"),
        ("${len(str([[0]*100000]*100000))}", "MAX_VALUE_SIZE"),
        ("${len(sum([[0]*100000]*100000, []))}", "MAX_VALUE_SIZE"),
        ("${max([[0]*100000]*100000)}", "MAX_VALUE_SIZE"),
        # more of the same kind
        ("${'x' * 10**9}", "MAX_STRING_LENGTH"),
        ("${str(10**100000)}", "MAX_INT_BITS"),
        ("${10**4000000}", "MAX_INT_BITS"),
        ("${(-3)**3000000}", "MAX_INT_BITS"),
        ("${2**10000 * 2**10000}", "MAX_INT_BITS"),
        ("${1 << 20000}", "MAX_INT_BITS"),
        ("${2 ** 10**400}", "MAX_INT_BITS"),
        ("${1 << 10**400}", "MAX_INT_BITS"),
        ("${[[[0]*1000]*1000]*1000}", "MAX_VALUE_SIZE"),
        ("${str([[0]*100000]*20)}", "MAX_VALUE_SIZE"),
        ("${len(sum([[0]*100000]*1000, []))}", "MAX_VALUE_SIZE"),
        ("${[0]*300000 + [0]*300000 + [0]*300000}", "MAX_VALUE_SIZE"),
        ("${(0,) * 10**9}", "MAX_VALUE_SIZE"),
        ("${'ab' * 600000 + 'cd' * 600000}", "MAX_STRING_LENGTH"),
        ("${int('9' * 5000)}", "MAX_INT_BITS"),
    ],
)
def test_static_bombs_are_refused_when_parsed(text: str, limit: str) -> None:
    message = bounded(text, match="invalid expression")  # parsed only: it reads nothing
    assert limit in message and text in message


@pytest.mark.parametrize(
    ("text", "limit"),
    [
        ("${inputs.base ** inputs.base > 0}", "MAX_INT_BITS"),
        ("${len(str([inputs.row] * inputs.n))}", "MAX_VALUE_SIZE"),
        ("${len(sum([inputs.row] * inputs.n, []))}", "MAX_VALUE_SIZE"),
        ("${max([inputs.row] * inputs.n)}", "MAX_VALUE_SIZE"),
        ("${len(sum([inputs.row] * 1000, []))}", "MAX_VALUE_SIZE"),
        ("${sum([" + ", ".join(["inputs.row"] * 7) + "], [])}", "MAX_VALUE_SIZE"),
        ("${inputs.row * 7}", "MAX_VALUE_SIZE"),
        ("${inputs.x * inputs.billion}", "MAX_STRING_LENGTH"),
        ("${str(10 ** inputs.k)}", "MAX_INT_BITS"),
        ("${inputs.one << inputs.k}", "MAX_INT_BITS"),
        ("${join(inputs.items, inputs.sep)}", "MAX_STRING_LENGTH"),
        ("${str([inputs.text, inputs.text, inputs.text])}", "MAX_STRING_LENGTH"),
        ("${inputs.text + inputs.text + inputs.text}", "MAX_STRING_LENGTH"),
        ("${upper(inputs.text + inputs.text + 'x')}", "MAX_STRING_LENGTH"),
        ("${ {'a': inputs.text} | {'b': inputs.text} | {'c': inputs.text} }", "SIZE"),
        ("${str(inputs.huge)}", "MAX_INT_BITS"),
        ("n=${inputs.huge}", "MAX_INT_BITS"),
        ("${inputs.text}${inputs.text}${inputs.text}", "MAX_STRING_LENGTH"),
    ],
)
def test_bombs_built_from_inputs_are_refused(text: str, limit: str) -> None:
    message = refused(text)
    assert limit in message
    assert text[text.index("${") :][:30] in message  # the expression, or the text, that failed


@pytest.mark.parametrize(
    "text",
    ["n=${inputs.nums}", "${str(inputs.nums)}", "${join(inputs.nums, ',')}"],
)
def test_int_too_long_to_format_inside_a_list_is_an_expression_error(text: str) -> None:
    # Python refuses to format an int of over 4300 digits with ValueError: never a crash
    message = refused(text, {"inputs": {"nums": [1, 10**5000]}})
    assert "digits" in message or "MAX_INT_BITS" in message


def test_printf_formatting_of_strings_is_refused() -> None:
    assert "%-formatting" in refused("${'%0999999999d' % 1}")
    assert "%-formatting" in refused("${inputs.x % inputs.one}")
    assert ev("${7 % 3}") == 1 and ev("${7.5 % 2}") == 1.5


def test_round_to_a_huge_negative_precision_is_quick() -> None:
    started = time.perf_counter()
    assert ev("${round(5, -10**8)}") == 0
    assert ev("${round(inputs.count, -10**8)}") == 0
    assert time.perf_counter() - started < 0.5
    assert ev("${round(15, -1)}") == 20 and ev("${round(2.567, 1)}") == 2.6


def test_work_budget_bounds_many_allowed_operations() -> None:
    # each str() is within the limits, twelve of them are not
    text = "${" + " + ".join(["len(str(inputs.doc))"] * 12) + "}"
    assert "MAX_WORK" in refused(text)
    assert ev("${len(str(inputs.doc))}", BIG) > 1_000_000


def test_one_render_is_one_budget() -> None:
    fields = {f"f{i}": "${len(str(inputs.doc))}" for i in range(12)}
    started = time.perf_counter()
    with pytest.raises(ExpressionError, match="MAX_WORK"):
        render(fields, BIG)
    assert time.perf_counter() - started < 0.5
    # a fresh render starts a fresh budget
    few = dict(list(fields.items())[:3])
    assert render(few, BIG) == render(few, BIG)


def test_time_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    text = "${" + " + ".join(["inputs.count"] * 200) + "}"
    assert ev(text) == 600
    monkeypatch.setattr(expressions, "MAX_SECONDS", 0.0)
    with pytest.raises(ExpressionError, match="MAX_SECONDS"):
        ev(text)


def test_limits_leave_ordinary_big_values_alone() -> None:
    assert len(ev("${[0] * 100000}")) == 100000
    assert len(ev("${'x' * 1000000}")) == 1000000
    assert ev("${[1, 2] * 2}") == [1, 2, 1, 2]
    assert ev("${3 * 'ab'}") == "ababab"
    assert ev("${2 ** 1000}") == 2**1000
    assert ev("${str(2 ** 10000)}") == str(2**10000)
    assert ev("${int('9' * 4000)}") == int("9" * 4000)
    assert ev("${1 >> 10**100}") == 0
    assert ev("${sum([[1], [2, 3]], [])}") == [1, 2, 3]
    assert ev("${sum([1, 2.5])}") == 3.5
    assert ev("${inputs.tags + ['c']}") == ["a", "b", "c"]
    assert ev("${ {'a': 1} | {'b': 2} }") == {"a": 1, "b": 2}
    assert ev("${max([[1, 2], [1, 3]])}") == [1, 3]
    assert ev("${[inputs.tags] * 2 == [['a', 'b'], ['a', 'b']]}") is True
    assert ev("${join([inputs.tags, 1], '; ')}") == '["a", "b"]; 1'
    doc = ev("x ${inputs.doc}", BIG)
    assert doc.startswith('x {"rows": [{"id": 0') and len(doc) > 1_000_000
    assert ev("${steps.fetch.output.items[0:2] + [9]}") == [1, 2, 9]


def test_static_parts_of_an_expression_are_checked_when_parsed() -> None:
    for text in (
        "${inputs.flag or len([[0]*100000]*100000)}",
        "${default(inputs.x, 'x' * 10**9)}",
        "${inputs.tags[0:2**100000]}",
    ):
        with pytest.raises(ExpressionError, match="invalid expression"):
            parse_template(text)
    with pytest.raises(ExpressionError, match="MAX_INT_BITS"):
        parse_condition("inputs.count > 4000000**4000000")
    with pytest.raises(ExpressionError, match="MAX_VALUE_SIZE"):
        check({"a": ["${inputs.x}", {"b": "x ${[[0]*100000]*100000}"}]})
    # other failures of a static part are still reported where it runs
    template = parse_template("${inputs.flag and 1 / 0}")
    assert template.evaluate(BIG) is False
    with pytest.raises(ExpressionError, match="division by zero"):
        template.evaluate(CTX)


def test_loader_reports_a_static_bomb_with_its_field_path() -> None:
    text = textwrap.dedent(
        """\
        apiVersion: orchestrator/v1
        kind: Flow
        metadata:
          name: demo
        spec:
          steps:
            - id: a
              task: x.a
              when: "${4000000**4000000 > 0}"
              with:
                x: "${len(str([[0]*100000]*100000))}"
        """
    )
    started = time.perf_counter()
    with pytest.raises(DefinitionError) as info:
        load_string(text, file="flows/demo.yaml")
    assert time.perf_counter() - started < 0.5
    found = {p.path: p.message for p in info.value.problems}
    assert "MAX_INT_BITS" in found["spec.steps[0].when"]
    (with_path,) = [path for path in found if path.startswith("spec.steps[0].with")]
    assert "MAX_VALUE_SIZE" in found[with_path]


def test_the_evaluation_budget_is_a_setting() -> None:
    """``configure`` (the worker calls it from ORCHESTRATOR_EXPRESSION_MAX_WORK) moves the
    budget, and the error names the setting."""
    from orchestrator import expressions

    before = expressions.MAX_WORK
    try:
        expressions.configure(max_work=20_000)
        with pytest.raises(ExpressionError, match="ORCHESTRATOR_EXPRESSION_MAX_WORK = 20000"):
            expressions.render("${len(str(inputs.xs))}", {"inputs": {"xs": list(range(20_000))}})
    finally:
        expressions.configure(max_work=before)
    assert expressions.render("${len(inputs.xs)}", {"inputs": {"xs": [1, 2]}}) == 2
