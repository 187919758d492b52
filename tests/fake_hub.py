"""A local HTTP server that speaks the parts of the Hugging Face hub protocol huggingface_hub
uses (model search, revision info, file tree, resolve with HEAD/GET and ranges), serving model
folders the fixtures built. The real client reaches it through HF_ENDPOINT."""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.server import free_port


@dataclass
class Repo:
    id: str
    files: dict[str, bytes]
    downloads: int = 0
    likes: int = 0
    tags: list[str] = field(default_factory=lambda: ["mlx", "safetensors"])
    gated: bool = False  # needs a token (any "Bearer hf_..." passes)

    @property
    def sha(self) -> str:
        h = hashlib.sha1()
        for name in sorted(self.files):
            h.update(name.encode() + self.files[name])
        return h.hexdigest()


def repo_from_folder(repo_id: str, folder: Path, **kw: Any) -> Repo:
    return Repo(repo_id, {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}, **kw)


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.delay = 0.0  # seconds to sleep per 64 KiB chunk served: makes downloads slow
        self.requests: list[str] = []
        self.port = free_port()
        app = Starlette(
            routes=[
                Route("/api/models", self.search),
                Route("/api/models/{repo:path}/revision/{rev}", self.revision),
                Route("/api/models/{repo:path}/tree/{rev}", self.tree),
                Route("/api/models/{repo:path}", self.info),
                Route(
                    "/{repo:path}/resolve/{rev}/{file:path}", self.resolve, methods=["GET", "HEAD"]
                ),
            ]
        )
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeHub:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def add(self, repo: Repo) -> None:
        self.repos[repo.id] = repo

    # Protocol ---------------------------------------------------------------------------------

    def _repo(self, request: Request) -> Repo | Response:
        repo = self.repos.get(request.path_params["repo"])
        if repo is None:
            return JSONResponse(
                {"error": "Repository not found"},
                status_code=404,
                headers={"X-Error-Code": "RepoNotFound"},
            )
        if repo.gated and not request.headers.get("authorization", "").startswith("Bearer hf_"):
            return JSONResponse(
                {"error": "Access to this model is restricted."},
                status_code=401,
                headers={"X-Error-Code": "GatedRepo"},
            )
        return repo

    def _summary(self, repo: Repo) -> dict[str, Any]:
        return {
            "id": repo.id,
            "modelId": repo.id,
            "sha": repo.sha,
            "downloads": repo.downloads,
            "likes": repo.likes,
            "tags": repo.tags,
            "library_name": "mlx",
            "lastModified": "2026-10-01T00:00:00.000Z",
            "createdAt": "2026-09-01T00:00:00.000Z",
            "private": False,
            "gated": "auto" if repo.gated else False,
            "usedStorage": sum(len(b) for b in repo.files.values()),
            "siblings": [{"rfilename": n, "size": len(b)} for n, b in sorted(repo.files.items())],
        }

    async def search(self, request: Request) -> Response:
        self.requests.append(str(request.url))
        q = request.query_params
        found = [
            r
            for r in self.repos.values()
            if (not q.get("search") or q["search"].lower() in r.id.lower())
            and (not q.get("author") or r.id.split("/")[0] == q["author"])
            and all(f in r.tags for f in q.getlist("filter"))
        ]
        found.sort(key=lambda r: -r.downloads)
        limit = int(q.get("limit") or 1000)
        return JSONResponse([self._summary(r) for r in found[:limit]])

    async def info(self, request: Request) -> Response:
        repo = self._repo(request)
        return repo if isinstance(repo, Response) else JSONResponse(self._summary(repo))

    async def revision(self, request: Request) -> Response:
        return await self.info(request)

    async def tree(self, request: Request) -> Response:
        repo = self._repo(request)
        if isinstance(repo, Response):
            return repo
        return JSONResponse(
            [
                {"type": "file", "path": n, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                for n, b in sorted(repo.files.items())
            ]
        )

    async def resolve(self, request: Request) -> Response:
        self.requests.append(f"{request.method} {request.url.path}")
        repo = self._repo(request)
        if isinstance(repo, Response):
            return repo
        name = request.path_params["file"]
        if name not in repo.files:
            return JSONResponse(
                {"error": "Entry not found"},
                status_code=404,
                headers={"X-Error-Code": "EntryNotFound"},
            )
        data = repo.files[name]
        headers = {
            "X-Repo-Commit": repo.sha,
            "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
            "Accept-Ranges": "bytes",
        }
        start = 0
        if "range" in request.headers:
            start = int(request.headers["range"].split("=")[1].split("-")[0])
            self.requests.append(f"RANGE {start} {request.url.path}")
        body = data[start:]
        headers["Content-Length"] = str(len(body))
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(data))
            return Response(status_code=200, headers=headers)
        if self.delay:
            return _SlowResponse(body, headers, self.delay, 206 if start else 200)
        return Response(body, status_code=206 if start else 200, headers=headers)


class _SlowResponse(Response):
    def __init__(self, body: bytes, headers: dict[str, str], delay: float, status: int) -> None:
        super().__init__(b"", status_code=status, headers=headers)
        self.data, self.delay = body, delay

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        import asyncio

        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        chunk = 65536
        for i in range(0, len(self.data), chunk):
            await send(
                {"type": "http.response.body", "body": self.data[i : i + chunk], "more_body": True}
            )
            await asyncio.sleep(self.delay)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
