"""Small real inputs for post-training commands (tests of --dry-run and of the early checks): a word-list
tokenizer, preprocessed instruction datasets, and random-weight student / teacher checkpoints."""
from __future__ import annotations

from pathlib import Path


def save_random_checkpoint(path, layers: int, vocab: int, tokenizer_path, hidden: int = 32, divisible_by: int = 8):
    """A random-weight GPT checkpoint (2 heads, so TP=2 layouts validate) recording ``tokenizer_path``."""
    from megatron_kd.models import ModelConfig, build_gpt_model
    from megatron_kd.runtime import ParallelConfig, init_distributed, set_seed
    from megatron_kd.training.checkpoint import save_checkpoint

    init_distributed(ParallelConfig())
    set_seed(layers)
    cfg = ModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=2, ffn_hidden_size=64,
                      vocab_size=vocab, make_vocab_size_divisible_by=divisible_by, max_position_embeddings=64)
    save_checkpoint(path, [build_gpt_model(cfg)], cfg, 0, tokenizer=str(tokenizer_path))


def make_inputs(root: Path, num_train: int = 400) -> dict[str, str]:
    """``{"tok", "train", "valid", "student", "teacher"}`` paths under ``root`` (built once per test module)."""
    from megatron_kd.posttrain.data import InstructionTemplate, preprocess_instructions
    from megatron_kd.posttrain.synthetic import make_records, task_tokenizer, write_jsonl

    root = Path(root)
    tok = task_tokenizer()
    tok.save(root / "tok.json")
    for split, n, seed in (("train", num_train, 0), ("valid", 16, 1)):
        write_jsonl(make_records(n, seed), root / f"{split}.jsonl")
        preprocess_instructions(root / f"{split}.jsonl", tok, root / split, InstructionTemplate.raw())
    save_random_checkpoint(root / "teacher", 2, tok.vocab_size, root / "tok.json")
    save_random_checkpoint(root / "student", 1, tok.vocab_size, root / "tok.json")
    return {"tok": str(root / "tok.json"), "train": str(root / "train"), "valid": str(root / "valid"),
            "student": str(root / "student"), "teacher": str(root / "teacher")}


def command_inputs(command: str, paths: dict[str, str], save: str) -> list[str]:
    """The path overrides a post-training command needs on top of its example YAML."""
    common = [f"train_data={paths['train']}", f"checkpoint.save={save}"]
    if command == "sft":
        return [f"student={paths['student']}", f"valid_data={paths['valid']}", *common]
    models = [f"student={paths['student']}", f"teacher={paths['teacher']}", f"eval_data={paths['valid']}"]
    if command == "onpolicy":
        models.append(f"valid_data={paths['valid']}")
    return models + common
