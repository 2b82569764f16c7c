"""Byte spans and the byte-offset alignment of two tokenisations (megatron_kd.data.alignment).

Hand-written strings with multi-byte characters, runs of spaces, SentencePiece byte-fallback
pieces, a byte-level BPE that splits characters into bytes and a BPE that merges across words.
References are independent of the module: the tokenizers' own ``decode`` of id prefixes, and
brute-force set intersections of boundaries.

    PYTHONPATH=$PWD python -m pytest -q tests/data/test_data_alignment.py
"""
import numpy as np
import pytest

from megatron_kd.data.alignment import (align_ends, align_texts, align_window, char_to_byte_offsets,
                                        encode_with_spans, token_bytes)

CORPUS = [
    "the cat sat on the mat. the cat sat on the hat.",
    "naïve café — the cat ate 北京 noodles   with   spaces",
    "def f(x):\n    return x ** 2",
    "über straße ünd the cat sat",
] * 20

TEXTS = [
    "the cat sat on the mat",
    "naïve café — 北京 🙂 ok",           # 2-, 3- and 4-byte characters; 🙂 is unseen: byte fallback
    "a    b\t\t c   ",                  # runs of spaces and tabs
    "🙂🙂x",                              # consecutive byte-fallback characters
    "the cat sat on the hat. the cat",   # merged across words by the cross-word BPE
]


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from megatron_kd.data.tokenizers import load_tokenizer, train_sentencepiece

    d = tmp_path_factory.mktemp("tok")
    sp_a = train_sentencepiece(CORPUS, 300, str(d / "a"))
    sp_b = train_sentencepiece(CORPUS, 300, str(d / "b"), model_type="unigram")

    def hf(name, pre, vocab):
        tok = Tokenizer(models.BPE())
        if pre is not None:
            tok.pre_tokenizer = pre
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(CORPUS, trainer)
        PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(d / name))
        return load_tokenizer(d / name)

    byte_level = hf("bytelevel", pre_tokenizers.ByteLevel(add_prefix_space=False), 400)
    # No word splitting: merges run across spaces ("the cat" is one token).
    cross = hf("crossword", pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False), 420)
    return {"sp_bpe": sp_a, "sp_unigram": sp_b, "bytelevel": byte_level, "crossword": cross}


def _reference_ends(tok, text):
    """End byte of every token from the tokenizer's own decoder (prefix decodes); None inside a char."""
    ids = tok.encode(text)
    out = []
    for j in range(len(ids)):
        prefix = tok.decode(ids[: j + 1])
        out.append(None if "\ufffd" in prefix[-1:] else len(prefix.encode("utf-8")))
    return ids, out


@pytest.mark.parametrize("name", ["sp_bpe", "sp_unigram", "bytelevel", "crossword"])
def test_spans_cover_the_text_bytes(toks, name):
    tok = toks[name]
    for text in TEXTS:
        spans = encode_with_spans(tok, text)
        data = text.encode("utf-8")
        assert list(spans.ids) == tok.encode(text)
        assert spans.starts[0] == 0 and spans.ends[-1] == len(data)
        assert np.all(spans.starts[1:] == np.where(spans.ends[:-1] >= 0, spans.ends[:-1], spans.starts[1:]))
        table = token_bytes(tok)
        for i, s, e in zip(spans.ids, spans.starts, spans.ends):
            assert data[s:e] == table.pieces[i]  # each token's bytes sit at its span
        ids, ref = _reference_ends(tok, text)
        for j, r in enumerate(ref):
            if r is not None:  # complete characters: the decoder agrees on the end byte
                assert spans.ends[j] == r, (name, text, j)


def test_byte_fallback_pieces_are_one_byte_each(toks):
    sp = toks["sp_bpe"]
    spans = encode_with_spans(sp, "🙂🙂x")
    pieces = [sp.id_to_piece(i) for i in spans.ids]
    assert pieces[:8] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"] * 2
    assert list(spans.ends) == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert token_bytes(sp).byte_fallback >= set(int(i) for i in spans.ids[:8])


def test_char_to_byte_offsets():
    assert list(char_to_byte_offsets("aé北🙂")) == [0, 1, 3, 6, 10]


def test_identical_tokenizers_align_to_the_identity(toks):
    for name, tok in toks.items():
        for text in TEXTS:
            s, t, index = align_texts(tok, tok, text)
            assert list(index) == list(range(len(s.ids))), name


def test_alignment_equals_brute_force_boundary_intersection(toks):
    pairs = [("sp_bpe", "crossword"), ("crossword", "sp_bpe"), ("sp_unigram", "bytelevel"), ("sp_bpe", "sp_unigram")]
    unaligned = 0
    for a, b in pairs:
        for text in TEXTS:
            _, ref_s = _reference_ends(toks[a], text)
            _, ref_t = _reference_ends(toks[b], text)
            s, t, index = align_texts(toks[a], toks[b], text)
            for j, end in enumerate(ref_s):
                hits = [k for k, e in enumerate(ref_t) if e is not None and e == end]
                if end is None or not hits:
                    assert index[j] == -1 or ref_s[j] is None
                    unaligned += int(index[j] == -1)
                else:
                    assert index[j] == hits[-1], (a, b, text, j)
    assert unaligned > 0  # the cross-word merges leave student positions without a teacher boundary


def test_cross_word_merges_leave_inner_positions_unaligned(toks):
    text = "the cat sat on the mat"
    s, t, index = align_texts(toks["sp_bpe"], toks["crossword"], text)
    data = text.encode()
    assert any(b" " in data[a:e].strip() for a, e in zip(t.starts, t.ends))  # a token spans a space
    inner = [j for j, e in enumerate(s.ends) if e not in set(t.ends.tolist())]
    assert inner and all(index[j] == -1 for j in inner)
    assert all(t.ends[index[j]] == s.ends[j] for j in range(len(s.ids)) if index[j] >= 0)


def test_align_ends_rules_by_hand():
    # "ab cd": student ["ab", " cd"] ends [2, 5]; teacher ["ab c", "d"] ends [4, 5].
    assert list(align_ends([2, 5], [4, 5])) == [-1, 1]
    assert list(align_ends([2, 5], [4, 5], "nearest_earlier")) == [-1, 1]
    assert list(align_ends([3, 4, 6, 9], [2, 4, 4, 8], "nearest_earlier")) == [0, 2, 2, 3]
    assert list(align_ends([1, -1, 3], [1, -1, 3])) == [0, -1, 2]  # -1: inside a character
    with pytest.raises(ValueError, match="alignment rule"):
        align_ends([1], [1], "bogus")


def test_window_with_documents_and_edges(toks):
    sp, cross = toks["sp_bpe"], toks["crossword"]
    docs = ["the cat sat on the mat", "naïve 🙂 café"]
    ids = sp.encode(docs[0]) + [sp.eod] + sp.encode(docs[1]) + [sp.eod]
    # Start the window inside the 4 byte-fallback pieces of 🙂 (a partial character at the edge).
    start = ids.index(sp.encode("🙂")[0], len(sp.encode(docs[0])) + 1) + 2
    for window in (ids, ids[start:]):
        w = align_window(window, token_bytes(sp), cross, teacher_length=len(window) + 5)
        n = len(window) - 1
        assert w.teacher_index.shape == (n,) and w.teacher_tokens.shape == (len(window) + 5,)
        for j, k in enumerate(w.teacher_index):
            if k >= 0:
                assert w.teacher_ends[k] == w.student_ends[j]
        # end of document aligns with the teacher's end of document
        for j in range(n):
            if window[j] == sp.eod:
                assert w.teacher_tokens[w.teacher_index[j]] == cross.eod
        assert w.teacher_tokens[-1] == cross.eod  # padding
    # Cut short: positions beyond the teacher window are unaligned.
    w = align_window(ids, token_bytes(sp), cross, teacher_length=3)
    assert (w.teacher_index[w.student_ends > w.teacher_ends.max()] == -1).all()


def test_normalising_sentencepiece_is_refused(tmp_path):
    import io

    import sentencepiece as spm

    from megatron_kd.data.tokenizers import SentencePieceTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=40,
                                   minloglevel=2, character_coverage=1.0)  # nmt_nfkc + collapsed spaces
    (tmp_path / "n.model").write_bytes(model.getvalue())
    tok = SentencePieceTokenizer(tmp_path / "n.model")
    assert list(encode_with_spans(tok, "the cat").ends)[-1] == 7  # dummy prefix handled
    with pytest.raises(ValueError, match="lossless tokenizer"):
        encode_with_spans(tok, "a    b")
