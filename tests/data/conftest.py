"""Shared fixtures of the data tests: a small demo corpus, a SentencePiece tokenizer trained on
it, and that corpus preprocessed once (session scope keeps the suite fast)."""
from __future__ import annotations

import json
import warnings

import pytest

warnings.filterwarnings("ignore", module="megatron")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def demo_jsonl(data_dir):
    """First 40 documents of the demo corpus."""
    from megatron_kd.data.demo_corpus import build_demo_corpus

    path = data_dir / "demo.jsonl"
    build_demo_corpus(str(path), max_docs=40)
    return path


@pytest.fixture(scope="session")
def demo_docs(demo_jsonl):
    with open(demo_jsonl, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="session")
def sp_tok(demo_docs, data_dir):
    """A 1000-piece SentencePiece BPE trained on the demo documents."""
    from megatron_kd.data.tokenizers import train_sentencepiece

    return train_sentencepiece([d["text"] for d in demo_docs], 1000, str(data_dir / "sp1k"))


@pytest.fixture(scope="session")
def demo_dataset(demo_jsonl, sp_tok, data_dir):
    """The demo corpus preprocessed with ``sp_tok``; returns the dataset prefix."""
    from megatron_kd.data.preprocess import preprocess

    preprocess([str(demo_jsonl)], str(data_dir / "demo"), sp_tok, progress=False)
    return str(data_dir / "demo_text_document")


@pytest.fixture(scope="session")
def hf_tok_dir(demo_docs, data_dir):
    """A byte-level BPE Hugging Face tokenizer directory (500 ids) trained offline on the demo."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([d["text"] for d in demo_docs], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")
    path = data_dir / "hf_bpe"
    fast.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def big_vocab_dir(data_dir):
    """An HF tokenizer directory with a 70,000-id word-level vocabulary ("w0" ... "w69997")."""
    vocab_size = 70_000
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size - 2)}
    vocab["<unk>"] = vocab_size - 2
    vocab["</s>"] = vocab_size - 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    path = data_dir / "wordlevel70k"
    fast.save_pretrained(str(path))
    return path
