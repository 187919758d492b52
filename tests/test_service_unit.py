"""`mlx-manager service install|uninstall|status`: the systemd user unit and the launchd agent
it writes, in a temporary HOME, with --files-only so that no real service manager is touched."""

from __future__ import annotations

import configparser
import json
import os
import plistlib
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import build_parser
from tests.server import ROOT


def service(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLX_MANAGER_", "HF_", "XDG_"))}
    env |= {
        "HOME": str(tmp_path / "home"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "MLX_MANAGER_HOME": str(tmp_path / "mm home"),
        "MLX_MANAGER_MAX_QUEUE": "3",
        "HF_HUB_CACHE": str(tmp_path / "hf%cache"),
    }
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "service", *args],
        cwd=ROOT,
        text=True,
        capture_output=True,
        env=env,
        timeout=60,
    )


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, r.stderr
    return r.stdout


def status(tmp_path: Path, platform: str) -> dict[str, object]:
    out = ok(service(tmp_path, "status", "--json", "--files-only", "--platform", platform))
    return dict(json.loads(out))


def test_systemd_unit_round_trip(tmp_path: Path) -> None:
    unit = tmp_path / "config" / "systemd" / "user" / "mlx-manager.service"
    assert status(tmp_path, "linux") == {
        "platform": "linux",
        "installed": False,
        "path": str(unit),
        "state": "unknown (the service manager cannot be asked here)",
        "running": None,
    }
    args = ("--port", "9123", "--model-dir", str(tmp_path / "my models"), "--no-demo")
    out = ok(service(tmp_path, "install", "--files-only", "--platform", "linux", *args))
    assert f"Wrote {unit}" in out and "systemctl --user enable mlx-manager.service" in out
    # Private: the environment may carry a key.
    assert stat.S_IMODE(unit.stat().st_mode) == 0o600

    text = unit.read_text()
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case
    parser.read_string(text)
    assert parser["Service"]["Restart"] == "on-failure"
    assert parser["Install"]["WantedBy"] == "default.target"
    command = shlex.split(parser["Service"]["ExecStart"])
    assert command[:4] == [sys.executable, "-m", "gateway.cli", "serve"]
    # The flags are what `serve` parses: the settings in effect now.
    serve = build_parser().parse_args(command[3:])
    assert (serve.host, serve.port, serve.home) == ("127.0.0.1", 9123, str(tmp_path / "mm home"))
    assert serve.model_dir == [str(tmp_path / "my models")] and serve.no_demo
    environment = [line for line in text.splitlines() if line.startswith("Environment=")]
    # % is doubled (systemd would expand it); MLX_MANAGER_HOME is a flag, not repeated.
    assert environment == [
        f"Environment=HF_HUB_CACHE={tmp_path}/hf%%cache",
        "Environment=MLX_MANAGER_MAX_QUEUE=3",
    ]
    if shutil.which("systemd-analyze"):
        runtime = tmp_path / "runtime"
        runtime.mkdir(mode=0o700)
        checked = subprocess.run(
            ["systemd-analyze", "--user", "verify", str(unit)],
            capture_output=True,
            text=True,
            env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
            timeout=60,
        )
        assert checked.returncode == 0 and str(unit) not in checked.stderr, checked.stderr

    assert status(tmp_path, "linux")["installed"] is True
    shown = ok(service(tmp_path, "status", "--files-only", "--platform", "linux"))
    assert shown.splitlines()[0] == f"installed: {unit}"
    # Installing again replaces the file.
    again = ok(service(tmp_path, "install", "--files-only", "--platform", "linux"))
    assert f"Replaced {unit}" in again and "--port 8080" in unit.read_text()

    out = ok(service(tmp_path, "uninstall", "--files-only", "--platform", "linux"))
    assert f"Removed {unit}" in out and "systemctl --user disable --now" in out
    assert not unit.exists() and status(tmp_path, "linux")["installed"] is False
    assert "Not installed" in ok(service(tmp_path, "uninstall", "--files-only"))


def test_launchd_plist_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "home" / "Library" / "LaunchAgents" / "com.mlx-manager.serve.plist"
    out = ok(service(tmp_path, "install", "--files-only", "--platform", "macos", "--port", "9124"))
    assert f"Wrote {path}" in out and "launchctl bootstrap gui/" in out
    agent = plistlib.loads(path.read_bytes())
    logs = tmp_path / "mm home" / "logs"
    assert agent["Label"] == "com.mlx-manager.serve"
    assert agent["ProgramArguments"][:4] == [sys.executable, "-m", "gateway.cli", "serve"]
    assert build_parser().parse_args(agent["ProgramArguments"][3:]).port == 9124
    assert agent["RunAtLoad"] is True and agent["KeepAlive"] == {"SuccessfulExit": False}
    assert agent["StandardOutPath"] == str(logs / "service.out.log")
    assert agent["StandardErrorPath"] == str(logs / "service.err.log")
    assert logs.is_dir()  # launchd opens the files, but does not make their folder
    # Unescaped in a plist: it is XML, not a unit file.
    assert agent["EnvironmentVariables"] == {
        "HF_HUB_CACHE": f"{tmp_path}/hf%cache",
        "MLX_MANAGER_MAX_QUEUE": "3",
    }
    assert status(tmp_path, "macos")["installed"] is True
    out = ok(service(tmp_path, "uninstall", "--files-only", "--platform", "macos"))
    assert f"Removed {path}" in out and "launchctl bootout" in out and not path.exists()


@pytest.mark.parametrize("platform", ["linux", "macos"])
def test_print_writes_nothing(tmp_path: Path, platform: str) -> None:
    out = ok(service(tmp_path, "install", "--print", "--platform", platform))
    assert ("ExecStart=" in out) if platform == "linux" else out.startswith("<?xml")
    assert not (tmp_path / "home").exists() and not (tmp_path / "config").exists()


def test_bad_action_is_a_usage_error(tmp_path: Path) -> None:
    r = service(tmp_path, "start")
    assert r.returncode == 2 and "invalid choice" in r.stderr and "Traceback" not in r.stderr
