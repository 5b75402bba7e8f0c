"""Typed tools: schemas from type hints, validation by pydantic, errors go to the model."""

from __future__ import annotations

import asyncio
import pickle
from typing import Literal

import pydantic
import pytest
from ray import cloudpickle

from overstory import Agent, ConfigError, Tool, ToolCall, ToolDefinitionError


class Address(pydantic.BaseModel):
    city: str
    zip_code: str


def book(city: str, nights: int, room: Literal["single", "double"] = "single") -> str:
    """Book a hotel room.

    More detail that the model does not need.
    """
    return f"{nights} nights in a {room} room in {city}"


def ship(to: Address, express: bool = False) -> dict[str, object]:
    """Ship a parcel."""
    return {"city": to.city, "express": express}


def broken(x: int) -> int:
    """Always fails."""
    raise RuntimeError(f"disk on fire near {x}")


async def slow_double(x: float) -> float:
    """Double, asynchronously."""
    await asyncio.sleep(0)
    return x * 2


def run(tool: Tool, **arguments: object) -> tuple[str, bool]:
    ret = asyncio.run(tool.run(ToolCall(id="c1", name=tool.name, arguments=dict(arguments))))
    assert ret.tool_call_id == "c1"
    return ret.content, ret.is_error


def test_schema_comes_from_type_hints_and_docstring() -> None:
    definition = Tool(book).definition
    assert definition.name == "book"
    assert definition.description == "Book a hotel room."
    assert definition.parameters == {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "nights": {"type": "integer"},
            "room": {"enum": ["single", "double"], "type": "string", "default": "single"},
        },
        "required": ["city", "nights"],
        "additionalProperties": False,
    }


def test_nested_models_are_in_the_schema_and_validated() -> None:
    tool = Tool(ship)
    assert "Address" in tool.definition.parameters["$defs"]
    assert run(tool, to={"city": "Oslo", "zip_code": "0150"}) == (
        '{"city": "Oslo", "express": false}',
        False,
    )
    content, is_error = run(tool, to={"city": "Oslo"})
    assert is_error
    assert "to.zip_code: Field required" in content


def test_arguments_are_validated_and_coerced() -> None:
    tool = Tool(book)
    assert run(tool, city="Rome", nights="3") == ("3 nights in a single room in Rome", False)


@pytest.mark.parametrize(
    ("arguments", "problem"),
    [
        ({"city": "Rome"}, "nights: Field required"),
        ({"city": "Rome", "nights": "many"}, "nights: Input should be a valid integer"),
        (
            {"city": "Rome", "nights": 1, "room": "suite"},
            "room: Input should be 'single' or 'double'",
        ),
        ({"city": "Rome", "nights": 1, "pets": 2}, "pets: Extra inputs are not permitted"),
    ],
)
def test_bad_arguments_become_an_error_return(arguments: dict[str, object], problem: str) -> None:
    content, is_error = run(Tool(book), **arguments)
    assert is_error
    assert content.startswith("invalid arguments for tool 'book'")
    assert problem in content


def test_a_raising_tool_becomes_an_error_return() -> None:
    assert run(Tool(broken), x=7) == (
        "tool 'broken' raised RuntimeError: disk on fire near 7",
        True,
    )


def test_async_tools_are_awaited() -> None:
    assert run(Tool(slow_double), x=2.5) == ("5.0", False)


def test_unknown_tool_is_an_error_return_listing_the_tools() -> None:
    agent = Agent("a", tools=[book, ship])
    ret = asyncio.run(agent.run_tool(ToolCall(id="c9", name="fly", arguments={})))
    assert ret.is_error
    assert ret.content == "unknown tool 'fly'; available tools: book, ship"


def test_tools_survive_pickling_as_ray_ships_them() -> None:
    tool = pickle.loads(cloudpickle.dumps(Tool(book)))
    assert run(tool, city="Rome", nights=2) == ("2 nights in a single room in Rome", False)


def _untyped(x):  # type: ignore[no-untyped-def]
    return x


def _star(*args: int) -> int:
    return sum(args)


def _kwargs(**kwargs: int) -> int:
    return len(kwargs)


@pytest.mark.parametrize(
    ("function", "problem"),
    [
        (_untyped, "parameter 'x' of tool '_untyped' has no type hint"),
        (_star, "takes *args"),
        (_kwargs, "takes *kwargs/**kwargs"),
        ("not a function", "must be a function"),
    ],
)
def test_tools_that_cannot_be_described_are_refused(function: object, problem: str) -> None:
    with pytest.raises(ToolDefinitionError, match=problem.replace("*", r"\*")):
        Tool(function)  # type: ignore[arg-type]


def test_tool_name_must_be_an_identifier() -> None:
    with pytest.raises(ToolDefinitionError, match="'bad name' must be a Python identifier"):
        Tool(book, name="bad name")


def test_agent_refuses_duplicate_tools_and_bad_limits() -> None:
    with pytest.raises(ConfigError, match="two tools named 'book'"):
        Agent("a", tools=[book, Tool(ship, name="book")])
    with pytest.raises(ConfigError, match="max_round_trips must be an int >= 1, got 0"):
        Agent("a", max_round_trips=0)
    with pytest.raises(ConfigError, match="non-empty name"):
        Agent(" ")
