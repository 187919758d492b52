"""Fixtures: tiny real models built once per session, and the real server on a loopback port."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.catalog.builder import EOS_TOKEN_ID, ModelSpec, build_model
from tests.agent_model import build_agent_model
from tests.encoder_model import build_encoder
from tests.server import Server, start_server

__all__ = ["HF_MODEL", "NO_EOS", "Models", "Server", "start_server"]

HF_MODEL = "tiny-org/tiny-hf"
# Greedy, and end-of-sequence banned: a stream that must still be running when the test looks
# runs to max_tokens (random weights would otherwise end it early, at random).
NO_EOS: dict[str, Any] = {"temperature": 0, "logit_bias": {str(EOS_TOKEN_ID): -100}}


@dataclass
class Models:
    folder: Path  # MLX_MANAGER_MODEL_DIRS
    hf_cache: Path  # HF_HUB_CACHE

    def path(self, name: str) -> Path:
        return self.folder / name

    def env(self, home: Path, **settings: str) -> dict[str, str]:
        """A server's environment serving these models from `home`, with MLX_MANAGER_* settings
        given by name (max_queue="2"), and no warm spare unless asked (it costs CPU here)."""
        return {
            "MLX_MANAGER_MODEL_DIRS": str(self.folder),
            "HF_HUB_CACHE": str(self.hf_cache),
            "HF_HUB_OFFLINE": "1",
            "MLX_MANAGER_HOME": str(home),
            "MLX_MANAGER_WARM_SPARE": "0",
            **{f"MLX_MANAGER_{k.upper()}": v for k, v in settings.items()},
        }


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    root = tmp_path_factory.mktemp("models")
    folder = root / "folder"
    # Distinct seeds make distinct models: routing mistakes show up as different text.
    for name, seed in (("tiny-a", 0), ("tiny-b", 1), ("tiny-c", 2), ("tiny-d", 3)):
        build_model(folder / name, ModelSpec(seed=seed))
    # About ten times the weights of the others, for memory-budget tests.
    build_model(folder / "tiny-big", ModelSpec(hidden_size=256, intermediate_size=512, seed=4))
    # Overfit to answer with tool calls and think blocks (tests/agent_model.py).
    build_agent_model(folder / "tiny-agent")
    # Encoders, run by mlx-embeddings: an embedding model and two cross-encoders (rerank).
    build_encoder(folder / "tiny-bert", "bert", "BertModel", seed=10)
    build_encoder(folder / "tiny-cross", "bert", "BertForSequenceClassification", seed=11)
    build_encoder(
        folder / "tiny-xlmr-cross", "xlm-roberta", "XLMRobertaForSequenceClassification", seed=12
    )
    # A folder that claims to be a model but has no weights: loading it must fail cleanly.
    (folder / "broken").mkdir()
    (folder / "broken" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    # The same files in the Hugging Face cache layout, named org/name.
    hf_cache = root / "hf"
    repo = hf_cache / ("models--" + HF_MODEL.replace("/", "--"))
    sha = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder / "tiny-a", repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    return Models(folder, hf_cache)


@pytest.fixture(scope="session")
def server(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("server") / "home"
    env = {"MLX_MANAGER_MODEL_DIRS": str(models.folder), "HF_HUB_CACHE": str(models.hf_cache)}
    srv = start_server(home, env)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def tokenizer_of(models: Models) -> Any:
    """The real tokenizer of a test model, to check token counts independently."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    cache: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in cache:
            cache[name] = load_tokenizer(models.path(name))
        return cache[name]

    return get


@pytest.fixture()
def client(server: Server) -> Any:
    import openai

    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture()
def aclient(server: Server) -> Any:
    import openai

    return openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MB filesystem (tmpfs) to fill up: disk-full paths tested for real."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {mount.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)
