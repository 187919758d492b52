"""What a `model` name may reach, on real servers: path spellings of one folder share one worker
and one metrics label; the allow-list applies to the model a name resolves to, whatever the
name (profile, alias, path); absolute paths reach only the configured model folders and caches.
The catalogue's path rules are also checked directly, without a server."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import Client

from config.settings import Settings, load_settings
from config.store import Store
from gateway import errors
from gateway.catalog.names import Catalog
from tests.conftest import HF_MODEL, Models
from tests.server import Server, start_server

HELLO = [{"role": "user", "content": "hello world"}]
LOADED = ("loading", "ready", "draining")


@contextmanager
def serving(models: Models, home: Path, **settings: str) -> Iterator[Server]:
    server = start_server(home, models.env(home, **settings))
    try:
        yield server
    finally:
        server.stop()  # also asserts that no worker process outlives the server


def chat(server: Server, model: str) -> httpx.Response:
    body = {"model": model, "messages": HELLO, "max_tokens": 2}
    return httpx.post(server.v1 + "/chat/completions", json=body, timeout=120)


def model_labels(server: Server) -> set[str]:
    """Every distinct `model` label value in /metrics."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return set(re.findall(r'model="((?:[^"\\]|\\.)*)"', text))


def tool(server: Server, tool_name: str, **args: Any) -> Any:
    """An MCP tool's result, through the official client."""

    async def main() -> Any:
        async with Client(server.url + "/mcp", cache=None) as client:
            return await client.call_tool(tool_name, args)

    return asyncio.run(main())


def variants(path: Path) -> list[str]:
    """Spellings of one absolute folder: `..`, `.`, doubled slashes, a trailing slash."""
    parent, name = str(path.parent), path.name
    up, sibling = f"{parent}/../{Path(parent).name}/{name}", f"{parent}/tiny-b/../{name}"
    return [str(path), up, f"/{parent}/{name}", f"{parent}//./{name}/", sibling]


# 3. One model, many workers ------------------------------------------------------------------


def test_path_spellings_share_one_worker(models: Models, tmp_path: Path) -> None:
    with serving(models, tmp_path / "home") as server:
        for name in ["tiny-a", *variants(models.path("tiny-a"))]:
            assert chat(server, name).status_code == 200, name
        snapshot = next(
            (models.hf_cache / ("models--" + HF_MODEL.replace("/", "--"))).glob("snapshots/*")
        )
        assert chat(server, f"{snapshot}/../{snapshot.name}").status_code == 200
        workers = server.workers()
        # A path to a listed model is that model: its id, its one worker.
        assert sorted(w["model"] for w in workers) == sorted(["tiny-a", HF_MODEL])
        assert next(w for w in workers if w["model"] == "tiny-a")["requests_served"] == 6
        assert model_labels(server) <= {"", "tiny-a", HF_MODEL}


def test_failed_path_spellings_leave_one_slot(models: Models, tmp_path: Path) -> None:
    broken = models.path("broken")
    # Up to the root and beyond (`..` at the root stays there), then down again.
    depth = len(broken.parent.parts) - 1
    spellings = [f"{broken.parent}{'/..' * (depth + i)}{broken}" for i in range(3)]
    spellings += variants(broken)
    with serving(models, tmp_path / "home") as server:
        # The first makes the failed slot; the others, at once, find it (each load that fails
        # costs a worker's start: one after the other they took seconds each).
        first = chat(server, spellings[0])
        assert first.status_code == 503, first.text
        with ThreadPoolExecutor(len(spellings)) as pool:
            answers = list(pool.map(lambda name: chat(server, name), spellings[1:]))
        for name, r in zip(spellings[1:], answers, strict=True):
            assert r.status_code == 503, (name, r.text)
        # One failed slot, one metrics label: bounded by the real folders, not the spellings.
        assert [(w["model"], w["state"]) for w in server.workers()] == [("broken", "failed")]
        assert model_labels(server) <= {"", "broken"}
        assert chat(server, str(broken) + "-missing").status_code == 404
        assert len(server.workers()) == 1


# 6. The allow-list applies to the model a name resolves to -----------------------------------


def test_allow_list_follows_profiles_aliases_and_paths(models: Models, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    # Made before the allow-list existed, or by hand: names the allow-list matches, pointing at
    # a model it forbids; and a profile named like a model (it came to disk later).
    store = Store(home / "mlx-manager.db")
    store.save_profile({"name": "safe-old", "model": "tiny-b", "aliases": ["safe-alias"]})
    store.save_profile({"name": "tiny-a", "model": HF_MODEL, "aliases": ["safe-a"]})
    with serving(models, home, allowed_models="tiny-a,safe-*") as server:
        admin = server.url + "/admin/profiles"
        r = httpx.post(admin, json={"name": "safe-x", "model": "tiny-b"})
        assert (r.status_code, r.json()["error"]["code"]) == (403, "model_not_allowed")
        r = httpx.post(admin, json={"name": "safe-p", "model": str(models.path("tiny-c"))})
        assert r.status_code == 403
        for name in ("safe-old", "safe-alias", "tiny-b", str(models.path("tiny-b")), "safe-a"):
            r = chat(server, name)
            assert (r.status_code, r.json()["error"]["code"]) == (403, "model_not_allowed"), name
        assert all(w["model"] == "tiny-a" or w["state"] not in LOADED for w in server.workers())

        # A model's own name means that model; a profile cannot take it.
        assert chat(server, "tiny-a").status_code == 200
        assert [w["model"] for w in server.workers()] == ["tiny-a"]
        for body, field in (
            ({"name": "tiny-c", "model": "tiny-a"}, "name"),
            ({"name": "safe-y", "model": "tiny-a", "aliases": ["tiny-d"]}, "aliases"),
        ):
            r = httpx.post(admin, json=body)
            assert (r.status_code, r.json()["error"]["param"]) == (400, field), r.text
        # A path to an allowed model is that model.
        assert chat(server, variants(models.path("tiny-a"))[1]).status_code == 200
        r = httpx.post(admin, json={"name": "safe-z", "model": "tiny-a", "aliases": ["safe-zz"]})
        assert r.status_code == 201, r.text
        assert chat(server, "safe-zz").status_code == 200

        ids = [m["id"] for m in httpx.get(server.v1 + "/models").json()["data"]]
        assert sorted(ids) == sorted(set(ids)), ids  # each name once
        assert set(ids) == {"tiny-a", "safe-z", "safe-zz"}
        assert [w["model"] for w in server.workers()] == ["tiny-a"]

        result = tool(server, "create_profile", name="safe-m", model="tiny-b")
        assert result.is_error and "not allowed" in result.content[0].text
        assert httpx.get(admin + "/safe-m").status_code == 404


# 7. Absolute paths reach only the model folders and caches -----------------------------------


@pytest.fixture()
def outside(models: Models, tmp_path: Path) -> Path:
    """A model folder outside every configured folder (a copy of tiny-a's config)."""
    folder = tmp_path / "outside" / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text((models.path("tiny-a") / "config.json").read_text())
    return folder


def test_paths_outside_the_model_folders_are_unknown(
    models: Models, tmp_path: Path, outside: Path
) -> None:
    missing = outside.parent / "missing"
    home = tmp_path / "home"
    # A folder under the server's own models folder that links outside.
    (home / "models" / "nested").mkdir(parents=True)
    (home / "models" / "nested" / "link").symlink_to(outside)
    escapes = [
        str(outside),
        f"{models.folder}/../../{outside.relative_to(models.folder.parent.parent)}",
        str(home / "models" / "nested" / "link"),
    ]
    with serving(models, home) as server:

        def answer(name: str) -> tuple[int, str | None, str]:
            # Dots percent-encoded: the client would otherwise remove `..` segments itself.
            r = httpx.get(f"{server.v1}/models/{name.replace('.', '%2E')}", timeout=30)
            error = r.json()["error"] if r.status_code != 200 else {}
            message = (error.get("message") or "").replace(name, "NAME")
            return r.status_code, error.get("code"), message

        unknown = answer(str(missing))
        assert unknown[:2] == (404, "model_not_found")
        for name in escapes:
            assert answer(name) == unknown, name  # no difference between existing and missing
            r = chat(server, name)
            assert (r.status_code, r.json()["error"]["code"]) == (404, "model_not_found")
            result = tool(server, "model_info", model=name)
            assert result.is_error and "does not exist" in result.content[0].text
        assert server.workers() == []

        # Over-long and malformed paths are unknown names too, never a server error.
        for name in ("/" + "a" * 5000, "/" + "a/" * 3000, "/tmp/a\u0000b", "/" + "x" * 300):
            r = chat(server, name)
            assert r.status_code in (400, 404), (len(name), r.text)
            assert tool(server, "model_info", model=name).is_error
        assert answer("/" + "a" * 5000)[:2] == (404, "model_not_found")
        # Inside the folders, a path still works.
        assert answer(str(models.path("tiny-b")))[0] == 200
        assert server.workers() == []


def catalog(models: Models, home: Path, **settings: Any) -> Catalog:
    s = Settings(home=home, model_dirs=[models.folder], hf_cache=models.hf_cache, **settings)
    home.mkdir(parents=True, exist_ok=True)
    return Catalog(s, Store(s.db_path))


def test_catalog_path_rules(models: Models, tmp_path: Path, outside: Path) -> None:
    cat = catalog(models, tmp_path / "home")
    # Every spelling of a listed model's folder is that model, under one key.
    keys = {cat.resolve(v).key for v in variants(models.path("tiny-a"))}
    assert keys == {cat.resolve("tiny-a").key}
    assert {cat.resolve(v).model.id for v in variants(models.path("tiny-a"))} == {"tiny-a"}
    # A folder inside the model folders that is not listed (nested) is named by its real path.
    nested = cat.settings.own_models_dir / "deep" / "m"
    nested.mkdir(parents=True)
    (nested / "config.json").write_text("{}")
    assert cat.resolve(f"{nested}/../m").model.id == str(nested.resolve())
    for name in (str(outside), "relative/../tiny-a"):
        with pytest.raises(errors.ModelNotFound):
            cat.resolve(name)
    anywhere = catalog(models, tmp_path / "home2", allow_any_path=True)
    model = anywhere.resolve(f"{outside.parent}/../{outside.parent.name}/{outside.name}").model
    assert model.id == str(outside.resolve()) and model.path == outside.resolve()
    link = tmp_path / "link"
    link.symlink_to(outside)
    assert anywhere.resolve(str(link)).key == anywhere.resolve(str(outside)).key


@pytest.mark.parametrize(
    "name", ["/" + "a" * 5000, "/" + "a/" * 3000, "/" + "x" * 300, "/a\u0000b", "/" + "l/../" * 800]
)
@pytest.mark.parametrize("anywhere", [False, True])
def test_catalog_names_never_raise_os_errors(
    models: Models, tmp_path: Path, name: str, anywhere: bool
) -> None:
    cat = catalog(models, tmp_path / "home", **({"allow_any_path": True} if anywhere else {}))
    with pytest.raises(errors.ModelNotFound):
        cat.resolve(name)


def test_allow_any_path_setting(tmp_path: Path) -> None:
    env = {"MLX_MANAGER_HOME": str(tmp_path)}
    assert load_settings(environ=env).allow_any_path is False
    env["MLX_MANAGER_ALLOW_ANY_PATH"] = "1"
    assert load_settings(environ=env).allow_any_path is True


def test_catalog_scans_only_when_the_disk_may_have_changed(models: Models, tmp_path: Path) -> None:
    """Listing models or naming an unknown one reuses the last scan while the model folders
    are unchanged; a folder added or removed shows at once."""
    import shutil

    own = tmp_path / "own"
    own.mkdir()
    home = tmp_path / "home"
    s = Settings(home=home, model_dirs=[models.folder, own], hf_cache=models.hf_cache)
    home.mkdir()
    cat = Catalog(s, Store(s.db_path))
    scans = cat.scans
    for _ in range(5):
        assert "tiny-a" in {m.id for m in cat.models()}
        assert cat.find("no-such-model") is None
        with pytest.raises(errors.ModelNotFound):
            cat.resolve("no-such-model")
    assert cat.scans == scans
    shutil.copytree(models.path("tiny-a"), own / "fresh")  # a model folder appears
    assert "fresh" in {m.id for m in cat.models()} and cat.scans == scans + 1
    assert cat.resolve("fresh").model.id == "fresh" and cat.scans == scans + 1
    shutil.rmtree(own / "fresh")  # and goes
    assert "fresh" not in {m.id for m in cat.models()}
    with pytest.raises(errors.ModelNotFound):
        cat.resolve("fresh")
