"""`service install|uninstall|status`: run `serve` at login, with the settings in effect now,
restarted when it fails. A systemd user unit on Linux, a launchd agent on macOS.

The files go where the service manager looks (XDG_CONFIG_HOME / HOME respected), so a temporary
HOME keeps tests away from the real user's services; `--files-only` writes or removes the file
and leaves systemctl/launchctl alone (printing what to run instead)."""

from __future__ import annotations

import argparse
import json
import os
import plistlib
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config.settings import ENV_PREFIX, Settings, load_settings

UNIT = "mlx-manager.service"
LABEL = "com.mlx-manager.serve"
# Settings the command line carries as flags; every other MLX_MANAGER_* variable set now, and
# the Hugging Face ones, go into the service's environment.
FLAGGED = {"HOME", "HOST", "PORT", "MODEL_DIRS", "INSECURE_NO_AUTH"}
HF_VARIABLES = ("HF_HOME", "HF_HUB_CACHE", "HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_TOKEN")


@dataclass
class Plan:
    """What `install` writes, and where."""

    platform: str  # "linux" (systemd) or "macos" (launchd)
    path: Path
    content: bytes


def this_platform() -> str:
    return "macos" if sys.platform == "darwin" else "linux"


def serve_command(args: argparse.Namespace, settings: Settings) -> list[str]:
    """`serve` as the service runs it: this Python, and the settings in effect now as flags."""
    command = [sys.executable, "-m", "gateway.cli", "serve"]
    command += ["--host", settings.host, "--port", str(settings.port)]
    command += ["--home", str(settings.home)]
    for folder in settings.model_dirs:
        command += ["--model-dir", str(folder)]
    if getattr(args, "no_demo", False):
        command.append("--no-demo")
    if settings.insecure_no_auth:
        command.append("--insecure-no-auth")
    return command


def service_environment(environ: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """The settings in the environment now that the flags do not carry."""
    kept = {
        k: v
        for k, v in environ.items()
        if k.startswith(ENV_PREFIX) and k.removeprefix(ENV_PREFIX) not in FLAGGED
    }
    kept |= {k: environ[k] for k in HF_VARIABLES if environ.get(k)}
    return dict(sorted(kept.items()))


def unit_path() -> Path:
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "systemd" / "user" / UNIT


def plist_path() -> Path:
    return Path.home() / "Library" / "LaunchAgents" / f"{LABEL}.plist"


def systemd_unit(command: list[str], environment: dict[str, str]) -> str:
    lines = [
        "[Unit]",
        "Description=mlx-manager: local MLX models behind OpenAI, Anthropic and MCP APIs",
        "",
        "[Service]",
        "Type=simple",
        "ExecStart=" + " ".join(map(_systemd_quote, command)),
        *(f"Environment={_systemd_quote(f'{k}={v}')}" for k, v in environment.items()),
        "Restart=on-failure",
        "RestartSec=5",
        # serve stops its workers on SIGTERM within its graceful shutdown (10 s).
        "TimeoutStopSec=30",
        "",
        "[Install]",
        "WantedBy=default.target",
        "",
    ]
    return "\n".join(lines)


def _systemd_quote(word: str) -> str:
    """A word of ExecStart= or Environment=: % and $ doubled (systemd expands them), quoted
    when it holds a space, a quote or a backslash."""
    word = word.replace("%", "%%").replace("$", "$$")
    if word and not any(c in word for c in " \t\"'\\;"):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def launchd_plist(command: list[str], environment: dict[str, str], logs: Path) -> bytes:
    agent: dict[str, Any] = {
        "Label": LABEL,
        "ProgramArguments": command,
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},  # restarted when it fails, not when stopped
        "StandardOutPath": str(logs / "service.out.log"),
        "StandardErrorPath": str(logs / "service.err.log"),
        "ProcessType": "Interactive",  # generation wants the performance cores
    }
    if environment:
        agent["EnvironmentVariables"] = environment
    return plistlib.dumps(agent)


def plan(args: argparse.Namespace) -> tuple[Plan, Path]:
    """The file to write, and the folder of the server's logs."""
    settings = load_settings(
        {
            "host": args.host,
            "port": args.port,
            "home": args.home,
            "model_dirs": args.model_dir or None,
            "insecure_no_auth": args.insecure_no_auth or None,
        }
    )
    command = serve_command(args, settings)
    environment = service_environment(os.environ)
    logs = settings.logs_dir
    if args.platform == "macos":
        return Plan("macos", plist_path(), launchd_plist(command, environment, logs)), logs
    return Plan("linux", unit_path(), systemd_unit(command, environment).encode()), logs


def _usable(args: argparse.Namespace, manager: str) -> bool:
    """Whether to call systemctl --user / launchctl: not with --files-only, and only where a
    user manager answers."""
    if args.files_only or shutil.which(manager) is None:
        return False
    if manager == "launchctl":
        return sys.platform == "darwin"
    probe = subprocess.run(
        ["systemctl", "--user", "show-environment"], capture_output=True, timeout=10
    )
    return probe.returncode == 0


def _run(command: list[str]) -> bool:
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        print(f"mlx-manager: {' '.join(command)}: {done.stderr.strip()}", file=sys.stderr)
    return done.returncode == 0


def _launchd_target() -> str:
    return f"gui/{os.getuid()}"


def install(args: argparse.Namespace) -> int:
    planned, logs = plan(args)
    if args.print:
        sys.stdout.write(planned.content.decode())
        return 0
    planned.path.parent.mkdir(parents=True, exist_ok=True)
    if planned.platform == "macos":
        logs.mkdir(parents=True, exist_ok=True)  # launchd opens its log files, not the folder
    replacing = planned.path.exists()
    # 0600: the environment may hold a key (MLX_MANAGER_API_KEY, HF_TOKEN).
    fd = os.open(planned.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(planned.content)
    os.chmod(planned.path, 0o600)
    print(f"{'Replaced' if replacing else 'Wrote'} {planned.path}")
    if planned.platform == "linux":
        steps = [
            ["systemctl", "--user", "daemon-reload"],
            ["systemctl", "--user", "enable", UNIT],
            ["systemctl", "--user", "restart", UNIT],
        ]
        usable = _usable(args, "systemctl")
    else:
        target = _launchd_target()
        steps = [
            ["launchctl", "bootout", f"{target}/{LABEL}"],  # an older one, if loaded
            ["launchctl", "bootstrap", target, str(planned.path)],
        ]
        usable = _usable(args, "launchctl")
    return _steps(steps, usable, "It runs `serve` at login and restarts it if it fails.")


def uninstall(args: argparse.Namespace) -> int:
    path = unit_path() if args.platform == "linux" else plist_path()
    if args.platform == "linux":
        steps = [["systemctl", "--user", "disable", "--now", UNIT]]
        usable = _usable(args, "systemctl")
    else:
        steps = [["launchctl", "bootout", f"{_launchd_target()}/{LABEL}"]]
        usable = _usable(args, "launchctl")
    if not path.exists():
        print(f"Not installed ({path} does not exist).")
        return 0
    if usable:
        _run(steps[0])  # stopped first: it may not be running, which is fine
    else:
        print("Stop it with:\n  " + " ".join(steps[0]))
    path.unlink()
    print(f"Removed {path}")
    if args.platform == "linux" and usable:
        _run(["systemctl", "--user", "daemon-reload"])
    return 0


def _steps(steps: list[list[str]], usable: bool, done: str) -> int:
    if not usable:
        print("Start it now and at every login with:")
        for step in steps:
            print("  " + " ".join(step))
        return 0
    for i, step in enumerate(steps):
        # launchd: booting out an agent that is not loaded fails, and is fine.
        if not _run(step) and not (step[:2] == ["launchctl", "bootout"] and i == 0):
            return 1
    print(f"Started. {done}")
    return 0


def status(args: argparse.Namespace) -> dict[str, Any]:
    path = unit_path() if args.platform == "linux" else plist_path()
    state: dict[str, Any] = {"platform": args.platform, "installed": path.exists()}
    state["path"] = str(path)
    if args.platform == "linux" and _usable(args, "systemctl"):
        active = subprocess.run(
            ["systemctl", "--user", "is-active", UNIT], capture_output=True, text=True, timeout=10
        )
        state["state"] = active.stdout.strip() or "unknown"
        state["running"] = active.returncode == 0
    elif args.platform == "macos" and _usable(args, "launchctl"):
        shown = subprocess.run(
            ["launchctl", "print", f"{_launchd_target()}/{LABEL}"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        running = shown.returncode == 0 and "state = running" in shown.stdout
        loaded = "loaded" if shown.returncode == 0 else "not loaded"
        state["state"] = "running" if running else loaded
        state["running"] = running
    else:
        state["state"] = "unknown (the service manager cannot be asked here)"
        state["running"] = None
    return state


def cmd_service(args: argparse.Namespace) -> int:
    args.platform = args.platform or this_platform()
    if args.action == "install":
        return install(args)
    if args.action == "uninstall":
        return uninstall(args)
    state = status(args)
    if args.json:
        print(json.dumps(state, indent=2))
    else:
        where = state["path"] if state["installed"] else f"not installed (would be {state['path']})"
        print(f"installed: {where}\nstate:     {state['state']}")
    return 0
