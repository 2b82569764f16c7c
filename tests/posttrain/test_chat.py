"""Chat data (issue 14): JSONL `messages` (role/content, multi-turn) rendered by the tokenizer's chat
template when it has one, else the documented default; a conversation is one example whose loss mask
covers every assistant turn and nothing else (checked against hand-written masks)."""
import json

import pytest

from megatron_kd.posttrain.chat import DEFAULT_TURNS, chat_conversation, chat_examples
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


# CHAT by hand: prompt = "System: be brief" "User: copy a b =" "Assistant:"; the response is the rest,
# trained on "a b <eod>" and "c b a <eod>" only (not on the user turn nor the assistant prefix between).
RESPONSE_WORDS = ["a", "b", "<eod>", "User:", "reverse", "a", "b", "c", "=", "Assistant:", "c", "b", "a", "<eod>"]
RESPONSE_MASK = [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]


def _words(tok, ids):
    return ["<eod>" if t == tok.eod else tok.decode([t]) for t in ids]


def test_conversation_is_one_example_masked_on_every_assistant_turn():
    tok = WordTokenizer(WORDS)
    prompt, response, mask = chat_conversation(CHAT, tok)
    assert _words(tok, prompt) == ["System:", "be", "brief", "User:", "copy", "a", "b", "=", "Assistant:"]
    assert _words(tok, response) == RESPONSE_WORDS and mask == RESPONSE_MASK
    # The batch's loss mask, position by position: label t is token t + 1.
    b = sft_batch([prompt], [response], tok.pad, response_masks=[mask])
    expected = [0] * (len(prompt) - 1) + RESPONSE_MASK
    assert b["loss_mask"][0].tolist() == expected
    trained = [w for w, m in zip(_words(tok, b["labels"][0].tolist()), expected) if m]
    assert trained == ["a", "b", "<eod>", "c", "b", "a", "<eod>"]
    # A trailing user turn has nothing to train on: dropped.
    assert chat_conversation(CHAT + [{"role": "user", "content": "ok"}], tok) == (prompt, response, mask)


def test_too_long_conversation_keeps_the_assistant_turns_that_fit():
    from megatron_kd.posttrain.chat import cut_turns
    from megatron_kd.posttrain.sft import truncate_example

    tok = WordTokenizer(WORDS)
    prompt, response, mask = chat_conversation(CHAT, tok)
    n = len(prompt)
    assert truncate_example(prompt, response, mask, n + len(response)) == (prompt, response, mask)
    # Room for the first turn and part of the second: only the first, whole.
    p, r, m = truncate_example(prompt, response, mask, n + 12)
    assert p == prompt and _words(tok, r) == ["a", "b", "<eod>"] and m == [1, 1, 1]
    # Not even the first turn fits after the whole prompt: the prompt is cut from the left first.
    p, r, m = truncate_example(prompt, response, mask, 5)
    assert _words(tok, p) == ["=", "Assistant:"] and _words(tok, r) == ["a", "b", "<eod>"]
    # The first turn alone is too long even with one prompt token: cut mid-turn.
    p, r, m = truncate_example(prompt, response, mask, 3)
    assert len(p) == 1 and _words(tok, r) == ["a", "b"] and m == [1, 1]
    assert cut_turns(response, mask, 13) == 3 and cut_turns(response, mask, 14) == 14
    # Plain examples keep the old truncation.
    assert truncate_example([5, 6, 7], [8, 9], None, 4) == ([6, 7], [8, 9], None)


def test_preprocess_chat_jsonl_and_bad_records(tmp_path):
    tok = WordTokenizer(WORDS)
    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"prompt": "copy a =", "response": "a"}) + "\n")
    m = preprocess_instructions(src, tok, tmp_path / "out/chat", InstructionTemplate.raw())
    assert m["num_examples"] == 2 and m["num_records"] == 2 and m["response_mask"] is True
    ds = InstructionDataset(tmp_path / "out/chat", tok, verify=True)
    prompt, response, mask = chat_conversation(CHAT, tok)
    assert (ds.prompt(0), ds.response(0), ds.response_mask(0)) == (prompt, response, mask)
    assert _words(tok, ds.reply(0)) == ["a", "b", "<eod>"], "rollouts / ROUGE-L use the first assistant turn"
    assert ds.response_mask(1) is None and ds.reply(1) == ds.response(1) == tok.encode("a") + [tok.eod]
    # SFT batches of the dataset train on the assistant turns only.
    from megatron_kd.posttrain.sft import InstructionBatches, SFTConfig

    batch = InstructionBatches(ds, SFTConfig(batch_size=2, micro_batch_size=2, max_length=64), tok.pad).micro_batches([0])[0]
    assert batch["loss_mask"][0].tolist() == [0] * (len(prompt) - 1) + RESPONSE_MASK
    # --max-response-length: the turns that fit whole.
    m = preprocess_instructions(src, tok, tmp_path / "out/short", InstructionTemplate.raw(), max_response_length=12)
    short = InstructionDataset(tmp_path / "out/short", tok)
    assert _words(tok, short.response(0)) == ["a", "b", "<eod>"] and short.response_mask(0) is None
    # Plain records only: no mask files.
    (tmp_path / "plain.jsonl").write_text(json.dumps({"prompt": "copy a =", "response": "a"}) + "\n")
    assert preprocess_instructions(tmp_path / "plain.jsonl", tok, tmp_path / "out/plain",
                                   InstructionTemplate.raw())["response_mask"] is False
    assert not (tmp_path / "out/plain_response_mask_document.bin").exists()
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
    # The whole conversation as one example: the template's assistant turns are masked in, nothing else.
    prompt, response, mask = chat_conversation(CHAT, Tok())
    assert prompt == p1 and hf.decode(response) == "a b <eos> <|user|> reverse a b c = <|assistant|> c b a <eos>"
    assert mask == RESPONSE_MASK
