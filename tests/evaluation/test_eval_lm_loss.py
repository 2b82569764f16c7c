"""Held-out LM loss: equals a float64 reference from the model's logits; windows; batch input."""
import math

import numpy as np
import pytest
import torch

from evalkit import ByteTokenizer, build_model, random_docs, ref_logprobs, write_indexed_dataset
from megatron_kd.evaluation.lm_loss import document_windows, evaluate_lm_loss, open_eval_dataset

LENGTHS = [1, 2, 5, 9, 17, 40, 8]
SEQ = 8


def test_document_windows_score_every_token_but_the_first_once():
    windows = document_windows([1, 2, 9, 17], 8)
    assert [(w.doc, w.start, w.end) for w in windows] == [(1, 0, 2), (2, 0, 9), (3, 0, 9), (3, 8, 17)]
    for n in range(0, 30):
        predicted = [t for w in document_windows([n], 4) for t in range(w.start + 1, w.end)]
        assert predicted == list(range(1, n))
    with pytest.raises(ValueError, match="seq_length"):
        document_windows([3], 0)


def _reference(model, docs, seq):
    """Independent float64 loss: each window forwarded alone, unpadded."""
    nll, count = 0.0, 0
    for doc in docs:
        for start in range(0, max(len(doc) - 1, 0), seq):
            window = doc[start:start + seq + 1]
            lp = ref_logprobs(model, window)
            nll -= lp.sum()
            count += len(lp)
    return nll / count, count


def test_lm_loss_equals_float64_reference(dist1, tmp_path):
    model, _ = build_model()
    docs = random_docs(0, LENGTHS)
    write_indexed_dataset(str(tmp_path / "held"), docs)
    ds = open_eval_dataset(tmp_path / "held.bin")  # extension is stripped
    ref_loss, ref_count = _reference(model, docs, SEQ)
    for mbs in (1, 3):
        out = evaluate_lm_loss(model, ds, vocab_size=300, seq_length=SEQ, micro_batch_size=mbs, show_progress=False)
        assert out["tokens"] == ref_count == sum(n - 1 for n in LENGTHS if n > 1)
        assert out["loss"] == pytest.approx(ref_loss, rel=1e-5)
        assert out["ppl"] == pytest.approx(math.exp(ref_loss), rel=1e-5)
        assert out["windows"] == len(document_windows(LENGTHS, SEQ))
    # A plain list of token arrays works the same; max_documents keeps a prefix of documents.
    out = evaluate_lm_loss(model, [np.array(d) for d in docs[:4]], 300, SEQ, show_progress=False)
    assert out["loss"] == pytest.approx(_reference(model, docs[:4], SEQ)[0], rel=1e-5)
    assert evaluate_lm_loss(model, ds, 300, SEQ, max_documents=4, show_progress=False)["loss"] == \
        pytest.approx(out["loss"], rel=1e-6)


def test_bits_per_byte_and_batches_input(dist1):
    model, _ = build_model()
    docs = [list("hello world, hello!".encode()), list("ünïcode text".encode())]
    tok = ByteTokenizer()
    out = evaluate_lm_loss(model, docs, 300, SEQ, tokenizer=tok, show_progress=False)
    n_bytes = sum(len(d) for d in docs)  # whole documents, one byte per token here
    assert out["bytes"] == n_bytes
    assert out["bits_per_byte"] == pytest.approx(out["nll_sum"] / math.log(2) / n_bytes)
    # Training-style batches: token-weighted mean over loss_mask.
    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(3):
        toks = torch.randint(0, 257, (2, 7), generator=g)
        labels = torch.randint(0, 257, (2, 7), generator=g)
        mask = (torch.rand(2, 7, generator=g) > 0.3).float()
        batches.append({"tokens": toks, "labels": labels, "loss_mask": mask})
    got = evaluate_lm_loss(model, iter(batches), 300)
    nll = count = 0.0
    for b in batches:
        with torch.no_grad():
            logits = model(b["tokens"], torch.arange(7)[None].expand(2, -1), None)[..., :300].double()
        lp = torch.log_softmax(logits, -1).gather(-1, b["labels"][..., None])[..., 0]
        nll -= (lp * b["loss_mask"]).sum().item()
        count += b["loss_mask"].sum().item()
    assert got["tokens"] == count and got["loss"] == pytest.approx(nll / count, rel=1e-5)


def test_out_of_vocab_ids_and_missing_files_fail_in_one_line(dist1, tmp_path):
    model, _ = build_model()
    with pytest.raises(ValueError, match="outside the model vocabulary"):
        evaluate_lm_loss(model, [np.array([1, 2, 400])], 300, SEQ, show_progress=False)
    with pytest.raises(FileNotFoundError, match="nothere.bin does not exist"):
        open_eval_dataset(tmp_path / "nothere")
    with pytest.raises(ValueError, match="needs seq_length"):
        evaluate_lm_loss(model, [np.array([1, 2])], 300)
