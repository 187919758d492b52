"""The remote half of the hub: search, background downloads and delete, on huggingface_hub.

A download is a job (kept in the database, so unfinished ones resume after a restart) that
fetches only the files a model needs, one by one, into the standard HF cache layout.
huggingface_hub finds each file (metadata, redirects, etags); the bytes are streamed here, into a
`blobs/<etag>.incomplete` part that survives a cancel, a crash or a restart and is resumed with a
range request (hf_hub_download 2.x restarts a cut-off file from zero, in a fresh temporary file).
`config.json` comes last: the local scan lists a snapshot only once it holds config.json, so a
half-downloaded model is never offered as usable.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from config.settings import Settings
from config.store import Store
from gateway import errors

NEEDED = {
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "model.safetensors.index.json",
    # Encoders: WordPiece / SentencePiece vocabularies, and how sentence-transformers pools.
    "vocab.txt",
    "sentencepiece.bpe.model",
    "spiece.model",
    "modules.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
}
DownloadProgress = Callable[[dict[str, Any]], Awaitable[None]]


def needed(name: str) -> bool:
    """The files serving a model needs: config, tokenizer, weights, chat template (and an
    encoder's pooling); not other formats' copies in subfolders (onnx/, openvino/)."""
    weights = "/" not in name and name.endswith((".safetensors", ".tiktoken"))
    return name in NEEDED or weights


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


_reachable_until = 0.0  # a successful probe is trusted for a minute


def check_online() -> None:
    """Fail at once, with a clear message, when the hub is off or cannot be reached:
    huggingface_hub itself retries a dead connection with backoff for many seconds."""
    global _reachable_until
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise errors.ModelUnavailable(
            "The Hugging Face hub is off (HF_HUB_OFFLINE=1): searching and downloading need it. "
            "Local models are listed and served as usual."
        )
    if time.monotonic() < _reachable_until:
        return
    import httpx

    try:
        httpx.head(endpoint(), timeout=3.0)
    except httpx.HTTPError as e:
        raise errors.ModelUnavailable(
            f"network: the Hugging Face hub at {endpoint()} cannot be reached "
            f"({type(e).__name__}). Local models are listed and served as usual."
        ) from None
    _reachable_until = time.monotonic() + 60


class Cancelled(Exception):
    pass


@dataclass
class Job:
    id: str
    repo: str
    status: str = "queued"  # queued | running | done | failed | cancelled
    bytes_total: int = 0
    bytes_done: int = 0
    files_total: int = 0
    files_done: int = 0
    error: str | None = None
    started: float = field(default_factory=time.time)
    cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    finished: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _base: int = 0  # bytes of the files already complete

    def status_dict(self) -> dict[str, Any]:
        elapsed = max(time.time() - self.started, 1e-6)
        rate = self.bytes_done / elapsed if self.status == "running" else None
        left = self.bytes_total - self.bytes_done
        return {
            "id": self.id,
            "model": self.repo,
            "status": self.status,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "files_done": self.files_done,
            "files_total": self.files_total,
            "bytes_per_second": round(rate) if rate else None,
            "eta_seconds": round(left / rate, 1) if rate else None,
            "error": self.error,
        }


class Downloads:
    def __init__(
        self, settings: Settings, store: Store, on_done: Callable[[], object] | None = None
    ) -> None:
        self.settings = settings
        self.store = store
        self.on_done = on_done  # told when a model has arrived (the catalogue scans again)
        self.jobs: dict[str, Job] = {}  # by id; running ones also by repo in _active
        self._active: dict[str, Job] = {}

    async def start(self, repo: str) -> Job:
        """Start downloading `repo`, or join the download already running for it."""
        await asyncio.to_thread(check_online)
        part = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?"
        if not re.fullmatch(f"{part}/{part}", repo) or ".." in repo:
            raise errors.InvalidRequest(
                f"'{repo}' is not a hub model id (org/name).", param="model"
            )
        job = self._active.get(repo)
        if job is not None:
            return job
        job = Job(uuid.uuid4().hex[:12], repo)
        self.jobs[job.id] = job
        self._active[repo] = job
        self.store.save_download(job.id, repo, "queued")
        asyncio.ensure_future(self._run(job))
        return job

    async def _run(self, job: Job) -> None:
        try:
            job.status = "running"
            self.store.save_download(job.id, job.repo, "running")
            await asyncio.to_thread(self._fetch, job)
            job.status = "done"
            if self.on_done is not None:
                self.on_done()
        except Cancelled:
            job.status, job.error = "cancelled", "cancelled on request"
        except Exception as e:  # every failure is reported with its reason
            job.status, job.error = "failed", _reason(e, job.repo)
        finally:
            self._active.pop(job.repo, None)
            self.store.save_download(
                job.id, job.repo, job.status, job.error, job.bytes_done, job.bytes_total
            )
            job.finished.set()

    def _fetch(self, job: Job) -> None:
        from huggingface_hub import HfApi

        info = HfApi(endpoint=endpoint(), token=_token()).model_info(job.repo, files_metadata=True)
        files = sorted(
            (s for s in info.siblings or [] if needed(s.rfilename)),
            key=lambda s: (s.rfilename == "config.json", s.rfilename),
        )
        if not any(s.rfilename == "config.json" for s in files):
            raise ValueError(f"'{job.repo}' has no config.json: it is not a model mlx-lm loads")
        job.files_total = len(files)
        job.bytes_total = sum(s.size or 0 for s in files)
        cache = self.settings.hf_cache
        cache.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(cache).free
        if free < job.bytes_total:  # fail before fetching, not when the disk fills up
            raise OSError(errno.ENOSPC, f"needs {job.bytes_total} bytes, {free} free in {cache}")
        for s in files:
            if job.cancel.is_set():
                raise Cancelled
            assert info.sha is not None  # the revision was resolved to a commit above
            fetch_file(self.settings.hf_cache, job, s.rfilename, info.sha)
            job._base += s.size or 0
            job.bytes_done = job._base
            job.files_done += 1

    async def wait(self, job: Job, progress: DownloadProgress | None = None) -> dict[str, Any]:
        """Wait for a job, reporting its progress every half second."""
        while not job.finished.is_set():
            if progress is not None:
                await progress(job.status_dict())
            try:
                await asyncio.wait_for(job.finished.wait(), 0.5)
            except TimeoutError:
                pass
        if progress is not None:
            await progress(job.status_dict())
        return job.status_dict()

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise errors.NotFound(f"No download job '{job_id}'.", param="id")
        return job

    async def cancel(self, job_id: str) -> dict[str, Any]:
        job = self.get(job_id)
        job.cancel.set()
        await job.finished.wait()
        return job.status_dict()

    def list(self) -> list[dict[str, Any]]:
        return [j.status_dict() for j in self.jobs.values()]

    async def resume_unfinished(self) -> None:
        """Jobs that were queued or running when the server stopped start again; files
        already complete are kept."""
        for row in self.store.unfinished_downloads():
            self.store.save_download(row["id"], row["repo"], "interrupted")
            try:
                await self.start(row["repo"])
            except errors.ServiceError:
                pass

    def in_progress(self) -> set[str]:
        return set(self._active)


def _reason(e: Exception, repo: str) -> str:
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if isinstance(e, GatedRepoError):
        return (
            f"gated: '{repo}' needs you to accept its terms on the hub and a token with "
            "access (set HF_TOKEN)"
        )
    if isinstance(e, RepositoryNotFoundError):
        return f"not found: there is no model '{repo}' on the hub (or it is private)"
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return (
            f"disk full: {e.strerror}. Free space in the Hugging Face cache and retry "
            "(the download resumes)"
        )
    if isinstance(e, HfHubHTTPError):
        return f"hub error: {e}"
    if type(e).__module__.startswith(("httpx", "httpcore", "requests")) or isinstance(
        e, ConnectionError | TimeoutError
    ):
        return f"network: could not reach {endpoint()} ({type(e).__name__})"
    return f"{type(e).__name__}: {e}"


CHUNK = 1 << 20


def fetch_file(cache: Path, job: Job, filename: str, commit: str) -> Path:
    """One file into the HF cache layout (blobs/<etag>, snapshots/<commit>/<file> -> blob,
    refs/main), resuming from `blobs/<etag>.incomplete` with an HTTP range request. Bytes are
    counted into the job per 1 MiB, and a cancel stops at the next chunk, keeping the part."""
    import httpx
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    repo_dir = cache / ("models--" + job.repo.replace("/", "--"))
    pointer = repo_dir / "snapshots" / commit / filename
    url = hf_hub_url(job.repo, filename, revision=commit, endpoint=endpoint())
    meta = get_hf_file_metadata(url, token=_token(), endpoint=endpoint())
    etag = (meta.etag or "").strip('"').removeprefix("W/").strip('"')
    if not etag:
        raise ValueError(f"the hub gave no ETag for {filename}")
    blob = repo_dir / "blobs" / etag
    if not blob.exists():
        part = blob.with_name(etag + ".incomplete")
        part.parent.mkdir(parents=True, exist_ok=True)
        done = part.stat().st_size if part.exists() else 0
        headers = build_hf_headers(token=_token())
        location = meta.location or url
        if httpx.URL(location).host != httpx.URL(endpoint()).host:
            headers.pop("authorization", None)  # a signed CDN URL needs no token
        if done:
            headers["Range"] = f"bytes={done}-"
        job.bytes_done = job._base + done
        with httpx.stream(
            "GET",
            location,
            headers=headers,
            follow_redirects=True,
            timeout=httpx.Timeout(30.0, read=60.0),
        ) as r:
            if r.status_code == 416 or (done and r.status_code == 200):
                done = 0  # the server ignored the range: start over
            r.raise_for_status()
            with part.open("ab" if done else "wb") as f:
                for chunk in r.iter_bytes(CHUNK):
                    f.write(chunk)  # kept before a cancel: what arrived is not lost
                    done += len(chunk)
                    job.bytes_done = job._base + done
                    if job.cancel.is_set():
                        raise Cancelled
        if meta.size is not None and part.stat().st_size != meta.size:
            part.unlink()
            raise ValueError(f"{filename}: got {done} bytes, expected {meta.size}; retry")
        part.replace(blob)
    pointer.parent.mkdir(parents=True, exist_ok=True)
    if pointer.is_symlink() or pointer.exists():
        pointer.unlink()
    pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return pointer


# Search -----------------------------------------------------------------------------------------


def estimate_size(repo_id: str) -> int | None:
    """Bytes from a name like 'Qwen3-8B-4bit': parameters × bits / 8."""
    m = re.search(r"(\d+(?:\.\d+)?)([bBmM])(?![a-zA-Z])", repo_id)
    if not m:
        return None
    params = float(m.group(1)) * (1e9 if m.group(2) in "bB" else 1e6)
    bits_m = re.search(r"(\d+)[-_]?bit", repo_id, re.I)
    bits = int(bits_m.group(1)) if bits_m else 16
    return int(params * bits / 8)


def search(
    query: str | None, author: str | None, limit: int, mlx_only: bool = True
) -> list[dict[str, Any]]:
    """Hub models, most downloaded first."""
    check_online()
    from huggingface_hub import HfApi

    try:
        found = HfApi(endpoint=endpoint(), token=_token()).list_models(
            search=query or None,
            author=author or None,
            filter="mlx" if mlx_only else None,
            sort="downloads",
            limit=limit,
            expand=["downloads", "likes", "lastModified", "usedStorage", "safetensors"],
        )
        models = list(found)
    except Exception as e:
        raise errors.ModelUnavailable(
            f"Searching the hub failed: {_reason(e, query or '')}"
        ) from None
    results = []
    for m in models:
        size = getattr(m, "used_storage", None) or getattr(m, "usedStorage", None)
        results.append(
            {
                "id": m.id,
                "downloads": m.downloads,
                "likes": m.likes,
                "last_modified": m.last_modified.isoformat() if m.last_modified else None,
                "size_bytes": size or estimate_size(m.id),
                "size_is_estimate": not size,
            }
        )
    return results


def delete_from_cache(cache: Path, repo_id: str) -> int:
    """Remove a model (every revision, its blobs and refs) from the HF cache; bytes freed."""
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    if not folder.is_dir():
        raise errors.NotFound(f"'{repo_id}' is not in the Hugging Face cache.", param="model")
    freed = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    shutil.rmtree(folder)
    return freed
