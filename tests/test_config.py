"""Settings as an operator writes them: the README's examples load as they are,
and a secret copied from them is refused with a sentence that says so."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support import ROOT
from tokenwell.config import load_settings
from tokenwell.errors import ConfigError

README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.index("\n## ", start + 1)
    return README[start:end]


@pytest.mark.parametrize(
    "section", ["Quick start", "Configuration"], ids=["quick-start", "configuration"]
)
def test_the_readmes_config_examples_load_as_written(section: str, tmp_path: Path) -> None:
    blocks = re.findall(r"```toml\n(.*?)```", _section(section), re.S)
    assert blocks
    for block in blocks:
        if 'engine = "upstream"' in block:  # needs servers of yours: its own test below
            continue
        path = tmp_path / "tokenwell.toml"
        path.write_text(block)
        settings = load_settings(path, env={})
        assert settings.models
        assert settings.master_key is None  # commented out: generated, not "…"


def test_the_upstream_example_loads(tmp_path: Path) -> None:
    block = next(
        b for b in re.findall(r"```toml\n(.*?)```", _section("Configuration"), re.S)
        if 'engine = "upstream"' in b
    )  # fmt: skip
    path = tmp_path / "tokenwell.toml"
    path.write_text(block)
    assert load_settings(path, env={}).models[0].engine == "upstream"


@pytest.mark.parametrize("value", ["…", "...", "xxx…", "changeme", "short"])
@pytest.mark.parametrize("field", ["master_key", "key_secret"])
def test_a_placeholder_secret_is_refused(field: str, value: str, tmp_path: Path) -> None:
    path = tmp_path / "tokenwell.toml"
    path.write_text(f'{field} = "{value}"\n')
    with pytest.raises(ConfigError) as refused:
        load_settings(path, env={})
    message = str(refused.value)
    assert field in message
    assert "placeholder" in message or "at least 8 characters" in message
    assert "Value error" not in message  # pydantic's prefix is not for people


def test_the_environment_sets_the_log_format_and_metrics_token() -> None:
    settings = load_settings(
        env={"TOKENWELL_LOG_FORMAT": "json", "TOKENWELL_METRICS_TOKEN": "scrape-me-please"}
    )
    assert settings.log_format == "json" and settings.metrics_token == "scrape-me-please"
    with pytest.raises(ConfigError, match="log_format"):
        load_settings(env={"TOKENWELL_LOG_FORMAT": "yaml"})
