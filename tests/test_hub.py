"""Hub search, download, cancel, resume, join and delete, through the real huggingface_hub
client talking to a local fake hub (HF_ENDPOINT), on real servers."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Models
from tests.fake_hub import FakeHub, repo_from_folder
from tests.server import Server, start_server
from tests.test_mcp import call, error, session

HELLO = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def hub(models: Models) -> Iterator[FakeHub]:
    hub = FakeHub().start()
    hub.add(repo_from_folder("mlx-community/tiny-chat-4bit", models.path("tiny-a"), downloads=100))
    hub.add(
        repo_from_folder(
            "mlx-community/tiny-other-8bit", models.path("tiny-b"), downloads=500, likes=7
        )
    )
    hub.add(
        repo_from_folder(
            "someone/tiny-plain", models.path("tiny-c"), downloads=900, tags=["safetensors"]
        )
    )
    hub.add(repo_from_folder("gated-org/tiny-secret", models.path("tiny-c"), gated=True))
    for name in ("tiny-slow", "tiny-resume", "tiny-killed"):
        hub.add(repo_from_folder(f"mlx-community/{name}", models.path("tiny-big")))
    yield hub
    hub.stop()


def serve(models: Models, hub: FakeHub, tmp_path: Path, **extra: str) -> Server:
    env = {
        "MLX_MANAGER_MODEL_DIRS": str(models.folder),
        "HF_HUB_CACHE": str(tmp_path / "hf"),
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        **extra,
    }
    return start_server(tmp_path / "home", env)


@pytest.fixture()
def server(models: Models, hub: FakeHub, tmp_path: Path) -> Iterator[Server]:
    srv = serve(models, hub, tmp_path)
    yield srv
    srv.stop()


def mcp(server: Server) -> str:
    return server.url + "/mcp"


def job(server: Server, job_id: str) -> dict[str, Any]:
    return httpx.get(f"{server.url}/admin/downloads/{job_id}").json()


def test_search(server: Server) -> None:
    found = call(mcp(server), "search_models", query="tiny")["models"]
    ids = [m["id"] for m in found]
    # MLX models only, most downloaded first; the gated one is listed too.
    assert ids[:2] == ["mlx-community/tiny-other-8bit", "mlx-community/tiny-chat-4bit"]
    assert "someone/tiny-plain" not in ids
    top = found[0]
    assert top["likes"] == 7 and top["size_bytes"] > 0 and top["last_modified"]
    assert top["downloaded"] is False and top["fits_memory_budget"] is True
    assert len(call(mcp(server), "search_models", query="tiny", limit=1)["models"]) == 1
    assert (
        call(mcp(server), "search_models", query="tiny", author="gated-org")["models"][0]["id"]
        == "gated-org/tiny-secret"
    )


def test_download_with_progress_then_serve_it(server: Server, hub: FakeHub) -> None:
    repo = "mlx-community/tiny-chat-4bit"

    async def work(c: Any) -> Any:
        notes: list[tuple[float, float | None]] = []

        async def progress(p: float, total: float | None, message: str | None) -> None:
            notes.append((p, total))

        result = await c.call_tool("download_model", {"model": repo}, progress_callback=progress)
        return result, notes

    result, notes = session(mcp(server), work)
    assert not result.is_error, result.content[0].text
    done = result.structured_content
    assert done["status"] == "done" and done["bytes_done"] == done["bytes_total"] > 0
    assert notes and notes[-1][0] == done["bytes_total"]
    # Only what serving needs was fetched: no README.
    fetched = [r for r in hub.requests if r.startswith("GET /" + repo)]
    assert fetched and not any("README" in r for r in fetched)
    assert repo in {m["id"] for m in call(mcp(server), "list_models")["models"]}
    found = call(mcp(server), "search_models", query="tiny-chat")["models"][0]
    assert found["downloaded"] is True
    client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0)
    r = client.chat.completions.create(model=repo, messages=HELLO, max_tokens=3)
    assert r.choices[0].finish_reason in ("length", "stop")
    info = call(mcp(server), "model_info", model=repo)
    assert info["source"] == "hf-cache" and info["parameters"] > 0


def test_gated_and_missing_fail_with_reasons(server: Server) -> None:
    gated = error(mcp(server), "download_model", model="gated-org/tiny-secret")
    assert "gated" in gated and "HF_TOKEN" in gated
    missing = error(mcp(server), "download_model", model="mlx-community/no-such-model")
    assert "not found" in missing
    assert "is not a hub model id" in error(mcp(server), "download_model", model="../etc")
    ids = {m["id"] for m in call(mcp(server), "list_models")["models"]}
    assert "gated-org/tiny-secret" not in ids and "mlx-community/no-such-model" not in ids


def test_gated_with_token(models: Models, hub: FakeHub, tmp_path: Path) -> None:
    srv = serve(models, hub, tmp_path, HF_TOKEN="hf_test_token")
    try:
        assert call(mcp(srv), "download_model", model="gated-org/tiny-secret")["status"] == "done"
    finally:
        srv.stop()


def test_join_cancel_and_resume(server: Server, hub: FakeHub) -> None:
    repo = "mlx-community/tiny-slow"
    hub.delay = 0.05  # ~1.3 MB/s: the weights take seconds
    try:
        first = httpx.post(server.url + "/admin/downloads", json={"model": repo}).json()
        second = httpx.post(server.url + "/admin/downloads", json={"model": repo}).json()
        assert second["id"] == first["id"]  # joined, not a second download
        # The weights stream for seconds (throttled): cancel once the hub's log shows they
        # started.
        server.wait_for(
            lambda: any(
                f"/{repo}/resolve/" in r and r.endswith("model.safetensors") for r in hub.requests
            ),
            what="the weights to start",
        )
        status = job(server, first["id"])
        assert status["bytes_per_second"] and status["eta_seconds"] is not None
        cancelled = httpx.delete(f"{server.url}/admin/downloads/{first['id']}").json()
        assert cancelled["status"] == "cancelled" and cancelled["files_done"] < 6
        fetched_before = [r for r in hub.requests if r.startswith(f"GET /{repo}/")]
        assert repo not in {m["id"] for m in call(mcp(server), "list_models")["models"]}
        hub.delay = 0
        resumed = call(mcp(server), "download_model", model=repo)
        assert resumed["status"] == "done"
        # The weights resumed from the part on disk: a range request from past zero.
        ranges = [r for r in hub.requests if r.startswith("RANGE") and repo in r]
        assert ranges and int(ranges[-1].split()[1]) > 0, ranges
        gets = [r for r in hub.requests if r.startswith(f"GET /{repo}/")]
        refetched = set(gets[len(fetched_before) :]) & set(fetched_before)
        assert refetched <= set(fetched_before[-1:]), refetched  # only the one cut off
        assert repo in {m["id"] for m in call(mcp(server), "list_models")["models"]}
    finally:
        hub.delay = 0


def test_download_resumes_after_the_server_is_killed(
    models: Models, hub: FakeHub, tmp_path: Path
) -> None:
    repo = "mlx-community/tiny-killed"
    hub.delay = 0.05
    srv = serve(models, hub, tmp_path)
    try:
        started = httpx.post(srv.url + "/admin/downloads", json={"model": repo})
        assert started.status_code == 202 and started.json()["status"] in ("queued", "running")
        # Kill it once part of the weights is on disk (the throttled stream takes seconds).
        blobs = tmp_path / "hf" / ("models--" + repo.replace("/", "--")) / "blobs"
        srv.wait_for(
            lambda: any(p.stat().st_size > 0 for p in blobs.glob("*.incomplete")),
            what="part of the weights on disk",
        )
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(30)
    finally:
        hub.delay = 0
    again = serve(models, hub, tmp_path)
    try:

        def finished() -> bool:
            rows = httpx.get(again.url + "/admin/downloads").json()["data"]
            return any(r["model"] == repo and r["status"] == "done" for r in rows)

        again.wait_for(finished, timeout=60, what="the interrupted download to resume")
        ranges = [r for r in hub.requests if r.startswith("RANGE") and repo in r]
        assert ranges and int(ranges[-1].split()[1]) > 0, ranges  # from the part on disk
        assert repo in {m["id"] for m in call(mcp(again), "list_models")["models"]}
    finally:
        again.stop()


def test_delete(server: Server) -> None:
    repo = "mlx-community/tiny-other-8bit"
    call(mcp(server), "download_model", model=repo)
    call(mcp(server), "load_model", model=repo)
    assert "loaded" in error(mcp(server), "delete_model", model=repo)
    deleted = call(mcp(server), "delete_model", model=repo, unload=True)
    assert deleted["deleted"] and deleted["freed_bytes"] > 500_000
    assert repo not in {m["id"] for m in call(mcp(server), "list_models")["models"]}
    assert "does not exist" in error(mcp(server), "delete_model", model=repo)
    assert "Hugging Face cache" in error(mcp(server), "delete_model", model="tiny-a")


def test_offline_fails_fast(models: Models, hub: FakeHub, tmp_path: Path) -> None:
    srv = serve(models, hub, tmp_path, HF_HUB_OFFLINE="1")
    try:
        assert "HF_HUB_OFFLINE" in error(mcp(srv), "search_models", query="tiny")
        assert "HF_HUB_OFFLINE" in error(
            mcp(srv), "download_model", model="mlx-community/tiny-chat-4bit"
        )
        assert "tiny-a" in {m["id"] for m in call(mcp(srv), "list_models")["models"]}
    finally:
        srv.stop()


def test_concurrent_mcp_downloads_join(server: Server) -> None:
    repo = "mlx-community/tiny-resume"
    results: list[Any] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(call(mcp(server), "download_model", model=repo))
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len({r["id"] for r in results}) == 1 and results[0]["status"] == "done"


def test_cli_search_pull_rm(models: Models, hub: FakeHub, tmp_path: Path) -> None:
    from tests.server import free_port
    from tests.test_cli import as_json, cli

    env = {
        "MLX_MANAGER_MODEL_DIRS": str(models.folder),
        "HF_HUB_CACHE": str(tmp_path / "hf"),
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "MLX_MANAGER_HOME": str(tmp_path / "home"),
        "MLX_MANAGER_PORT": str(free_port()),
    }
    found = as_json(env, "search", "tiny", "--author", "mlx-community")
    assert found[0]["id"] == "mlx-community/tiny-other-8bit"
    repo = "mlx-community/tiny-chat-4bit"
    pulled = cli(env, "pull", repo)  # no server: the CLI downloads itself
    assert pulled.returncode == 0, pulled.stderr
    assert "100%" in pulled.stderr  # the progress bar
    assert repo in {m["id"] for m in as_json(env, "models")}
    failed = cli(env, "pull", "mlx-community/no-such-model")
    assert failed.returncode == 1 and "not found" in failed.stderr
    removed = as_json(env, "rm", repo)
    assert removed["freed_bytes"] > 0
    assert repo not in {m["id"] for m in as_json(env, "models")}


def test_network_failure_is_reported(models: Models, tmp_path: Path) -> None:
    from tests.server import free_port

    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {
        "MLX_MANAGER_MODEL_DIRS": str(models.folder),
        "HF_HUB_CACHE": str(tmp_path / "hf"),
        "HF_ENDPOINT": closed,
        "HF_HUB_OFFLINE": "0",
    }
    srv = start_server(tmp_path / "home", env)
    try:
        assert "network" in error(mcp(srv), "search_models", query="tiny")
        assert "network" in error(mcp(srv), "download_model", model="mlx-community/x")
    finally:
        srv.stop()


def test_disk_full_is_reported(
    models: Models, hub: FakeHub, tmp_path: Path, small_disk: Path
) -> None:
    srv = serve(models, hub, tmp_path, HF_HUB_CACHE=str(small_disk / "hf"))
    try:
        # ~6 MB of weights on a 2 MB filesystem.
        message = error(mcp(srv), "download_model", model="mlx-community/tiny-slow")
        assert "disk full" in message and "free" in message
        ids = {m["id"] for m in call(mcp(srv), "list_models")["models"]}
        assert "mlx-community/tiny-slow" not in ids
    finally:
        srv.stop()


@pytest.mark.parametrize(
    ("repo", "size"),
    [
        ("mlx-community/Qwen3-8B-4bit", 4_000_000_000),
        ("mlx-community/Llama-3.2-1B-Instruct-8bit", 1_000_000_000),
        ("mlx-community/gemma-3-270m-it-bf16", 540_000_000),
        ("mlx-community/Qwen3-0.6B-4bit", 300_000_000),
        ("mlx-community/phi-2", None),
    ],
)
def test_size_estimate_from_the_name(repo: str, size: int | None) -> None:
    from gateway.catalog.hub import estimate_size

    assert estimate_size(repo) == size
