"""Chat data (issue 14): JSONL `messages` (role/content, multi-turn) rendered by the tokenizer's chat
template when it has one, else the documented default; the loss is on assistant turns only."""
import json

import pytest

from megatron_kd.posttrain.chat import DEFAULT_TURNS, chat_examples
from megatron_kd.posttrain.data import InstructionDataset, InstructionTemplate, preprocess_instructions, sft_batch
from megatron_kd.posttrain.synthetic import WordTokenizer

WORDS = ["System:", "User:", "Assistant:", "be", "brief", "copy", "a", "b", "c", "reverse", "=", "ok"]
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "copy a b ="},
        {"role": "assistant", "content": "a b"}, {"role": "user", "content": "reverse a b c ="},
        {"role": "assistant", "content": "c b a"}]


def test_default_template_one_example_per_assistant_turn():
    tok = WordTokenizer(WORDS)
    enc = tok.encode
    (p1, r1), (p2, r2) = chat_examples(CHAT, tok)
    assert DEFAULT_TURNS["assistant"] == "Assistant:"
    assert p1 == enc("System: be brief") + enc("User: copy a b =") + enc("Assistant:")
    assert r1 == enc("a b") + [tok.eod]
    assert p2 == p1 + r1 + enc("User: reverse a b c =") + enc("Assistant:")
    assert r2 == enc("c b a") + [tok.eod]
    # The loss mask of each example covers exactly its assistant turn (+ eod).
    b = sft_batch([p1, p2], [r1, r2], tok.pad)
    for row, (p, r) in enumerate(((p1, r1), (p2, r2))):
        labels = [int(t) for t, m in zip(b["labels"][row], b["loss_mask"][row]) if m]
        assert labels == r


def test_preprocess_chat_jsonl_and_bad_records(tmp_path):
    tok = WordTokenizer(WORDS)
    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"prompt": "copy a =", "response": "a"}) + "\n")
    m = preprocess_instructions(src, tok, tmp_path / "out/chat", InstructionTemplate.raw())
    assert m["num_examples"] == 3 and m["num_records"] == 2
    ds = InstructionDataset(tmp_path / "out/chat", tok)
    assert [ds.response(i) for i in range(2)] == [r for _, r in chat_examples(CHAT, tok)]
    for bad, msg in (({"messages": []}, "non-empty"), ({"messages": [{"role": "bot", "content": "x"}]}, "role"),
                     ({"messages": [{"role": "user", "content": "a"}]}, "no assistant turn")):
        (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=msg) as err:
            preprocess_instructions(tmp_path / "bad.jsonl", tok, tmp_path / "out/bad", overwrite=True)
        assert "bad.jsonl:1" in str(err.value) and "\n" not in str(err.value)


def test_tokenizer_chat_template_is_used_when_present():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>", *WORDS[3:]])}
    core = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>")
    hf.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}"
                        "{% if m['role'] == 'assistant' %} <eos>{% endif %} {% endfor %}"
                        "{% if add_generation_prompt %}<|assistant|> {% endif %}")

    class Tok:
        eod, pad, _tok = 1, 0, hf

        def encode(self, text):
            return hf.encode(text, add_special_tokens=False)

    (p1, r1), (p2, r2) = chat_examples(CHAT, Tok())
    assert hf.decode(p1) == "<|system|> be brief <|user|> copy a b = <|assistant|>"
    assert hf.decode(r1) == "a b <eos>" and hf.decode(r2) == "c b a <eos>"
    assert p2[: len(p1) + len(r1)] == p1 + r1
