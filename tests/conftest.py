"""Shared fixtures: tiny random checkpoints of every supported family, built once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss", "phimoe",
            "granitemoe"]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """tiny_dir(model_type, **sizes) -> folder of a tiny random checkpoint (cached per arguments)."""
    from workbench.models.tiny import make_tiny

    cache: dict = {}

    def make(model_type: str, **kw):
        key = (model_type, tuple(sorted(kw.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny_{model_type}")
            cache[key] = make_tiny(model_type, out, **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    """tiny_model(model_type, **sizes) -> a loaded MoEModel (eager experts, CPU, fp32). Cached."""
    from workbench.models.loading import load_model

    cache: dict = {}

    def load(model_type: str, **kw):
        key = (model_type, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = load_model(str(tiny_dir(model_type, **kw)))
        return cache[key]

    return load


SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "2 + 2 = 4, and 3 * 7 = 21.",
    "Le renard brun rapide saute par-dessus le chien paresseux.",
    "Быстрая коричневая лиса прыгает через ленивую собаку.",
]


@pytest.fixture
def sample_texts():
    return list(SAMPLE_TEXTS)
