"""Vocabulary maps between two tokenizers (megatron_kd.data.vocab_map): same-text pairs for the
hybrid loss and the first-token projection for the projected loss.

    PYTHONPATH=$PWD python -m pytest -q tests/data/test_data_vocab_map.py
"""
import numpy as np
import pytest

from megatron_kd.data.alignment import token_bytes
from megatron_kd.data.vocab_map import VocabMap, build_projection, build_vocab_map

CORPUS = ["the function returns the value of the cat", "naïve café functions return values"] * 30


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from megatron_kd.data.tokenizers import load_tokenizer, train_sentencepiece

    d = tmp_path_factory.mktemp("vm")
    small = train_sentencepiece(CORPUS, 280, str(d / "small"))
    big = train_sentencepiece(CORPUS, 310, str(d / "big"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(d / "hf"))
    return small, big, load_tokenizer(d / "hf")


def test_pairs_have_the_same_bytes_and_respect_byte_fallback(toks):
    small, big, hf = toks
    for a, b, least in ((small, big, 270), (small, hf, 15), (hf, big, 15)):
        vm = build_vocab_map(a, b)
        ta, tb = token_bytes(a), token_bytes(b)
        assert len(vm) >= least and len(set(vm.student_ids)) == len(vm) == len(set(vm.teacher_ids))
        for i, j in zip(vm.student_ids, vm.teacher_ids):
            if i == ta.eod:
                assert j == tb.eod
                continue
            assert ta.pieces[i] == tb.pieces[j] and ta.pieces[i]
            assert (i in ta.byte_fallback) == (j in tb.byte_fallback)
    # SentencePiece byte-fallback "<0x41>" never pairs with the byte-level HF token "A"
    vm = build_vocab_map(small, hf)
    assert not set(vm.student_ids) & set(token_bytes(small).byte_fallback)


def test_identical_tokenizers_map_to_identity(toks):
    small, _, hf = toks
    for tok in (small, hf):
        vm = build_vocab_map(tok, tok)
        assert np.array_equal(vm.student_ids, np.arange(tok.vocab_size))
        assert np.array_equal(vm.student_ids, vm.teacher_ids)
        assert np.array_equal(build_projection(tok, tok), np.arange(tok.vocab_size))
    assert VocabMap.identity(5).describe()["matched"] == 5


def test_projection_maps_teacher_tokens_to_the_students_first_token(toks):
    small, big, hf = toks
    for student, teacher in ((small, big), (small, hf)):
        proj = build_projection(student, teacher)
        tb = token_bytes(teacher)
        assert proj.shape == (teacher.vocab_size,)
        checked = 0
        for u, piece in enumerate(tb.pieces):
            if not piece:
                continue
            try:
                text = piece.decode("utf-8")
            except UnicodeDecodeError:
                continue
            assert proj[u] == student.encode(text)[0]
            checked += 1
        assert checked > 20
        assert proj[tb.eod] == student.eod
