"""Input from outside is checked at the boundary, with errors that name the problem."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

from overstory import Config, ConfigError, InvalidMessage, InvalidUserId, StoreURLError, load_config
from overstory.store import redact_url, resolve_store_url
from overstory.validation import MESSAGE_REFUSED, validate_message, validate_user_id


@pytest.mark.parametrize("user_id", ["alice", "user-42", "ünïcödé", "a" * 256, "a b"])
def test_good_user_ids(user_id: str) -> None:
    assert validate_user_id(user_id) == user_id


@pytest.mark.parametrize(
    ("user_id", "problem"),
    [
        ("", "empty"),
        ("   ", "empty or blank"),
        ("a" * 257, "257 characters, the limit is 256"),
        ("al\x00ice", "U+0000"),
        ("al\nice", "U+000A"),
        ("bob\u200b", "U+200B"),  # zero-width space: two ids that look the same
        (" alice", "leading or trailing whitespace"),
        (42, "must be a string, got int"),
        (None, "must be a string, got NoneType"),
    ],
)
def test_bad_user_ids(user_id: object, problem: str) -> None:
    with pytest.raises(InvalidUserId, match=re.escape(problem)):
        validate_user_id(user_id)


def test_user_id_error_shows_a_prefix_not_the_whole_value() -> None:
    with pytest.raises(InvalidUserId) as info:
        validate_user_id("x" * 10_000)
    assert len(str(info.value)) < 200


@pytest.mark.parametrize(
    "text", ["hi", "line one\nline two\ttabbed", "family 👨‍👩‍👧", "x" * 32_000]
)
def test_good_messages(text: str) -> None:
    assert validate_message(text) == text


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty"),
        (" \n\t ", "empty or blank"),
        ("x" * 32_001, "32001 characters, the limit is 32000"),
        ("nul\x00byte", "U+0000"),
        ("escape \x1b[31mred", "U+001B"),
        ("lone \ud800 surrogate", "U+D800"),
        (b"bytes", "must be a string, got bytes"),
    ],
)
def test_bad_messages(text: object, problem: str) -> None:
    with pytest.raises(InvalidMessage, match=re.escape(problem)):
        validate_message(text)


def test_message_limit_is_configurable() -> None:
    with pytest.raises(InvalidMessage, match="limit is 5"):
        validate_message("123456", max_chars=5)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("", "non-empty string"),
        ("history.db", "has no scheme"),
        ("postgres://localhost/db", "unsupported store scheme 'postgres'"),
        ("sqlite://relative.db", "three slashes"),
        ("sqlite:///", "names no file"),
        ("sqlite:///:memory:", "in-memory database cannot be shared"),
        ("sqlite:///some/dir/", "names a directory"),
        ("mongodb://", "names no host"),
        ("mongodb://localhost:notaport/db", "malformed"),
        ("mongodb://localhost/bad$name", "database name 'bad\\$name'"),
    ],
)
def test_bad_store_urls(url: str, problem: str) -> None:
    with pytest.raises(StoreURLError, match=problem):
        resolve_store_url(url)


def test_store_url_errors_never_show_the_password() -> None:
    with pytest.raises(StoreURLError) as info:
        resolve_store_url("redis://app:hunter2@db.internal/0")
    assert "hunter2" not in str(info.value)
    assert redact_url("mongodb://app:hunter2@h:27017/db") == "mongodb://app:***@h:27017/db"


def test_relative_sqlite_path_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_store_url("sqlite:///data/h.db") == f"sqlite:///{tmp_path}/data/h.db"
    assert resolve_store_url("sqlite:////abs/h.db") == "sqlite:////abs/h.db"


def test_config_rejects_unknown_keys_by_name() -> None:
    with pytest.raises(ConfigError, match=r"unknown key\(s\) in test: 'stroe'"):
        Config.from_mapping({"stroe": "sqlite:///x.db"}, source="test")


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (
            {"limits": {"max_message_chars": 0}},
            r"limits\.max_message_chars: Input should be greater than or equal to 1",
        ),
        ({"limits": {"max_message_chars": "lots"}}, r"limits\.max_message_chars"),
        ({"namespace": "has space"}, "namespace"),
        ({"conversations": {"activation_timeout_s": -1}}, r"conversations\.activation_timeout_s"),
        ({"jobs": "many"}, "jobs"),
    ],
)
def test_config_rejects_bad_values_by_key(data: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        Config.from_mapping(data)


def test_config_rejects_bad_store_url() -> None:
    with pytest.raises(StoreURLError, match="unsupported store scheme 'ftp'"):
        Config.from_mapping({"store": "ftp://x/y"})


def test_config_file(tmp_path: Path) -> None:
    path = tmp_path / "overstory.toml"
    path.write_text('[overstory]\nstore = "sqlite:////tmp/h.db"\nnamespace = "prod"\n')
    config = load_config(path)
    assert (config.store, config.namespace) == ("sqlite:////tmp/h.db", "prod")
    assert load_config(path, {"namespace": "other"}).namespace == "other"


def test_config_file_errors_name_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('store = "sqlite:////tmp/h.db"\ncolour = "green"\n')
    with pytest.raises(ConfigError, match=r"unknown key\(s\) in config file .*bad.toml.*'colour'"):
        load_config(path)
    path.write_text("store = [unclosed\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    ("user_id", "shown"),
    [
        ("u_18274", "u_18274"),
        ("7f3a9c2e-1b2c-4d5e", "7f3a9c2e-1b2c-4d5e"),
        ("john.doe@example.com", "jo***"),
        ("Jöhn Doe", "Jh***"),
        ("x" * 25, "xx***"),
        ("日本", "***"),
    ],
)
def test_actor_names_are_readable_without_leaking_personal_data(user_id: str, shown: str) -> None:
    from overstory.actors.names import actor_name

    name = actor_name(user_id)
    prefix, label, digest = name.split(":")
    assert (prefix, label) == ("conversation", shown)
    assert len(digest) == 24
    assert actor_name(user_id + " ") != name  # unique by digest, not by label


def test_errors_keep_their_fields_and_cause_across_pickling() -> None:
    """What a client across Ray gets: the same types, fields and cause as in the actor."""
    import pickle

    from overstory.exceptions import (
        AllModelsFailed,
        ConversationQuarantined,
        ModelError,
        TurnFailed,
    )

    failures = [ModelError("down", model="a", kind="timeout"), ModelError("429", model="b")]
    err = TurnFailed("conv", "t1", "model error", AllModelsFailed(failures))
    back = pickle.loads(pickle.dumps(err))
    assert (back.conversation_id, back.turn_id, back.reason) == ("conv", "t1", "model error")
    assert isinstance(back.__cause__, AllModelsFailed)
    assert [(f.model, f.kind) for f in back.__cause__.failures] == [
        ("a", "timeout"),
        ("b", "server_error"),
    ]
    quarantined = pickle.loads(pickle.dumps(ConversationQuarantined("c", 4, 1e9, "boom")))
    assert (quarantined.conversation_id, quarantined.crashes, quarantined.last) == ("c", 4, "boom")
    assert "'c' is quarantined" in str(quarantined)


def test_a_key_of_the_flat_layout_is_refused_with_its_new_name() -> None:
    with pytest.raises(ConfigError, match=r"'jobs_concurrency' is now 'jobs\.concurrency'"):
        Config.from_mapping({"jobs_concurrency": 2})


def test_an_unknown_key_inside_a_group_is_named_with_its_group() -> None:
    with pytest.raises(ConfigError, match=r"'jobs\.concurency'.*known keys of 'jobs': concurrency"):
        Config.from_mapping({"jobs": {"concurency": 2}})


def test_overrides_change_only_the_keys_they_name() -> None:
    base = Config.from_mapping({"jobs": {"concurrency": 8, "poll_s": 0.5}})
    merged = base.merged({"jobs": {"per_user": 2}, "namespace": "other"})
    assert (merged.jobs.concurrency, merged.jobs.poll_s, merged.jobs.per_user) == (8, 0.5, 2)
    assert merged.namespace == "other"
    assert base.jobs.per_user == 1  # the original is unchanged (frozen)
    with pytest.raises(ConfigError, match=r"jobs\.per_user"):
        base.merged({"jobs": {"per_user": 0}})


def test_a_config_file_holds_a_group_in_its_own_table(tmp_path: Path) -> None:
    path = tmp_path / "overstory.toml"
    path.write_text('[overstory]\nnamespace = "n"\n[overstory.jobs]\nconcurrency = 9\n')
    config = load_config(path, {"jobs": {"per_user": 3}})
    assert (config.namespace, config.jobs.concurrency, config.jobs.per_user) == ("n", 9, 3)


def test_the_message_pattern_refuses_exactly_the_control_and_surrogate_characters() -> None:
    # The fast path (one regex search) and the rule it stands for (the Unicode categories
    # Cc and Cs, but newline, carriage return and tab), over every code point.
    refused = [
        cp
        for cp in range(0x110000)
        if chr(cp) not in "\n\r\t" and unicodedata.category(chr(cp)) in ("Cc", "Cs")
    ]
    found = [cp for cp in range(0x110000) if MESSAGE_REFUSED.fullmatch(chr(cp))]
    assert found == refused
    assert len(refused) == 65 - 3 + 2048
