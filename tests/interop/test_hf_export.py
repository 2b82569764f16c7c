"""HF export of students: the exported directory loads with ``AutoTokenizer`` and
``AutoModelForCausalLM`` for a SentencePiece student (converted to a fast tokenizer whose ids equal
SentencePiece's) and a HF-tokenizer student (non-null eos), and ``generate`` stops at EOS.

Run: ``PYTHONPATH=$PWD OMP_NUM_THREADS=1 python -m pytest -q tests/interop/test_hf_export.py``
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

SMALL = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
             max_position_embeddings=64)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from megatron_kd.data.demo_corpus import build_demo_corpus

    root = tmp_path_factory.mktemp("corpus")
    build_demo_corpus(str(root / "demo.jsonl"), max_docs=24)
    texts = [json.loads(line)["text"] for line in open(root / "demo.jsonl", encoding="utf-8")]
    return root, texts


@pytest.fixture(scope="module")
def spm_model(corpus):
    from megatron_kd.data.tokenizers import train_sentencepiece

    root, texts = corpus
    return train_sentencepiece(texts, 400, str(root / "spm"))


@pytest.fixture(scope="module")
def hf_tok_dir(corpus):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root, texts = corpus
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    path = root / "hf_bpe"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(path))
    return path


def _student_checkpoint(path: Path, tokenizer: str, vocab: int) -> None:
    """A random student saved with its tokenizer (as pretrain/distill save it)."""
    from megatron_kd.interop.convert import single_process
    from megatron_kd.models import ModelConfig, build_gpt_model
    from megatron_kd.runtime import set_seed
    from megatron_kd.training.checkpoint import save_checkpoint

    with single_process():
        set_seed(3)
        cfg = ModelConfig(**SMALL, vocab_size=vocab)
        save_checkpoint(path, [build_gpt_model(cfg)], cfg, iteration=1, tokenizer=tokenizer, seq_length=32)


def _generate_stops_at_eos(out: Path, prompt: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    eos = tok.eos_token_id
    assert eos is not None and model.generation_config.eos_token_id == eos
    assert model.config.eos_token_id == eos and model.generation_config.pad_token_id is not None
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        free = model.generate(**ids, max_new_tokens=6, do_sample=False)
        assert free.shape[1] == ids["input_ids"].shape[1] + 6 or int(free[0, -1]) == eos
        model.lm_head.weight[eos] += 50.0 * model.lm_head.weight.abs().max()  # make EOS the argmax after a step
        model.model.norm.weight.abs_()
        out_ids = model.generate(**ids, max_new_tokens=20, do_sample=False)
    new = out_ids[0, ids["input_ids"].shape[1]:].tolist()
    assert eos in new and new.index(eos) == len(new) - 1 and len(new) < 20, new


def test_sentencepiece_student_exports_autotokenizer(tmp_path, spm_model, corpus):
    from transformers import AutoTokenizer

    from megatron_kd.interop.convert import mcore_to_hf

    ckpt, out = tmp_path / "student", tmp_path / "hf"
    _student_checkpoint(ckpt, spm_model.path, 400)
    mcore_to_hf(ckpt, out, show_progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "tokenizer.model"):
        assert (out / name).is_file(), name
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["eos_token_id"], gen["bos_token_id"], gen["pad_token_id"]) == (spm_model.eod, 1, spm_model.pad)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    _, texts = corpus
    samples = texts + ["  two  spaces\n\nand\ttabs ", "ünïcödé 😀 bytes", "x = 3.14159 # digits"]
    for text in samples:  # the fast tokenizer encodes and decodes exactly like SentencePiece
        assert tok.encode(text, add_special_tokens=False) == spm_model.encode(text)
        assert tok.decode(spm_model.encode(text)) == text
    _generate_stops_at_eos(out, "def main(")


def test_hf_tokenizer_student_exports_eos(tmp_path, hf_tok_dir):
    from megatron_kd.interop.convert import mcore_to_hf

    ckpt, out = tmp_path / "student", tmp_path / "hf"
    _student_checkpoint(ckpt, str(hf_tok_dir), 400)
    assert (ckpt / "tokenizer" / "tokenizer.json").is_file()
    mcore_to_hf(ckpt, out, show_progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["eos_token_id"] == 0 and json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 0
    _generate_stops_at_eos(out, "def main(")
