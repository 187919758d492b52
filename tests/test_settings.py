"""Settings layers: defaults, then config.toml, then MLX_MANAGER_* variables, then flags."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from config.settings import SettingsError, load_settings, parse_retention


def test_layers_override_in_order(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text('port = 9000\nhost = "0.0.0.0"\nbatch_size = 4\n')
    env = {
        "MLX_MANAGER_HOME": str(home),
        "MLX_MANAGER_PORT": "9100",
        "MLX_MANAGER_MODEL_DIRS": os.pathsep.join(["/m1", "/m2"]),
    }
    s = load_settings({"port": 9200}, environ=env)
    assert (s.port, s.host, s.batch_size) == (9200, "0.0.0.0", 4)
    assert s.model_dirs == [Path("/m1"), Path("/m2")]
    assert s.db_path == home / "mlx-manager.db"
    assert load_settings(environ=env).port == 9100
    assert load_settings(environ={"MLX_MANAGER_HOME": str(home)}).port == 9000
    assert load_settings(environ={"MLX_MANAGER_HOME": str(tmp_path / "x")}).port == 8080


@pytest.mark.parametrize(
    ("toml", "env", "fragment"),
    [
        ("port = [", {}, "config.toml"),
        ("colour = 1\n", {}, "unknown setting"),
        ("", {"MLX_MANAGER_PORT": "eighty"}, "'port'"),
        ("", {"MLX_MANAGER_LOG_RETENTION": "a month"}, "log retention"),
        ("", {"MLX_MANAGER_LOG_RETENTION": "1.5"}, "log retention"),
        ("", {"MLX_MANAGER_LOG_RETENTION": "30d,0"}, "log retention"),
        ("", {"MLX_MANAGER_LOG_FORMAT": "xml"}, "'log_format'"),
        ("", {"MLX_MANAGER_LOG_CONTENT": "maybe"}, "'log_content'"),
        ("", {"MLX_MANAGER_REQUEST_READ_TIMEOUT": "-1"}, "'request_read_timeout'"),
        ("", {"MLX_MANAGER_MAX_CONNECTIONS": "many"}, "'max_connections'"),
    ],
)
def test_bad_settings_are_clear_errors(tmp_path: Path, toml: str, env: dict, fragment: str) -> None:
    (tmp_path / "config.toml").write_text(toml)
    with pytest.raises(SettingsError, match=fragment):
        load_settings(environ={"MLX_MANAGER_HOME": str(tmp_path), **env})


@pytest.mark.parametrize(
    ("text", "limits"),
    [
        ("30d,1000000", (30 * 86400.0, 1_000_000)),
        ("12h", (43200.0, None)),
        ("500", (None, 500)),
        ("2w, 10", (14 * 86400.0, 10)),
        ("0", (0.0, 0)),  # the request log is off
    ],
)
def test_log_retention(text: str, limits: tuple[float | None, int | None]) -> None:
    assert parse_retention(text) == limits
    settings = load_settings(
        environ={"MLX_MANAGER_HOME": "/tmp/x", "MLX_MANAGER_LOG_RETENTION": text}
    )
    assert settings.request_log_limits == limits
