"""POST /v1/embeddings through the official openai client against the real server: a tiny
language model's hidden states pooled into vectors, in one forward pass per batch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.catalog.local import inspect_model, model_kind, read_local_model
from tests.conftest import Server

TEXTS = [
    "hello world",
    "a much longer sentence, with many more tokens in it than the first one has",
    "x",
    "the quick brown fox jumps over the lazy dog",
]


def floats(server: Server, **body: Any) -> httpx.Response:
    return httpx.post(server.v1 + "/embeddings", json=body, timeout=60)


def vectors(server: Server, inputs: Any, **body: Any) -> np.ndarray:
    r = floats(server, model="tiny-a", input=inputs, encoding_format="float", **body)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["index"] for d in data] == list(range(len(data)))
    assert all(d["object"] == "embedding" for d in data)
    return np.array([d["embedding"] for d in data], dtype=np.float32)


def test_strings_in_order_with_usage(client: openai.OpenAI, tokenizer_of: Any) -> None:
    tok = tokenizer_of("tiny-a")
    r = client.embeddings.create(model="tiny-a", input=TEXTS, encoding_format="float")
    assert r.object == "list" and r.model == "tiny-a"
    assert [d.index for d in r.data] == [0, 1, 2, 3]
    assert {len(d.embedding) for d in r.data} == {64}  # the model's hidden size
    expected = sum(len(tok.encode(t)) for t in TEXTS)
    assert r.usage.prompt_tokens == r.usage.total_tokens == expected
    for d in r.data:
        assert abs(np.linalg.norm(d.embedding) - 1) < 1e-5  # normalised
    one = client.embeddings.create(model="tiny-a", input="hello world", encoding_format="float")
    assert len(one.data) == 1 and one.usage.prompt_tokens == len(tok.encode("hello world"))


def test_base64_is_the_float32_bytes(client: openai.OpenAI, server: Server) -> None:
    # The SDK asks for base64 when no format is given, and decodes it itself.
    sdk = np.array(
        [d.embedding for d in client.embeddings.create(model="tiny-a", input=TEXTS).data]
    )
    as_floats = vectors(server, TEXTS)
    assert np.array_equal(sdk.astype(np.float32), as_floats)
    raw = floats(server, model="tiny-a", input="x", encoding_format="base64").json()
    import base64

    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.array_equal(decoded, as_floats[2])


def test_token_ids_embed_like_their_text(server: Server, tokenizer_of: Any) -> None:
    tok = tokenizer_of("tiny-a")
    texts = vectors(server, TEXTS[:2])
    ids = [tok.encode(t) for t in TEXTS[:2]]
    assert np.allclose(vectors(server, ids), texts, atol=1e-6)  # a list of token lists
    assert np.allclose(vectors(server, ids[1])[0], texts[1], atol=1e-6)  # one token list


def test_batching_does_not_change_a_vector(server: Server) -> None:
    for pooling in ("mean", "last"):
        batched = vectors(server, TEXTS, pooling=pooling)
        for i, text in enumerate(TEXTS):
            alone = vectors(server, [text], pooling=pooling)[0]
            assert np.abs(alone - batched[i]).max() < 1e-3, (pooling, i)
        # Other company, another order: the same vectors again.
        mixed = vectors(server, [TEXTS[3], "some other text entirely", TEXTS[1]], pooling=pooling)
        assert np.abs(mixed[0] - batched[3]).max() < 1e-3
        assert np.abs(mixed[2] - batched[1]).max() < 1e-3
        assert np.array_equal(vectors(server, TEXTS, pooling=pooling), batched)  # repeatable


def test_many_inputs_in_one_request(server: Server) -> None:
    texts = [f"input number {i} " * (1 + i % 7) for i in range(100)]
    batched = vectors(server, texts)
    assert batched.shape == (100, 64)
    for i in (0, 37, 99):
        assert np.abs(vectors(server, texts[i])[0] - batched[i]).max() < 1e-3


def test_dimensions_truncate_and_renormalise(client: openai.OpenAI, server: Server) -> None:
    full = vectors(server, TEXTS[:2])
    r = client.embeddings.create(model="tiny-a", input=TEXTS[:2], dimensions=16)
    short = np.array([d.embedding for d in r.data])
    assert short.shape == (2, 16)
    expected = full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True)
    assert np.allclose(short, expected, atol=1e-5)


def test_pooling_by_request_and_profile(server: Server) -> None:
    mean, last = (
        vectors(server, TEXTS[1], pooling="mean"),
        vectors(server, TEXTS[1], pooling="last"),
    )
    assert not np.allclose(mean, last)
    assert np.array_equal(vectors(server, TEXTS[1]), mean)  # a plain chat model: the mean
    profile = {"name": "tiny-embed-last", "model": "tiny-a", "pooling": "last"}
    r = httpx.post(server.url + "/admin/profiles", json=profile, headers=server.headers)
    assert r.status_code in (200, 201), r.text
    try:
        assert r.json()["pooling"] == "last"
        got = floats(server, model="tiny-embed-last", input=TEXTS[1], encoding_format="float")
        assert got.status_code == 200, got.text
        assert np.allclose(got.json()["data"][0]["embedding"], last[0], atol=1e-6)
        bad = {"name": "tiny-embed-bad", "model": "tiny-a", "pooling": "max"}
        r = httpx.post(server.url + "/admin/profiles", json=bad, headers=server.headers)
        assert r.status_code == 400 and "pooling" in r.text
    finally:
        httpx.delete(server.url + "/admin/profiles/tiny-embed-last", headers=server.headers)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"input": ""}, "input[0] is an empty string"),
        ({"input": []}, "empty"),
        ({"input": ["a", ""]}, "input[1] is an empty string"),
        ({"input": ["a", 1]}, "input[1] is a token id among strings"),
        ({"input": ["a", {"text": "b"}]}, "input[1] is an object"),
        ({"input": [[1, 2], []]}, "input[1] is an empty list of tokens"),
        ({"input": [1, -2]}, "input[0]"),
        ({"input": [[1, 2], [3, True]]}, "input[1]"),
        ({"input": None}, "input"),
        ({"input": [5000]}, "outside this model's vocabulary of 512"),
        ({"input": "x", "dimensions": 65}, "this model's embeddings have 64"),
        ({"input": "x", "dimensions": 0}, "dimensions"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "word " * 3000}, "at most 2048 tokens per input"),
        ({"input": ["a"] * 2049}, "at most 2048 per request"),
        ({}, "input"),
    ],
)
def test_bad_inputs_are_400s_naming_the_problem(server: Server, body: Any, says: str) -> None:
    r = floats(server, model="tiny-a", **body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert says in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_truncate_and_unnormalised_extras(server: Server, tokenizer_of: Any) -> None:
    """What Ollama's /api/embed (truncate) and /api/embeddings (raw vectors) need."""
    long = "word " * 3000
    r = floats(server, model="tiny-a", input=long, encoding_format="float", truncate=True)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 2048  # the context
    ids = tokenizer_of("tiny-a").encode(long)[:2048]
    assert np.allclose(r.json()["data"][0]["embedding"], vectors(server, ids)[0], atol=1e-5)
    raw = vectors(server, TEXTS[:2], normalize=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1)
    normed = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    assert np.allclose(normed, vectors(server, TEXTS[:2]), atol=1e-5)


def test_bad_inputs_through_the_sdk(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="empty string"):
        client.embeddings.create(model="tiny-a", input=["ok", ""])
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="x")
    r = httpx.post(
        client.base_url.join("embeddings").__str__(),
        content=b"input=x",
        headers={"content-type": "text/plain"},
    )
    assert r.status_code == 415


def test_a_client_that_leaves_stops_its_request(server: Server) -> None:
    """Embeddings are computed a batch at a time between decode steps: a request far too long
    to wait for ends when its client leaves (499 in the request log), and the model serves
    the next request instead of finishing the abandoned one (minutes of work here)."""
    inputs = ["word " * 3000] * 512  # each cut to the context: about a million tokens
    body = {"model": "tiny-a", "input": inputs, "truncate": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(
            server.v1 + "/embeddings",
            json=body,
            headers={"x-request-id": "embed-abandoned"},
            timeout=httpx.Timeout(60, read=3),
        )

    def row() -> list[dict[str, Any]]:
        r = httpx.get(
            server.url + "/admin/requests", params={"limit": 1000}, headers=server.headers
        )
        return [x for x in r.json()["data"] if x["request_id"] == "embed-abandoned"]

    assert server.wait_for(row, what="the abandoned request's row")[0]["status"] == 499
    assert vectors(server, "still here").shape == (1, 64)
    r = httpx.post(
        server.v1 + "/chat/completions",
        json={"model": "tiny-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        timeout=120,
    )
    assert r.status_code == 200, r.text


# Model kinds --------------------------------------------------------------------------------


def test_model_kinds_from_config() -> None:
    assert model_kind({"architectures": ["LlamaForCausalLM"]}) == "chat"
    assert model_kind({"architectures": ["Qwen3ForCausalLM"]}) == "chat"
    assert model_kind({"architectures": ["BertModel"], "model_type": "bert"}) == "embedding"
    assert model_kind({"architectures": ["XLMRobertaModel"]}) == "embedding"
    assert model_kind({"architectures": ["ModernBertForMaskedLM"]}) == "embedding"
    assert model_kind({"model_type": "nomic_bert"}) == "embedding"
    assert model_kind({"architectures": ["XLMRobertaForSequenceClassification"]}) == "reranker"
    assert model_kind({}) == "chat"


def encoder_folder(root: Path, architecture: str) -> Path:
    """A model folder with only a config.json: enough to tell its kind, and to be named by
    path (inside the model folders, in a folder of its own that the listing skips)."""
    folder = root / "kinds-under-test" / architecture
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": [architecture], "model_type": "bert", "hidden_size": 32}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_kind_in_models_and_model_info(client: openai.OpenAI, tmp_path: Path) -> None:
    listed = {m.id: m for m in client.models.list()}
    assert listed["tiny-a"].kind == "chat"
    assert client.models.retrieve("tiny-a").kind == "chat"
    model = read_local_model(encoder_folder(tmp_path, "BertModel"))
    assert model is not None and inspect_model(model)["kind"] == "embedding"


# Request log and metrics ----------------------------------------------------------------------


def test_request_log_row_and_metrics(client: openai.OpenAI, server: Server) -> None:
    def requests_total() -> float:
        text = httpx.get(server.url + "/metrics", headers=server.headers).text
        return sum(
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "mlx_manager_requests_total"
            and s.labels == {"model": "tiny-a", "endpoint": "/v1/embeddings", "status": "200"}
        )

    before = requests_total()
    r = client.embeddings.with_raw_response.create(
        model="tiny-a", input=TEXTS[:2], extra_headers={"x-request-id": "embed-log-1"}
    )
    usage = r.parse().usage
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(
            model="tiny-a", input=[""], extra_headers={"x-request-id": "embed-log-2"}
        )

    def row(request_id: str) -> dict[str, Any]:
        def find() -> list[dict[str, Any]]:
            r = httpx.get(
                server.url + "/admin/requests", params={"limit": 1000}, headers=server.headers
            )
            return [x for x in r.json()["data"] if x["request_id"] == request_id]

        return server.wait_for(find, what=f"{request_id} in the request log")[0]

    ok = row("embed-log-1")
    assert ok["endpoint"] == "/v1/embeddings" and ok["status"] == 200
    assert ok["model"] == "tiny-a" and ok["prompt_tokens"] == usage.prompt_tokens
    assert ok["completion_tokens"] == 0
    bad = row("embed-log-2")
    assert bad["status"] == 400 and "empty string" in bad["error"]
    assert requests_total() == before + 1


# The same operation beside a running server ---------------------------------------------------


def test_a_remote_service_embeds_and_reranks_through_the_server(server: Server) -> None:
    """A CLI or stdio MCP service beside the server: Service.embed and Service.rerank go to
    the server's /v1 and come back as the same values a local pool gives."""
    import asyncio

    from config.settings import Settings
    from gateway import errors
    from gateway.engine.request import EmbeddingRequest, RerankRequest
    from gateway.observe.requestlog import RequestRecord
    from gateway.service.remote import RemoteBackend
    from gateway.service.service import Service

    async def run() -> Any:
        settings = Settings(home=server.home, port=server.port)
        service = Service(settings, RemoteBackend(settings, server.url))
        try:
            request = EmbeddingRequest(model="tiny-a", inputs=TEXTS[:3], dimensions=32)
            embedded = await service.embed(request, RequestRecord("test"))
            with pytest.raises(errors.InvalidRequest, match="empty string"):
                await service.embed(EmbeddingRequest("tiny-a", ["a", ""]), RequestRecord("test"))
            with pytest.raises(errors.InvalidRequest, match="no way to rerank"):
                await service.rerank(RerankRequest("tiny-a", "q", ["a"]), RequestRecord("test"))
            return embedded
        finally:
            await service.close()

    embedded = asyncio.run(run())
    local = vectors(server, TEXTS[:3], dimensions=32)
    assert embedded.dim == 32 and np.array_equal(np.array(embedded.floats()), local)
    r = floats(server, model="tiny-a", input=TEXTS[:3], encoding_format="float")
    assert embedded.prompt_tokens == r.json()["usage"]["prompt_tokens"]


def test_fuzz_embeddings_and_rerank(server: Server) -> None:
    """Generated valid and invalid bodies from /openapi.json (as tests/test_fuzz.py does for the
    other endpoints): never a 5xx, every error in OpenAI's shape, and no worker crash."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    cases = st.one_of(
        *(
            schema[path]["POST"].as_strategy(mode)
            for path in ("/v1/embeddings", "/v1/rerank")
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        )
    )
    failures: list[str] = []
    seen: dict[int, int] = {}

    @settings(
        max_examples=150,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases, model=st.sampled_from(["tiny-a", "tiny-rerank-fuzz", None]))
    def run(case: Any, model: str | None) -> None:
        if model and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = model
            case.body.pop("keep_alive", None)  # a random one would unload the model
        response = case.call(base_url=server.url, timeout=120)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        try:
            assert response.status_code < 500, "a server error"
            if response.status_code >= 400:
                error = response.json()["error"]
                assert isinstance(error["message"], str) and error["message"]
        except (AssertionError, ValueError, KeyError, TypeError) as e:
            body = json.dumps(case.body, default=str)[:1000]
            failures.append(f"{e}: {case.path} {body} -> {response.status_code} {response.text}")

    profile = {"name": "tiny-rerank-fuzz", "model": "tiny-a", "rerank": "yes_no"}
    httpx.post(server.url + "/admin/profiles", json=profile, headers=server.headers)
    try:
        run()
    finally:
        httpx.delete(server.url + "/admin/profiles/tiny-rerank-fuzz", headers=server.headers)
    assert not failures, f"{len(failures)} bad responses; the first:\n{failures[0]}"
    assert seen.get(200, 0) >= 5 and sum(n for s, n in seen.items() if s >= 400) >= 5, seen
    workers = httpx.get(server.url + "/admin/workers", headers=server.headers).json()["data"]
    assert all(w["crashes"] == 0 for w in workers), workers
