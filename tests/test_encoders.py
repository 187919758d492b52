"""Encoder models through the real server: a tiny BERT embedding model (POST /v1/embeddings
through the openai SDK, and Ollama's /api/embed through the ollama client) and tiny BERT and
XLM-RoBERTa cross-encoders (POST /v1/rerank), run by mlx-embeddings in their own workers.
Random weights: the tests check shapes, order, independence from batching, and agreement with
mlx-embeddings' own pooled output."""

from __future__ import annotations

import shutil
from typing import Any

import httpx
import numpy as np
import ollama
import openai
import pytest

from gateway import errors
from gateway.catalog.local import inspect_model, read_local_model
from gateway.service import local
from tests.conftest import Models, Server

TEXTS = [
    "hello world",
    "a much longer sentence, with many more tokens in it than the first one has",
    "x",
    "the quick brown fox jumps over the lazy dog",
]
DOCS = ["the cat sat on the mat", "dogs run fast in the park", "a cat", "x"]


def embed(server: Server, inputs: Any, model: str = "tiny-bert", **body: Any) -> np.ndarray:
    r = httpx.post(
        server.v1 + "/embeddings",
        json={"model": model, "input": inputs, "encoding_format": "float", **body},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)


def rerank(server: Server, model: str, documents: list[Any], **body: Any) -> dict[str, Any]:
    r = httpx.post(
        server.v1 + "/rerank",
        json={"model": model, "query": "where is the cat", "documents": documents, **body},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


def test_kinds_in_models_and_model_info(client: openai.OpenAI, models: Models) -> None:
    listed = {m.id: m for m in client.models.list()}
    assert listed["tiny-bert"].kind == "embedding"
    assert listed["tiny-cross"].kind == "reranker"
    assert listed["tiny-xlmr-cross"].kind == "reranker"
    assert listed["tiny-a"].kind == "chat"
    model = read_local_model(models.path("tiny-cross"))
    assert model is not None and inspect_model(model)["kind"] == "reranker"  # model_info's


def test_embeddings_through_the_sdk(client: openai.OpenAI, models: Models) -> None:
    """The SDK asks for base64; the vectors are unit length, one per input, and the usage
    counts the model's tokens with its special tokens ([CLS] and [SEP])."""
    from transformers import AutoTokenizer

    got = client.embeddings.create(model="tiny-bert", input=TEXTS)
    assert [d.index for d in got.data] == [0, 1, 2, 3]
    vectors = np.array([d.embedding for d in got.data])
    assert vectors.shape == (4, 64)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(models.path("tiny-bert"))
    expected = sum(len(tokenizer(t)["input_ids"]) for t in TEXTS)
    assert got.usage.prompt_tokens == expected == got.usage.total_tokens


def test_vectors_are_mlx_embeddings_own_mean_pooling(server: Server, models: Models) -> None:
    """Batched and masked here, one by one in the library: the same vectors (BERT models
    pool the mean by default; mlx-embeddings' `text_embeds` is its normalised mean)."""
    import mlx.core as mx
    from mlx_embeddings.utils import load

    model, tokenizer = load(str(models.path("tiny-bert")))
    served = embed(server, TEXTS)
    for text, vector in zip(TEXTS, served, strict=True):
        ids = mx.array([tokenizer.encode(text)])
        reference = np.array(model(ids).text_embeds[0])
        assert np.abs(reference - vector).max() < 1e-4


def test_batching_and_repeats_do_not_change_a_vector(server: Server) -> None:
    together = embed(server, TEXTS)
    for i, text in enumerate(TEXTS):
        alone = embed(server, text)[0]
        assert np.abs(alone - together[i]).max() < 1e-3
    assert np.array_equal(embed(server, TEXTS), together)  # repeated: the same vectors


def test_pooling_dimensions_and_token_ids(server: Server, models: Models) -> None:
    from transformers import AutoTokenizer

    mean = embed(server, "hello world")[0]
    cls = embed(server, "hello world", pooling="cls")[0]
    assert not np.allclose(mean, cls) and np.isclose(np.linalg.norm(cls), 1, atol=1e-5)
    short = embed(server, "hello world", dimensions=16)[0]
    assert short.shape == (16,) and np.isclose(np.linalg.norm(short), 1, atol=1e-5)
    assert np.allclose(short, mean[:16] / np.linalg.norm(mean[:16]), atol=1e-5)
    # Token ids are wrapped in the model's special tokens, as the text is.
    tokenizer = AutoTokenizer.from_pretrained(models.path("tiny-bert"))
    ids = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    assert np.abs(embed(server, [ids])[0] - mean).max() < 1e-5


def test_a_profile_chooses_the_pooling(server: Server) -> None:
    body = {"name": "tiny-bert-cls", "model": "tiny-bert", "pooling": "cls"}
    r = httpx.post(server.url + "/admin/profiles", json=body, headers=server.headers)
    assert r.status_code in (200, 201), r.text
    try:
        by_profile = embed(server, "hello world", model="tiny-bert-cls")[0]
        assert np.allclose(by_profile, embed(server, "hello world", pooling="cls")[0], atol=1e-6)
    finally:
        httpx.delete(server.url + "/admin/profiles/tiny-bert-cls", headers=server.headers)


def test_too_long_input_is_a_400_or_cut_when_asked(server: Server) -> None:
    long = "word " * 300  # the tiny BERT reads 128 positions
    r = httpx.post(server.v1 + "/embeddings", json={"model": "tiny-bert", "input": long})
    assert r.status_code == 400 and "at most 128 tokens" in r.json()["error"]["message"]
    r = httpx.post(
        server.v1 + "/embeddings", json={"model": "tiny-bert", "input": long, "truncate": True}
    )
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 128


@pytest.mark.parametrize("model", ["tiny-cross", "tiny-xlmr-cross"])
def test_cross_encoders_rerank(server: Server, model: str) -> None:
    got = rerank(server, model, DOCS, return_documents=True)
    results = got["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2, 3]
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
    assert all(r["document"]["text"] == DOCS[r["index"]] for r in results)
    assert got["usage"]["prompt_tokens"] > 0
    # A document's score does not depend on the others, and top_n keeps the best.
    by_index = {r["index"]: r["relevance_score"] for r in results}
    alone = rerank(server, model, [DOCS[2]])["results"][0]["relevance_score"]
    assert abs(alone - by_index[2]) < 1e-4
    top = rerank(server, model, DOCS, top_n=2)["results"]
    assert [r["index"] for r in top] == [r["index"] for r in results[:2]]
    assert all("document" not in r for r in top)


def test_a_long_document_is_cut_to_the_window(server: Server) -> None:
    """Cross-encoders read 512 tokens or fewer: a longer passage is cut, as
    sentence-transformers cuts it, not refused."""
    got = rerank(server, "tiny-cross", ["cat " * 400, "a cat"])
    assert len(got["results"]) == 2
    # The query is never cut: one that leaves no room is a 400 saying so.
    body = {"model": "tiny-cross", "query": "cat " * 400, "documents": ["a cat"]}
    r = httpx.post(server.v1 + "/rerank", json=body, timeout=60)
    assert r.status_code == 400 and "query is too long" in r.json()["error"]["message"], r.text


def test_each_kind_refuses_the_others_work(client: openai.OpenAI, server: Server) -> None:
    with pytest.raises(openai.BadRequestError, match="embedding model, not a chat model") as e:
        client.chat.completions.create(
            model="tiny-bert", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert e.value.code == "model_kind_mismatch"
    with pytest.raises(openai.BadRequestError, match="reranker") as e:
        client.embeddings.create(model="tiny-cross", input="hi")
    assert e.value.code == "model_kind_mismatch"
    r = httpx.post(
        server.v1 + "/rerank", json={"model": "tiny-bert", "query": "q", "documents": ["a"]}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_kind_mismatch"
    assert "/v1/embeddings" in r.json()["error"]["message"]


def test_a_language_model_named_for_embeddings(
    client: openai.OpenAI, server: Server, models: Models
) -> None:
    """Qwen3-Embedding is a language model by architecture and an embedding model by its
    name: it embeds (at its last token, as it was trained) and does not chat."""
    folder = models.folder / "kinds-under-test" / "tiny-Embedding"
    if not folder.exists():
        shutil.copytree(models.path("tiny-a"), folder)
    model = read_local_model(folder)
    assert model is not None and model.kind == "embedding"
    assert local.default_pooling(model) == "last"
    last = embed(server, "hello world", model=str(folder))[0]
    assert np.allclose(last, embed(server, "hello world", model=str(folder), pooling="last")[0])
    with pytest.raises(openai.BadRequestError, match="not a chat model"):
        client.chat.completions.create(
            model=str(folder), messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )


def test_a_declared_pooling_is_the_default(models: Models, tmp_path: Any) -> None:
    """sentence-transformers' 1_Pooling/config.json says how a model pools (bge: [CLS])."""
    folder = tmp_path / "bge-like"
    shutil.copytree(models.path("tiny-bert"), folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    model = read_local_model(folder)
    assert model is not None and local.default_pooling(model) == "cls"
    plain = read_local_model(models.path("tiny-bert"))
    assert plain is not None and local.default_pooling(plain) == "mean"


def test_without_mlx_embeddings_an_encoder_is_a_clear_400(
    models: Models, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = read_local_model(models.path("tiny-bert"))
    assert model is not None
    monkeypatch.setattr(local.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(errors.InvalidRequest, match=r"mlx-manager\[encoders\]"):
        local._serves(model, "embedding")


def test_ollama_embed_and_embeddings(server: Server) -> None:
    client = ollama.Client(host=server.url, headers=server.headers)
    assert client.show("tiny-bert").capabilities == ["embedding"]
    assert "completion" in (client.show("tiny-a").capabilities or [])
    got = client.embed(model="tiny-bert:latest", input=TEXTS[:2])
    vectors = np.array(got.embeddings)
    assert vectors.shape == (2, 64)
    assert np.allclose(vectors, embed(server, TEXTS[:2]), atol=1e-5)
    assert got.prompt_eval_count and got.prompt_eval_count > 0
    assert got.total_duration and got.total_duration > 0
    one = client.embed(model="tiny-bert", input="hello world")
    assert len(one.embeddings) == 1
    # Too long: Ollama cuts it by default, and refuses it with truncate false.
    assert len(client.embed(model="tiny-bert", input="word " * 300).embeddings) == 1
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model="tiny-bert", input="word " * 300, truncate=False)
    assert e.value.status_code == 400
    # The older endpoint: one prompt, its vector not normalised.
    old = client.embeddings(model="tiny-bert", prompt="hello world").embedding
    mean = embed(server, "hello world")[0]
    assert np.allclose(np.array(old) / np.linalg.norm(old), mean, atol=1e-5)
    assert not np.isclose(np.linalg.norm(old), 1)
    assert client.embeddings(model="tiny-bert", prompt="").embedding == []
    # Empty input: the model is loaded, no vectors.
    assert client.embed(model="tiny-cross:latest", input=[]).embeddings == []
    with pytest.raises(ollama.ResponseError) as e:  # a cross-encoder makes no embeddings
        client.embed(model="tiny-cross", input="hi")
    assert e.value.status_code == 400 and "reranker" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model="no-such-model", input="hi")
    assert e.value.status_code == 404


def test_request_log_rows(server: Server) -> None:
    """Each endpoint writes its row: the model, the status and the tokens read."""
    asks = {
        "enc-log-1": ("/v1/embeddings", {"model": "tiny-bert", "input": ["one", "two"]}),
        "enc-log-2": ("/v1/rerank", {"model": "tiny-cross", "query": "q", "documents": ["a"]}),
        "enc-log-3": ("/api/embed", {"model": "tiny-bert", "input": "three"}),
    }
    tokens = {}
    for request_id, (path, body) in asks.items():
        headers = {**server.headers, "x-request-id": request_id}
        r = httpx.post(server.url + path, json=body, headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        answer = r.json()
        tokens[request_id] = answer.get("usage", {}).get("prompt_tokens") or answer.get(
            "prompt_eval_count"
        )

    def rows() -> list[dict[str, Any]]:
        r = httpx.get(
            server.url + "/admin/requests", params={"limit": 1000}, headers=server.headers
        )
        found = [x for x in r.json()["data"] if x["request_id"] in asks]
        return found if len(found) == len(asks) else []

    for row in server.wait_for(rows, what="the encoder requests in the log"):
        path, body = asks[row["request_id"]]
        assert (row["endpoint"], row["model"], row["status"]) == (path, body["model"], 200)
        assert row["prompt_tokens"] == tokens[row["request_id"]] > 0


@pytest.mark.parametrize(
    ("architecture", "request_"),
    [
        ("ModernBertModel", {"inputs": DOCS}),
        (
            "ModernBertForSequenceClassification",
            {"task": "rerank", "query": "q", "documents": DOCS},
        ),
    ],
)
def test_modernbert_in_the_worker_code(
    tmp_path: Any, architecture: str, request_: dict[str, Any]
) -> None:
    """ModernBERT (which pools inside the model, as its config says, and has mlx-embeddings'
    own classifier) through the worker's encoder code, batched and one by one."""
    from gateway.engine import encoder
    from tests.encoder_model import build_modernbert

    build_modernbert(tmp_path / "m", architecture, seed=13)
    model, tokenizer, config = encoder.load(str(tmp_path / "m"))

    def run(req: dict[str, Any]) -> np.ndarray:
        job = encoder.Job(model, tokenizer, req, 128)
        while not job.done:
            job.step()
        vectors, dim, _ = job.result()
        return np.frombuffer(vectors, "<f4").reshape(-1, dim)

    together = run(request_)
    key = "documents" if "documents" in request_ else "inputs"
    assert together.shape == (len(DOCS), 1 if key == "documents" else 64)
    for i, item in enumerate(DOCS):
        alone = run({**request_, key: [item]})[0]
        assert np.abs(alone - together[i]).max() < 1e-3


def test_console_shows_kinds_and_chats_only_with_chat_models(server: Server) -> None:
    headers = {**server.headers, "HX-Request": "true"}
    models = httpx.get(server.url + "/console/models", headers=headers)
    assert models.status_code == 200
    row = models.text[models.text.index('data-model="tiny-bert"') :]
    assert "<td>embedding</td>" in row[: row.index("</tr>")]
    chat = httpx.get(server.url + "/console/chat/models", headers=headers)
    assert 'value="tiny-a"' in chat.text
    assert 'value="tiny-bert"' not in chat.text and 'value="tiny-cross"' not in chat.text


def test_an_encoder_downloaded_from_the_hub(models: Models, tmp_path: Any) -> None:
    """A sentence-transformers repo through the real download code (the fake hub): its
    tokenizer, weights and 1_Pooling/config.json come, other formats' folders do not; it then
    embeds with the pooling it declares ([CLS], as bge models)."""
    from tests.fake_hub import FakeHub, Repo
    from tests.server import start_server
    from tests.test_mcp import call

    folder = models.path("tiny-bert")
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    files["1_Pooling/config.json"] = b'{"pooling_mode_cls_token": true}'
    files["modules.json"] = b"[]"
    files["onnx/model.onnx"] = b"not needed"
    files["README.md"] = b"# bge-like"
    hub = FakeHub().start()
    hub.add(Repo("BAAI/tiny-bge", files, tags=["sentence-transformers"]))
    env = {
        "MLX_MANAGER_MODEL_DIRS": str(tmp_path / "none"),
        "HF_HUB_CACHE": str(tmp_path / "hf"),
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "MLX_MANAGER_WARM_SPARE": "0",
    }
    server = start_server(tmp_path / "home", env)
    try:
        done = call(server.url + "/mcp", "download_model", model="BAAI/tiny-bge")
        assert done["status"] == "done"
        fetched = {r.split("/resolve/", 1)[1].split("/", 1)[1] for r in hub.requests if " /" in r}
        assert {"1_Pooling/config.json", "modules.json", "model.safetensors"} <= fetched
        assert "onnx/model.onnx" not in fetched and "README.md" not in fetched
        by_default = embed(server, "hello world", model="BAAI/tiny-bge")[0]
        cls = embed(server, "hello world", model="BAAI/tiny-bge", pooling="cls")[0]
        assert np.array_equal(by_default, cls)
    finally:
        server.stop()
        hub.stop()


def test_batches_bound_tokens_and_padding() -> None:
    from gateway.engine.embedder import batches

    lengths = [30, 8, 9, 31, 10, 200, 12, 40]
    groups = batches(lengths, budget=64)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        longest, shortest = max(lengths[i] for i in g), min(lengths[i] for i in g)
        assert len(g) == 1 or (len(g) * longest <= 64 and longest <= 1.25 * shortest + 4)
    assert [5] in groups  # longer than the budget: alone
