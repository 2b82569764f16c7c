"""``eval`` reads checkpoints of the MiniLLM CPU demo, whose tokenizer is a word-list JSON (``tok.json``)."""
import json

import pytest

from megatron_kd.data.tokenizers import WordTokenizer, load_tokenizer
from megatron_kd.posttrain.synthetic import make_records, task_tokenizer, write_jsonl


def test_word_list_json_loads_like_any_tokenizer(tmp_path):
    tok = task_tokenizer()
    tok.save(tmp_path / "tok.json")
    loaded = load_tokenizer(tmp_path / "tok.json")
    assert isinstance(loaded, WordTokenizer) and loaded.identity == tok.identity
    assert loaded.encode("rev a b =") == tok.encode("rev a b =") and loaded.decode(loaded.encode("c a")) == "c a"
    (tmp_path / "other.json").write_text(json.dumps({"model": {}}))
    with pytest.raises(ValueError, match="not a word-tokenizer file"):
        load_tokenizer(tmp_path / "other.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not readable JSON"):
        load_tokenizer(tmp_path / "broken.json")


def test_eval_rouge_and_lm_loss_on_a_word_tokenizer_checkpoint(tmp_path, capsys):
    from megatron_kd.cli import main
    from megatron_kd.models import ModelConfig, build_gpt_model
    from megatron_kd.runtime import ParallelConfig, init_distributed, set_seed
    from megatron_kd.training.checkpoint import save_checkpoint

    tok = task_tokenizer()
    tok.save(tmp_path / "tok.json")
    init_distributed(ParallelConfig())
    set_seed(0)
    cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64, vocab_size=tok.vocab_size,
                      make_vocab_size_divisible_by=8, max_position_embeddings=64)
    save_checkpoint(tmp_path / "ckpt", [build_gpt_model(cfg)], cfg, 0, tokenizer=str(tmp_path / "tok.json"))
    (tmp_path / "tok.json").unlink()  # the checkpoint's bundled copy must be enough
    records = make_records(6, 3)
    write_jsonl(records, tmp_path / "test.jsonl")
    out = tmp_path / "rouge.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "ckpt"), "--rouge", str(tmp_path / "test.jsonl"),
                 "--max-new-tokens", "4", "--output", str(out)]) == 0
    rouge = json.loads(out.read_text())
    assert 0.0 <= rouge["rouge"]["test"]["rougeL"] <= 100.0 and rouge["rouge"]["test"]["n"] == 6
    # LM loss over a preprocessed dataset written with the same word tokenizer.
    write_jsonl([{"text": r["prompt"] + " " + r["response"]} for r in records], tmp_path / "docs.jsonl")
    ckpt_tok = str(next((tmp_path / "ckpt" / "tokenizer").glob("*.json")))
    assert main(["preprocess", "--input", str(tmp_path / "docs.jsonl"), "--tokenizer", ckpt_tok,
                 "--output-prefix", str(tmp_path / "docs"), "--append-eod"]) == 0
    out = tmp_path / "lm.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path / "docs_text_document"),
                 "--seq-length", "16", "--output", str(out)]) == 0
    lm = json.loads(out.read_text())["lm_loss"]["docs_text_document"]
    # A random 1-layer model: close to uniform over the 18 words (log 18 = 2.89 nats), never NaN.
    assert 2.0 < lm["loss"] < 4.5 and lm["tokens"] > 0
