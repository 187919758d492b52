"""POST /v1/rerank against the real server: a language model scores documents the way
Qwen3-Reranker does (the probability of "yes" after its prompt), named as a reranker or through a
profile that says so. Random weights: the tests check structure, order and independence."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import Models, Server

DOCS = [
    "Paris is the capital of France.",
    "The mitochondria is the powerhouse of the cell.",
    "Berlin is the capital of Germany, and a large city.",
    "x",
]
PROFILE = "tiny-rerank"


@pytest.fixture(scope="module")
def reranker(server: Server) -> Iterator[str]:
    """A profile that makes tiny-a rerank."""
    body = {"name": PROFILE, "model": "tiny-a", "rerank": "yes_no"}
    r = httpx.post(server.url + "/admin/profiles", json=body, headers=server.headers)
    assert r.status_code in (200, 201), r.text
    assert r.json()["rerank"] == "yes_no"
    yield PROFILE
    httpx.delete(server.url + f"/admin/profiles/{PROFILE}", headers=server.headers)


def post(server: Server, **body: Any) -> httpx.Response:
    return httpx.post(server.v1 + "/rerank", json=body, timeout=60)


def scores(server: Server, model: str, documents: list[Any], **body: Any) -> dict[int, float]:
    r = post(
        server, model=model, query="What is the capital of France?", documents=documents, **body
    )
    assert r.status_code == 200, r.text
    return {x["index"]: x["relevance_score"] for x in r.json()["results"]}


def test_results_sorted_with_documents_and_usage(server: Server, reranker: str) -> None:
    r = post(
        server,
        model=reranker,
        query="What is the capital of France?",
        documents=[DOCS[0], {"text": DOCS[1]}, DOCS[2], DOCS[3]],
        return_documents=True,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == reranker and body["id"].startswith("rerank-")
    results = body["results"]
    assert sorted(x["index"] for x in results) == [0, 1, 2, 3]
    values = [x["relevance_score"] for x in results]
    assert values == sorted(values, reverse=True)
    assert all(0.0 <= v <= 1.0 for v in values)
    assert all(x["document"] == {"text": DOCS[x["index"]]} for x in results)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0


def test_top_n_and_no_documents_by_default(server: Server, reranker: str) -> None:
    full = post(server, model=reranker, query="capital", documents=DOCS).json()["results"]
    assert all("document" not in x for x in full)
    top = post(server, model=reranker, query="capital", documents=DOCS, top_n=2).json()["results"]
    assert top == full[:2]
    many = post(server, model=reranker, query="capital", documents=DOCS, top_n=10).json()
    assert len(many["results"]) == 4


def test_a_score_does_not_depend_on_the_other_documents(server: Server, reranker: str) -> None:
    together = scores(server, reranker, DOCS)
    for i, doc in enumerate(DOCS):
        alone = scores(server, reranker, [doc])[0]
        assert abs(alone - together[i]) < 1e-3
    assert scores(server, reranker, DOCS) == together  # repeatable


def test_a_model_named_as_a_reranker_needs_no_profile(server: Server, models: Models) -> None:
    folder = models.folder / "kinds-under-test" / "tiny-Reranker"
    if not folder.exists():
        shutil.copytree(models.path("tiny-a"), folder)
    got = scores(server, str(folder), DOCS[:2])
    assert sorted(got) == [0, 1]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"query": "", "documents": ["a"]}, "query is empty"),
        ({"query": "q", "documents": []}, "documents is empty"),
        ({"query": "q", "documents": ["a", ""]}, "documents[1] is empty"),
        ({"query": "q", "documents": ["a", 3]}, "documents"),
        ({"query": "q", "documents": [{"title": "a"}]}, "documents"),
        ({"query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
        ({"query": "q"}, "documents"),
        ({"documents": ["a"]}, "query"),
        ({"query": "q", "documents": ["word " * 3000]}, "2048 tokens"),
    ],
)
def test_bad_requests_are_400s(server: Server, reranker: str, body: Any, says: str) -> None:
    r = post(server, model=reranker, **body)
    assert r.status_code == 400, r.text
    assert says in r.json()["error"]["message"]


def test_a_chat_model_without_a_way_to_rerank_is_a_400(server: Server, models: Models) -> None:
    r = post(server, model="tiny-b", query="q", documents=["a"])
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "model_kind_mismatch" and "rerank: yes_no" in error["message"]
    assert post(server, model="no-such-model", query="q", documents=["a"]).status_code == 404


def test_request_log_row(server: Server, reranker: str) -> None:
    r = httpx.post(
        server.v1 + "/rerank",
        json={"model": reranker, "query": "q", "documents": DOCS},
        headers={"x-request-id": "rerank-log-1"},
        timeout=60,
    )
    assert r.status_code == 200

    def find() -> list[dict[str, Any]]:
        rows = httpx.get(
            server.url + "/admin/requests", params={"limit": 1000}, headers=server.headers
        ).json()["data"]
        return [x for x in rows if x["request_id"] == "rerank-log-1"]

    (row,) = server.wait_for(find, what="the rerank request's row")
    assert row["endpoint"] == "/v1/rerank" and row["status"] == 200
    assert row["model"] == "tiny-a" and row["profile"] == PROFILE
    assert row["prompt_tokens"] == r.json()["usage"]["prompt_tokens"]
