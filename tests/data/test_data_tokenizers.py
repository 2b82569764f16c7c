"""Tokenizers: SentencePiece training is deterministic and lossless; HF directories match the
`tokenizers` library's own encoding; identities are stable and discriminating; bad paths fail
with one-line errors.

    PYTHONPATH=$PWD python -m pytest -q tests/data/test_data_tokenizers.py
"""
import pickle
import shutil

import pytest

from megatron_kd.data.tokenizers import HFTokenizer, SentencePieceTokenizer, load_tokenizer, train_sentencepiece

ODD_TEXTS = [
    "def f(x):\n    return x ** 2\t# tab\n\n\n",
    "naïve café — 中文 テキスト 🙂 \x00 control",
    "   leading and trailing spaces   ",
    "",
]


def test_sentencepiece_training_is_deterministic(demo_docs, sp_tok, tmp_path):
    texts = [d["text"] for d in demo_docs]
    again = train_sentencepiece(texts, 1000, str(tmp_path / "again"))
    assert again.identity == sp_tok.identity
    assert (tmp_path / "again.model").read_bytes() == open(sp_tok.path, "rb").read()
    other = train_sentencepiece(texts, 900, str(tmp_path / "other"))
    assert other.identity != sp_tok.identity
    assert (tmp_path / "again.manifest.json").is_file()


def test_sentencepiece_roundtrip_and_specials(sp_tok, demo_docs):
    assert isinstance(sp_tok, SentencePieceTokenizer)
    assert (sp_tok.vocab_size, sp_tok.eod, sp_tok.pad) == (1000, 2, 3)
    for text in ODD_TEXTS + [d["text"] for d in demo_docs[:5]]:
        ids = sp_tok.encode(text)
        assert sp_tok.decode(ids) == text  # identity normalisation + byte fallback: lossless
        assert 0 not in ids  # never <unk>
        assert all(0 <= i < sp_tok.vocab_size for i in ids)
    # Unseen characters fall back to their UTF-8 bytes.
    assert [sp_tok.id_to_piece(i) for i in sp_tok.encode("🙂")] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
    assert sp_tok.encode_batch(ODD_TEXTS) == [sp_tok.encode(t) for t in ODD_TEXTS]


def test_load_sentencepiece_variants_and_pickle(sp_tok, tmp_path):
    (tmp_path / "dir").mkdir()
    shutil.copy(sp_tok.path, tmp_path / "dir" / "tokenizer.model")
    in_dir = load_tokenizer(tmp_path / "dir")
    assert isinstance(in_dir, SentencePieceTokenizer) and in_dir.identity == sp_tok.identity
    clone = pickle.loads(pickle.dumps(sp_tok))
    assert clone.identity == sp_tok.identity and clone.encode("abc def") == sp_tok.encode("abc def")
    assert load_tokenizer(sp_tok) is sp_tok


def test_hf_directory_matches_tokenizers_library(hf_tok_dir, demo_docs):
    from tokenizers import Tokenizer as RustTokenizer

    tok = load_tokenizer(hf_tok_dir)
    assert isinstance(tok, HFTokenizer)
    reference = RustTokenizer.from_file(str(hf_tok_dir / "tokenizer.json"))
    assert tok.eod == reference.token_to_id("<|endoftext|>")
    assert tok.pad == reference.token_to_id("<pad>")
    assert tok.vocab_size == reference.get_vocab_size()
    texts = [d["text"][:2000] for d in demo_docs[:5]] + ODD_TEXTS
    for text in texts:
        assert tok.encode(text) == reference.encode(text, add_special_tokens=False).ids
        assert tok.decode(tok.encode(text)) == text  # byte-level BPE is lossless
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert pickle.loads(pickle.dumps(tok)).identity == tok.identity


def test_hf_identity_tracks_the_vocabulary(hf_tok_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(hf_tok_dir, copy)
    assert load_tokenizer(copy).identity == load_tokenizer(hf_tok_dir).identity  # path-independent
    text = (copy / "tokenizer.json").read_text()
    (copy / "tokenizer.json").write_text(text.replace('"<pad>"', '"<pad2>"'))
    assert load_tokenizer(copy).identity != load_tokenizer(hf_tok_dir).identity


def test_bad_tokenizer_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.model")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "empty_dir")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a valid SentencePiece model"):
        load_tokenizer(tmp_path / "junk.model")
    with pytest.raises(ValueError, match="vocab_size"):
        train_sentencepiece(["a b c"], 100, str(tmp_path / "tiny"))
    with pytest.raises(ValueError, match="smaller vocab_size"):
        train_sentencepiece(["just a few words"], 5000, str(tmp_path / "toolarge"))
    assert not (tmp_path / "toolarge.model").exists()
    # Too many distinct characters for the ids: the advice is to grow vocab_size, by how much it says.
    text = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 120))
    with pytest.raises(ValueError, match=r"too small .* use a vocab_size of at least (\d+)") as err:
        train_sentencepiece([text], 300, str(tmp_path / "cjk"))
    need = int(err.value.args[0].rsplit(" ", 1)[-1])
    assert need > 300 and train_sentencepiece([text], need, str(tmp_path / "cjk")).vocab_size == need
