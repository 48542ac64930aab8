"""The item-text encoder (issue 6): the real all-MiniLM-L6-v2, offline; cache; bad input."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from fedrec.data import build_dataset, synthetic_ecommerce
from fedrec.text import (
    TextEncoder,
    TextError,
    check_model_dir,
    default_model_dir,
    encode_cached,
    item_texts,
)
from fedrec.text.encoder import cache_key

TOY = "Toy Story (1995)"
# sentence-transformers 6.2.0's SentenceTransformer(<this model>).encode([TOY])[0][:4]
TOY_KNOWN = [-0.08283512, 0.05303049, 0.05357649, -0.02793533]


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder(batch_size=8)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def count_encodes(encoder: TextEncoder, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Patch ``encoder.encode`` to record how many texts reach the model per call."""
    calls: list[int] = []
    original = encoder.encode

    def counted(texts, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(len(texts))
        return original(texts, **kwargs)

    monkeypatch.setattr(encoder, "encode", counted)
    return calls


def test_shape_dtype_unit_norm_and_known_answer(encoder: TextEncoder) -> None:
    out = encoder.encode([TOY, "A quiet lamp for a small desk", "Heat"], progress=True)
    assert out.shape == (3, encoder.dim) == (3, 384) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out[0, :4], TOY_KNOWN, atol=1e-5)
    assert encoder.encode([]).shape == (0, 384)


def test_unnormalised_is_the_same_direction(
    encoder: TextEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    unit = encoder.encode([TOY])[0]
    monkeypatch.setattr(encoder, "normalize", False)
    raw = encoder.encode([TOY])[0]
    assert abs(np.linalg.norm(raw) - 1.0) > 0.01
    np.testing.assert_allclose(raw / np.linalg.norm(raw), unit, atol=1e-6)


def test_mean_pooling_equals_manual_computation(encoder: TextEncoder) -> None:
    text = "Wallace & Gromit: The Best of Aardman Animation (1996). Animation"
    enc = encoder.tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        hidden = encoder.model(**enc).last_hidden_state[0]  # (T, D), no padding
    manual = F.normalize(hidden.mean(dim=0), dim=0).numpy()
    np.testing.assert_allclose(encoder.encode([text])[0], manual, atol=1e-6)


def test_batch_invariance_and_order(encoder: TextEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    words = ["garden", "lamp", "novel", "tent", "serum", "jacket", "puzzle", "leash"]
    long = " ".join(rng.choice(words, size=150))
    texts = [TOY, long, "Heat (1995). Action, Crime, Thriller", "blue"]
    alone = np.stack([encoder.encode([t])[0] for t in texts])
    monkeypatch.setattr(encoder, "batch_size", 2)
    np.testing.assert_allclose(encoder.encode([long, TOY])[1], alone[0], atol=1e-5)
    np.testing.assert_allclose(encoder.encode(texts), alone, atol=1e-5)


def test_similar_titles_are_closer(encoder: TextEncoder) -> None:
    toy, toy2, schindler, blender = encoder.encode(
        [TOY, "Toy Story 2 (1999)", "Schindler's List (1993)", "Compact blender by Junipa"]
    )
    assert cosine(toy, toy2) > cosine(toy, schindler) + 0.2
    assert cosine(toy, toy2) > cosine(toy, blender) + 0.2


def test_cache_hit_skips_the_model(
    encoder: TextEncoder, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls = count_encodes(encoder, monkeypatch)
    texts: list[str | bytes | None] = [TOY, "Heat (1995)", b"Caf\xc3\xa9 au lait"]
    first = encode_cached(encoder, texts, tmp_path)
    second = encode_cached(encoder, texts, tmp_path)
    assert calls == [3] and np.array_equal(first, second)
    assert len(list(tmp_path.glob("*.npy"))) == 1
    monkeypatch.setattr(encoder, "max_tokens", 64)
    encode_cached(encoder, texts, tmp_path)
    assert calls == [3, 3]  # another setting, another key


def test_cache_key_covers_settings_and_text_boundaries(
    encoder: TextEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = cache_key(encoder, ["ab", "c"])
    assert cache_key(encoder, ["a", "bc"]) != base
    assert cache_key(encoder, ["c", "ab"]) != base
    monkeypatch.setattr(encoder, "normalize", False)
    assert cache_key(encoder, ["ab", "c"]) != base


@pytest.mark.parametrize("damage", ["garbage", "truncated", "one value changed"])
def test_corrupt_cache_is_recomputed(
    encoder: TextEncoder,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: str,
) -> None:
    calls = count_encodes(encoder, monkeypatch)
    texts = [TOY, "Heat (1995)"]
    good = encode_cached(encoder, texts, tmp_path)
    (path,) = tmp_path.glob("*.npy")
    raw = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"not an npy file")
    elif damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    else:
        bad = good.copy()
        bad[0, 0] += 0.5
        np.save(path, bad)
    again = encode_cached(encoder, texts, tmp_path)
    assert calls == [2, 2] and np.array_equal(again, good)
    assert "corrupt" in caplog.text
    (fresh,) = tmp_path.glob("*.npy")
    assert np.array_equal(np.load(fresh), good)


def test_missing_empty_and_blank_texts_raise(encoder: TextEncoder) -> None:
    with pytest.raises(
        TextError, match=r"3 of 5 texts .*empty or whitespace only \(indices 1, 2, 4\)"
    ):
        encoder.encode([TOY, None, "", "Heat", " \t\n"])
    with pytest.raises(TextError, match=r"7 of 7 .*\(indices 0, 1, 2, 3, 4, \.\.\.\)"):
        encoder.encode([""] * 7)
    with pytest.raises(TextError, match=r"1 of 1 .*\(indices 0\)"):
        encoder.encode([float("nan")])  # type: ignore[list-item]
    with pytest.raises(TextError, match=r"no tokens .*\(indices 1\)"):
        encoder.encode([TOY, "\u200b\u200b"])
    with pytest.raises(TextError, match=r"single string"):
        encoder.encode(TOY)
    with pytest.raises(TextError, match=r"text 1: got int"):
        encoder.encode([TOY, 7])  # type: ignore[list-item]


def test_bytes_decoded_or_rejected_with_offset(encoder: TextEncoder) -> None:
    np.testing.assert_allclose(
        encoder.encode([b"Caf\xc3\xa9 Society"]), encoder.encode(["Café Society"]), atol=1e-6
    )
    with pytest.raises(TextError, match=r"text 2: bytes are not valid UTF-8 at byte offset 3"):
        encoder.encode([TOY, b"ok", b"Caf\xe9 Society"])  # latin-1, not UTF-8
    with pytest.raises(TextError, match=r"text 0: lone surrogate at character 3"):
        encoder.encode(["abc\udcff"])


def test_long_texts_truncated_and_counted(
    encoder: TextEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(encoder, "max_tokens", 32)
    long = " ".join(["apple"] * 100)
    with pytest.warns(UserWarning, match=r"^2 of 3 texts truncated to 32 tokens"):
        out = encoder.encode([long, TOY, long + " pie"])
    prefix = encoder.encode([" ".join(["apple"] * 30)])[0]  # 30 words + [CLS] + [SEP]
    np.testing.assert_allclose(out[0], prefix, atol=1e-5)


def test_bad_settings_and_model_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(TextError, match=r"batch_size must be >= 1"):
        TextEncoder(batch_size=0)
    with pytest.raises(TextError, match=rf"{re.escape(str(tmp_path / 'nope'))}: model folder not"):
        TextEncoder(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TextError, match=r"missing weights \(.*\); tokenizer files \(") as info:
        check_model_dir(tmp_path)
    assert str(info.value).startswith(f"{tmp_path}:") and "config.json" not in str(info.value)
    src = default_model_dir()
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(src / name, broken / name)
    (broken / "model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(TextError, match=r"broken: cannot load the model"):
        TextEncoder(broken)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TextError, match=r"install fedrec\[text\] or name a local"):
        default_model_dir()


def test_max_tokens_beyond_the_model_is_rejected() -> None:
    with pytest.raises(TextError, match=r"max_tokens must be between 3 and 512"):
        TextEncoder(max_tokens=4096)


def test_item_texts_from_titles_and_labels(encoder: TextEncoder) -> None:
    inter = pd.DataFrame(
        {
            "user": ["u1", "u1", "u2", "u2"],
            "item": ["10", "20", "30", "40"],
            "timestamp": [1, 2, 3, 4],
        }
    )
    items = pd.DataFrame(
        {
            "item_id": ["10", "20", "30", "40"],
            "title": [TOY, None, "Heat (1995)", None],
            "genres": ["Animation|Children's|Comedy", "Drama", "unknown", None],
        }
    )
    ds = build_dataset("tiny", inter, items)
    texts = item_texts(ds)
    assert texts == [f"{TOY}. Animation, Children's, Comedy", "Drama", "Heat (1995)", ""]
    with pytest.raises(TextError, match=r"1 of 4 texts .*\(indices 3\)"):
        encoder.encode(texts)


def test_item_texts_synthetic_title_and_category() -> None:
    ds = synthetic_ecommerce(n_users=8, n_items=12, n_categories=3, seed=1)
    expected = [f"{t}. {c}" for t, c in zip(ds.items["title"], ds.items["category"], strict=True)]
    assert item_texts(ds) == expected
