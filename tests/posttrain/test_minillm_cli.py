"""Instruction preprocessing (indexed datasets + manifest, response-only masks) and the CLI:
preprocess-instructions -> sft -> generate (SeqKD data) -> minillm (with eval, checkpoint, resume)."""
import json

import pytest

from megatron_kd.posttrain.data import InstructionDataset, InstructionTemplate, encode_records, preprocess_instructions, sft_batch
from megatron_kd.posttrain.synthetic import WordTokenizer, make_records, task_tokenizer, write_jsonl


def test_preprocess_roundtrip_and_masks(tmp_path):
    tok = task_tokenizer()
    recs = make_records(30, seed=3)
    recs[0]["input"] = "a b"
    write_jsonl(recs, tmp_path / "d.jsonl")
    tpl = InstructionTemplate(template="{prompt}", template_with_input="{prompt} {input}")
    m = preprocess_instructions(tmp_path / "d.jsonl", tok, tmp_path / "out/d", tpl)
    assert m["num_examples"] == 30 and m["tokenizer"]["identity"] == tok.identity
    ds = InstructionDataset(tmp_path / "out/d", tok, verify=True)
    prompts, responses = encode_records(recs, tok, tpl)
    assert [ds.prompt(i) for i in range(30)] == prompts
    assert [ds.response(i) for i in range(30)] == responses
    assert responses[0][-1] == tok.eod and prompts[0][-2:] == tok.encode("a b")
    with pytest.raises(FileExistsError, match="--overwrite"):
        preprocess_instructions(tmp_path / "d.jsonl", tok, tmp_path / "out/d", tpl)
    with pytest.raises(ValueError, match="tokenised with"):
        InstructionDataset(tmp_path / "out/d", WordTokenizer(["x", "y"]))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "copy a =", "response": "a"}\n{"response": 3}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        preprocess_instructions(tmp_path / "bad.jsonl", tok, tmp_path / "out/bad", tpl)
    b = sft_batch([[5, 6, 7], [8]], [[9, 1], [10, 11, 1]], pad_id=0)
    assert b["tokens"].tolist() == [[5, 6, 7, 9], [8, 10, 11, 0]]
    assert b["labels"].tolist() == [[6, 7, 9, 1], [10, 11, 1, 0]]
    assert b["loss_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]


def _save_random_checkpoint(path, layers, hidden, vocab, tokenizer_path):
    from megatron_kd.models import ModelConfig, build_gpt_model
    from megatron_kd.runtime import ParallelConfig, init_distributed, set_seed
    from megatron_kd.training.checkpoint import save_checkpoint

    init_distributed(ParallelConfig())
    set_seed(layers)
    cfg = ModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=2, ffn_hidden_size=64,
                      vocab_size=vocab, make_vocab_size_divisible_by=8, max_position_embeddings=64)
    save_checkpoint(path, [build_gpt_model(cfg)], cfg, 0, tokenizer=str(tokenizer_path))


def test_cli_sft_generate_minillm(tmp_path):
    from megatron_kd.cli import main
    from megatron_kd.training.checkpoint import read_checkpoint_meta

    tok = task_tokenizer()
    tok.save(tmp_path / "tok.json")
    write_jsonl(make_records(64, 0), tmp_path / "train.jsonl")
    write_jsonl(make_records(8, 1), tmp_path / "valid.jsonl")
    for split in ("train", "valid"):
        assert main(["preprocess-instructions", "--input", str(tmp_path / f"{split}.jsonl"), "--tokenizer",
                     str(tmp_path / "tok.json"), "--template", "raw", "--output-prefix", str(tmp_path / split)]) == 0
    _save_random_checkpoint(tmp_path / "teacher0", 2, 32, tok.vocab_size, tmp_path / "tok.json")
    _save_random_checkpoint(tmp_path / "student0", 1, 32, tok.vocab_size, tmp_path / "tok.json")
    common = [f"train_data={tmp_path / 'train'}", "parallel.tensor_parallel=1"]
    assert main(["sft", f"student={tmp_path / 'teacher0'}", f"save={tmp_path / 'teacher'}", f"valid_data={tmp_path / 'valid'}",
                 "sft.total_steps=6", "sft.batch_size=16", "sft.micro_batch_size=8", "eval_interval=3", *common]) == 0
    assert read_checkpoint_meta(tmp_path / "teacher")["iteration"] == 6
    records = [json.loads(line) for line in (tmp_path / "teacher/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 7))
    assert [r["step"] for r in records if r["split"] == "valid"] == [3, 6]
    assert all(r["lm"] > 0 for r in records) and (tmp_path / "teacher/config.yaml").is_file()
    # SeqKD data from the teacher.
    assert main(["generate", "--checkpoint", str(tmp_path / "teacher"), "--input", str(tmp_path / "valid.jsonl"),
                 "--output", str(tmp_path / "seqkd.jsonl"), "--template", "raw", "--max-new-tokens", "5"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "seqkd.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all("gold_response" in r and len(r["response"].split()) <= 5 for r in rows)
    assert main(["generate", "--checkpoint", str(tmp_path / "teacher"), "--input", str(tmp_path / "valid.jsonl"),
                 "--output", str(tmp_path / "seqkd.jsonl")]) == 2  # refuses to overwrite, one-line error
    mcfg = tmp_path / "minillm.yaml"
    mcfg.write_text(f"student: {tmp_path / 'student0'}\nteacher: {tmp_path / 'teacher'}\nsave: {tmp_path / 'mini'}\n"
                    f"eval_data: {tmp_path / 'valid'}\ntotal_steps: 4\neval_interval: 2\nsave_interval: 2\n"
                    "rollout: {num_rollouts: 8, chunk_size: 8, max_new_tokens: 5, max_prompt_length: 16}\n"
                    "ppo: {epochs: 2, batch_size: 4, micro_batch_size: 2}\n"
                    "optim: {lr: 1.0e-3, warmup_steps: 0}\neval: {num_prompts: 8, max_new_tokens: 5}\n")
    assert main(["minillm", "--config", str(mcfg), *common]) == 0
    assert read_checkpoint_meta(tmp_path / "mini")["iteration"] == 4
    records = [json.loads(line) for line in (tmp_path / "mini/metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["split"] == "valid"]
    assert [e["step"] for e in evals] == [2, 4] and all(e["num_prompts"] == 8 for e in evals)
    # Resume: a longer run continues from step 4 (each step recorded once).
    assert main(["minillm", "--config", str(mcfg), "total_steps=6", *common]) == 0
    records = [json.loads(line) for line in (tmp_path / "mini/metrics.jsonl").read_text().splitlines()]
    assert read_checkpoint_meta(tmp_path / "mini")["iteration"] == 6
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 7))
    assert main(["minillm", "--config", str(mcfg), "ppo.batch_size=16"]) == 2  # bad layout: one-line error
