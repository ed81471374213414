"""A run's settings have one owner (core/run_settings.py): the CLI, serve and the Python API
refuse the same values with the same words, before any server is asked."""

from __future__ import annotations

import pytest

from relaygen_sgl.cli import main as cli
from relaygen_sgl.core.errors import EXIT_USAGE, ConfigError
from relaygen_sgl.core.run_settings import DEFAULT_BUDGET, SEED_MAX, SEED_MIN, RunSettings, SettingError
from relaygen_sgl.serve.protocol import ApiError, chat_schema, parse_request

NOWHERE = ("--large", "http://127.0.0.1:9", "--small", "http://127.0.0.1:9")  # never reached
HI = [{"role": "user", "content": "hi"}]


def refused_by_cli(capsys, *args: str) -> str:
    rc = cli.main(["run", "What is 2 + 3?", *args, *NOWHERE])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line]
    assert rc == EXIT_USAGE and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def serve(body: dict) -> ApiError:
    with pytest.raises(ApiError) as e:
        parse_request({"messages": HI, **body}, model_name="relaygen", max_budget=32768, default_max_tokens=4096,
                      profiles={}, timeout_s=600.0)
    return e.value


@pytest.mark.parametrize("args, words", [
    (("--seed", "true"), "--seed: not an integer: 'true'"),
    (("--prefetch", "maybe"), "--prefetch: invalid choice: 'maybe'"),
    (("--seed", "-1"), f"--seed: seed must be an integer in [{SEED_MIN}, {SEED_MAX}], got -1"),
    (("--seed", str(SEED_MAX + 1)), "--seed: seed must be an integer in"),
    (("--max-tokens", "0"), "--max-tokens: max_tokens must be an integer >= 1, got 0"),
    (("--temperature", "3"), "--temperature: temperature must be a number in [0, 2], got 3.0"),
    (("--answer-reserve", "-1"), "--answer-reserve: answer_reserve must be an integer >= 0"),
    (("--protocol", "reference", "--answer-reserve", "8"), "it takes no answer reserve"),
])
def test_the_cli_refuses_a_bad_setting_in_one_line_with_exit_2(capsys, args, words):
    assert words in refused_by_cli(capsys, *args)


@pytest.mark.parametrize("bad", [True, False, 1.0, "7", -1, SEED_MAX + 1])
def test_the_api_refuses_a_seed_that_is_not_an_int_in_range(bad):
    with pytest.raises(SettingError, match=r"seed must be an integer in \[0, ") as e:
        RunSettings(seed=bad)
    assert isinstance(e.value, ConfigError) and e.value.setting == "seed"


@pytest.mark.parametrize("field, bad", [("max_tokens", True), ("top_k", True), ("answer_reserve", False),
                                        ("temperature", True), ("prefetch", True), ("answer", 1),
                                        ("method", "both"), ("cue_match", "regex"), ("top_k", 0)])
def test_bools_are_not_numbers_and_choices_are_words(field, bad):
    with pytest.raises(SettingError) as e:
        RunSettings(**{field: bad})
    assert e.value.setting == field


def test_the_same_seed_range_in_the_cli_serve_and_the_api(capsys):
    RunSettings(seed=SEED_MIN), RunSettings(seed=SEED_MAX)  # both ends pass
    api = str(pytest.raises(SettingError, RunSettings, seed=-1).value)
    err = serve({"seed": -1})
    assert err.status == 400 and err.param == "seed" and str(err) == api
    assert refused_by_cli(capsys, "--seed", "-1") == f"relaygen: --seed: {api}"
    schema = chat_schema("relaygen", 32768, [], 600.0)["properties"]["seed"]
    assert (schema["minimum"], schema["maximum"]) == (SEED_MIN, SEED_MAX)


def test_serve_passes_the_settings_on_as_they_are_built():
    req = parse_request({"messages": HI, "seed": 7, "temperature": 0.5, "relay": {"answer_role": "large"}},
                        model_name="relaygen", max_budget=32768, default_max_tokens=4096, profiles={}, timeout_s=600.0)
    # no max_tokens: serve's default as the default budget, which the backend cuts to what the pools hold
    assert req.settings == RunSettings(default_max_tokens=4096, seed=7, temperature=0.5, answer_role="large")
    assert req.settings.max_tokens is None and req.settings.budget == 4096
    given = parse_request({"messages": HI, "max_tokens": 9}, model_name="relaygen", max_budget=32768,
                          default_max_tokens=4096, profiles={}, timeout_s=600.0)
    assert given.settings.max_tokens == given.settings.budget == 9
    assert serve({"relay": {"method": "both"}}).param == "relay.method"
    assert serve({"seed": True}).status == 400  # a JSON boolean is no integer


def test_unknown_settings_and_settings_given_twice_are_refused():
    with pytest.raises(SettingError, match="unknown run setting 'max_token'; known: .*max_tokens"):
        RunSettings.of({"max_token": 5})
    base = RunSettings(seed=1)
    assert base.but(seed=2).seed == 2 and base.seed == 1
    with pytest.raises(SettingError, match="give settings or keyword settings, not both: seed"):
        RunSettings.given(base, {"seed": 3})
    assert RunSettings.given(base, {}, method="single-large") == base.but(method="single-large")
    assert RunSettings.given(None, {"seed": 3}, method="single-small") == RunSettings(seed=3, method="single-small")
    with pytest.raises(SettingError):
        base.but(seed=True)


def test_the_default_budget_is_a_setting_checked_like_the_budget():
    assert RunSettings().budget == DEFAULT_BUDGET and RunSettings(default_max_tokens=64).budget == 64
    assert RunSettings(max_tokens=8, default_max_tokens=64).budget == 8
    for bad in (0, -3, True, 2.5, "64"):
        with pytest.raises(SettingError, match="default_max_tokens must be an integer >= 1"):
            RunSettings(default_max_tokens=bad)
