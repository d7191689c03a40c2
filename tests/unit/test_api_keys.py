"""Inference API keys: the keys file, the environment list, lookups and adapter globs, and config validation."""

from __future__ import annotations

import pytest

from server.api.keys import ApiKey, ApiKeys, load_keys, parse_keys_file
from server.config import MIN_API_KEY_LENGTH, AdminConfig, AuthConfig, Config

KEYS_FILE = """\
# key              adapters it may use
sk-team-a-0001     team-a-*  shared-*
sk-tools-0002
   sk-indented-03  one-adapter   # trailing comment

sk-glob-00004      ?x  [ab]*    \t
\t# an indented comment line
"""


def write(tmp_path, text: str, name: str = "keys.txt"):
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- parse_keys_file


def test_parse_reads_keys_globs_comments_and_blank_lines(tmp_path):
    assert parse_keys_file(write(tmp_path, KEYS_FILE)) == {
        "sk-team-a-0001": ("team-a-*", "shared-*"),
        "sk-tools-0002": (),
        "sk-indented-03": ("one-adapter",),
        "sk-glob-00004": ("?x", "[ab]*"),
    }


def test_parse_rejects_a_key_listed_twice_naming_file_and_line(tmp_path):
    path = write(tmp_path, "# keys\nsk-team-a-0001 a-*\n\nsk-other-0002\nsk-team-a-0001 b-*\n")
    with pytest.raises(ValueError, match=r"this key is listed twice") as exc:
        parse_keys_file(path)
    assert str(exc.value).startswith(f"{path}:5:")


def test_parse_rejects_a_short_key_naming_file_and_line(tmp_path):
    short = "k" * (MIN_API_KEY_LENGTH - 1)
    path = write(tmp_path, f"sk-long-enough-1\n{short} adapter-*\n")
    with pytest.raises(ValueError, match=rf"at least {MIN_API_KEY_LENGTH} characters") as exc:
        parse_keys_file(path)
    assert str(exc.value).startswith(f"{path}:2:")
    assert parse_keys_file(write(tmp_path, "k" * MIN_API_KEY_LENGTH, "exact.txt")) == {"k" * MIN_API_KEY_LENGTH: ()}


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n   # and another\n", "#sk-commented-out-1\n"])
def test_parse_rejects_a_file_without_keys(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match="lists no key") as exc:
        parse_keys_file(path)
    assert str(path) in str(exc.value)


def test_parse_names_a_file_it_cannot_read(tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(ValueError, match="cannot read the API keys file") as exc:
        parse_keys_file(missing)
    assert str(missing) in str(exc.value) and "No such file" in str(exc.value)
    with pytest.raises(ValueError, match="cannot read the API keys file") as exc:
        parse_keys_file(tmp_path)  # a directory
    assert str(tmp_path) in str(exc.value)


def test_parse_names_a_file_that_is_not_text(tmp_path):
    """A binary or non-UTF-8 file is unreadable too: the error names it, like any other unreadable file."""
    path = tmp_path / "keys.bin"
    path.write_bytes(b"sk-team-a-0001 \xff\xfe\x00 team-*\n")
    with pytest.raises(ValueError, match="cannot read the API keys file") as exc:
        parse_keys_file(path)
    assert str(path) in str(exc.value)


# --------------------------------------------------------------------------- load_keys


def test_load_keys_from_the_environment_list():
    assert load_keys(" sk-env-key-01 ,sk-env-key-02,, ", None) == {"sk-env-key-01": (), "sk-env-key-02": ()}
    assert load_keys(None, None) == {}
    assert load_keys("", None) == {}
    assert load_keys(" , ", None) == {}


def test_load_keys_merges_the_file_whose_globs_win(tmp_path):
    path = write(tmp_path, "sk-shared-key-1 team-a-*\nsk-file-only-2\n")
    keys = load_keys("sk-shared-key-1,sk-env-only-03", path)
    assert keys == {"sk-shared-key-1": ("team-a-*",), "sk-env-only-03": (), "sk-file-only-2": ()}
    assert load_keys(None, path) == {"sk-shared-key-1": ("team-a-*",), "sk-file-only-2": ()}


def test_load_keys_passes_file_errors_on(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        load_keys("sk-env-key-01", tmp_path / "missing.txt")


# --------------------------------------------------------------------------- ApiKeys.check


def test_check_finds_the_right_key_and_nothing_else():
    keys = ApiKeys({"sk-team-a-0001": ("team-a-*",), "sk-tools-0002": (), "sk-team-a-00011": ("other",)})
    assert keys.enabled and len(keys) == 3
    team = keys.check("sk-team-a-0001")
    assert isinstance(team, ApiKey) and team.patterns == ("team-a-*",)
    assert keys.check("sk-tools-0002").patterns == ()
    assert keys.check("sk-team-a-00011").patterns == ("other",)  # a key that extends another is its own key
    for wrong in ["", "sk-team-a-000", "sk-team-a-0001 ", " sk-team-a-0001", "SK-TEAM-A-0001", "sk-tools-0003",
                  "sk-team-a-0001sk-tools-0002", "sk-tools-000", "s", "\x00", "ключ-ключ-ключ"]:
        assert keys.check(wrong) is None, wrong


def test_no_keys_means_disabled():
    keys = ApiKeys({})
    assert not keys.enabled and len(keys) == 0
    assert keys.check("anything-at-all") is None
    assert keys.check("") is None


def test_the_stored_keys_are_digests_not_the_keys():
    key = ApiKeys({"sk-secret-key-1": ()}).check("sk-secret-key-1")
    assert key is not None and len(key.digest) == 32 and b"sk-secret" not in key.digest
    assert "sk-secret-key-1" not in repr(key)


# --------------------------------------------------------------------------- ApiKey.allows


@pytest.mark.parametrize(
    ("patterns", "allowed", "refused"),
    [
        ((), ["anything", "team-a-x", "x"], []),
        (("team-*",), ["team-", "team-a", "team-b-legal"], ["team", "Team-a", "my-team-a", "teams"]),
        (("?x",), ["ax", "bx", "1x"], ["x", "abx", "ax-"]),
        (("[ab]*",), ["a", "b", "alpha", "beta-2"], ["c", "A", "gamma", ""]),
        (("team-a-*", "shared-*"), ["team-a-1", "shared-x"], ["team-b-1", "shared", "a-shared-x"]),
        (("exact-name",), ["exact-name"], ["exact-name-2", "exact-nam", "EXACT-NAME"]),
    ],
    ids=["no-globs", "star", "question-mark", "class", "two", "literal"],
)
def test_allows_matches_globs_case_sensitively(patterns, allowed, refused):
    key = ApiKey(b"\x00" * 32, patterns)
    for name in allowed:
        assert key.allows(name), (patterns, name)
    for name in refused:
        assert not key.allows(name), (patterns, name)


def test_globs_from_the_file_reach_the_key(tmp_path):
    keys = ApiKeys(parse_keys_file(write(tmp_path, KEYS_FILE)))
    team = keys.check("sk-team-a-0001")
    assert team.allows("team-a-x") and team.allows("shared-y") and not team.allows("team-b-x")
    assert keys.check("sk-tools-0002").allows("whatever")
    glob = keys.check("sk-glob-00004")
    assert glob.allows("ax") and glob.allows("b-anything") and not glob.allows("cx-1")


# --------------------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "key",
    ["k" * (MIN_API_KEY_LENGTH - 1), "", "sk-with space", "sk-with\ttab1", "sk-with,comma", "sk-newline\n1",
     " sk-leading-space", "sk_üñí-cødé-1"],
    ids=["short", "empty", "space", "tab", "comma", "newline", "leading-space", "not-ascii"],
)
def test_auth_config_rejects_bad_keys_without_echoing_them(key):
    # Not ASCII: headers arrive latin-1 decoded, so such a key, sent as UTF-8, could never match.
    match = f"at least {MIN_API_KEY_LENGTH} printable ASCII characters without spaces or commas"
    with pytest.raises(ValueError, match=match) as exc:
        AuthConfig(api_keys={"sk-good-key-01": (), key: ("x-*",)})
    if len(key) > 3:
        assert key not in str(exc.value)


def test_auth_config_accepts_good_keys():
    keys = {"k" * MIN_API_KEY_LENGTH: (), "sk-team-a-0001": ("team-a-*",), "sk_~!@#$%^&*()-1": ()}
    assert AuthConfig(api_keys=keys).api_keys == keys
    assert AuthConfig().api_keys == {}


def test_config_rejects_an_admin_token_equal_to_an_api_key():
    token = "admin-token-0123456789"
    with pytest.raises(ValueError, match="admin token must differ"):
        Config(admin=AdminConfig(token=token), auth=AuthConfig(api_keys={"sk-other-key-1": (), token: ()}))
    config = Config(admin=AdminConfig(token=token), auth=AuthConfig(api_keys={token + "x": ()}))
    assert config.admin.token == token
    Config(auth=AuthConfig(api_keys={token: ()}))  # no admin token: nothing to clash with
