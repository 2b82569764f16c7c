"""GPT datasets through megatron's BlendedMegatronDatasetBuilder, and the resumable iterator.

Samples are checked against the token stream rebuilt independently from the documents, EOD
handling against masks computed here, blends against their weights, and resumption against an
uninterrupted run.

    PYTHONPATH=$PWD python -m pytest -q tests/data/test_data_gpt_dataset.py
"""
import numpy as np
import pytest
import torch

from dist_helpers import run_workers
from megatron_kd.data.gpt_dataset import DataConfig, ResumableBatchIterator, build_gpt_datasets
from megatron_kd.data.manifest import open_indexed_dataset

SEQ = 32


def _window(sample):
    return torch.cat([sample["tokens"][:1], sample["labels"]]).numpy()


def _contains(stream, window):
    """Is ``window`` a contiguous slice of ``stream``?"""
    starts = np.flatnonzero(stream[: len(stream) - len(window) + 1] == window[0])
    return any(np.array_equal(stream[s: s + len(window)], window) for s in starts)


def test_samples_are_windows_of_the_split_documents(demo_dataset, sp_tok, tmp_path):
    cfg = DataConfig(train_prefixes=[demo_dataset], split="80,10,10", seq_length=SEQ, seed=7,
                     cache_dir=str(tmp_path / "cache"))
    train, valid, test = build_gpt_datasets(cfg, sp_tok, 300, 20, 20)
    ds = open_indexed_dataset(demo_dataset)
    n = len(ds)
    bounds = {"train": (0, round(0.8 * n)), "valid": (round(0.8 * n), round(0.9 * n)), "test": (round(0.9 * n), n)}
    for name, split in (("train", train), ("valid", valid), ("test", test)):
        lo, hi = bounds[name]
        stream = np.concatenate([ds[i] for i in range(lo, hi)])
        assert len(split) >= {"train": 300, "valid": 20, "test": 20}[name]
        for idx in range(0, len(split), max(1, len(split) // 12)):
            sample = split[idx]
            assert sample["tokens"].shape == (SEQ,) and sample["labels"].shape == (SEQ,)
            assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
            w = _window(sample)
            # Packed across document boundaries: check each EOD-free piece is from this split.
            for piece in np.split(w, np.flatnonzero(w == sp_tok.eod) + 1):
                if len(piece) > 3:
                    assert _contains(stream, piece), f"{name} sample {idx} has tokens from outside its split"
            assert torch.all(sample["loss_mask"] == 1.0) and torch.equal(sample["position_ids"], torch.arange(SEQ))


def test_eod_options_and_index_cache(demo_dataset, sp_tok, tmp_path):
    cache = tmp_path / "cache"
    cfg = DataConfig(train_prefixes=[demo_dataset], split="1,0,0", seq_length=SEQ, cache_dir=str(cache),
                     reset_position_ids=True, eod_mask_loss=True)
    train, valid, test = build_gpt_datasets(cfg, sp_tok, 200, 0, 0)
    assert valid is None and test is None
    n_files = len(list(cache.iterdir()))
    assert n_files == 4  # description + document/sample/shuffle indices
    seen_eod = False
    for idx in range(len(train)):
        s = train[idx]
        tokens = s["tokens"].numpy()
        eods = np.flatnonzero(tokens == sp_tok.eod)
        seen_eod |= len(eods) > 0
        expected_pos, start = np.zeros(SEQ, dtype=np.int64), 0
        for j, t in enumerate(tokens):  # positions restart after every EOD
            expected_pos[j] = j - start
            if t == sp_tok.eod:
                start = j + 1
        assert np.array_equal(s["position_ids"].numpy(), expected_pos)
        assert np.array_equal(s["loss_mask"].numpy(), (tokens != sp_tok.eod).astype(np.float32))
    assert seen_eod
    again, _, _ = build_gpt_datasets(cfg, sp_tok, 200, 0, 0)  # cache hit: same order, no new files
    assert len(list(cache.iterdir())) == n_files
    assert all(torch.equal(train[i]["tokens"], again[i]["tokens"]) for i in range(0, 200, 17))
    reseeded, _, _ = build_gpt_datasets(DataConfig(**{**cfg.__dict__, "seed": 99}), sp_tok, 200, 0, 0)
    assert not all(torch.equal(train[i]["tokens"], reseeded[i]["tokens"]) for i in range(10))


def test_blend_follows_weights(demo_dataset, sp_tok, tmp_path):
    cfg = DataConfig(train_prefixes=[demo_dataset, demo_dataset], weights=[1.0, 3.0], split="1,0,0",
                     seq_length=SEQ, cache_dir=str(tmp_path / "cache"))
    train, _, _ = build_gpt_datasets(cfg, sp_tok, 400, 0, 0)
    ids = np.array([int(train[i]["dataset_id"]) for i in range(len(train))])
    assert len(train) == 400
    assert abs((ids == 1).mean() - 0.75) < 0.01


def test_config_and_input_errors(demo_dataset, sp_tok, hf_tok_dir, tmp_path):
    with pytest.raises(ValueError, match="train_prefixes is empty"):
        DataConfig()
    with pytest.raises(ValueError, match="one weight per prefix"):
        DataConfig(train_prefixes=["a", "b"], weights=[1.0])
    with pytest.raises(ValueError, match="split"):
        DataConfig(train_prefixes=["a"], split="a,b")
    cfg = DataConfig(train_prefixes=[demo_dataset], seq_length=SEQ, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="was tokenized with"):
        build_gpt_datasets(cfg, str(hf_tok_dir), 10, 1, 1)
    with pytest.raises(ValueError, match="the test split of .* gets 0 of its 40 documents"):
        build_gpt_datasets(DataConfig(train_prefixes=[demo_dataset], split="98,1,1", seq_length=SEQ,
                                      cache_dir=str(tmp_path)), sp_tok, 10, 0, 5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_gpt_datasets(DataConfig(train_prefixes=[str(tmp_path / "none")]), sp_tok, 10, 1, 1)


def test_default_split_of_a_tiny_corpus_builds_without_the_unused_test_split(demo_dataset, sp_tok, tmp_path):
    """40 documents with pretrain's default split 969,30,1: the test split gets none and 0 samples are asked
    of it; megatron's GPTDataset would loop forever on it (it used to hang ``pretrain``)."""
    import signal

    def _hang(*_):
        raise TimeoutError("build_gpt_datasets hung on an empty, unused split")

    cfg = DataConfig(train_prefixes=[demo_dataset], split="969,30,1", seq_length=SEQ, cache_dir=str(tmp_path))
    old = signal.signal(signal.SIGALRM, _hang)
    signal.alarm(120)
    try:
        train, valid, test = build_gpt_datasets(cfg, sp_tok, 50, 5, 0)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert test is None and len(train) >= 50 and len(valid) >= 5
    # Asking for test samples is still refused in one line.
    with pytest.raises(ValueError, match="the test split of .* gets 0 of its 40 documents"):
        build_gpt_datasets(cfg, sp_tok, 50, 5, 1)

def test_synthetic_mode():
    cfg = DataConfig(synthetic=True, seq_length=16, synthetic_vocab_size=100)
    train, valid, _ = build_gpt_datasets(cfg, None, 50, 5, 5)
    batch = next(ResumableBatchIterator(train, 4, 0, 1))
    assert batch["tokens"].shape == (4, 16) and batch["tokens"].max() < 100
    again, _, _ = build_gpt_datasets(cfg, None, 50, 5, 5)
    assert torch.equal(train[3]["tokens"], again[3]["tokens"])
    counts = np.bincount(torch.cat([train[i]["tokens"] for i in range(50)]).numpy(), minlength=100)
    assert counts[0] > counts[50]  # Zipf-like: learnable unigram statistics


def test_iterator_resumes_exactly_and_slices_ranks(demo_dataset, sp_tok, tmp_path):
    cfg = DataConfig(train_prefixes=[demo_dataset], split="1,0,0", seq_length=SEQ, cache_dir=str(tmp_path))
    train, _, _ = build_gpt_datasets(cfg, sp_tok, 96, 0, 0)
    mbs, dp = 3, 2
    runs = {r: list(ResumableBatchIterator(train, mbs, r, dp)) for r in range(dp)}
    steps = len(train) // (mbs * dp)
    assert len(runs[0]) == len(runs[1]) == steps
    for k in range(steps):  # rank r holds block r of the k-th global batch
        for r in range(dp):
            expected = torch.stack([train[k * mbs * dp + r * mbs + j]["tokens"] for j in range(mbs)])
            assert torch.equal(runs[r][k]["tokens"], expected)
    it = ResumableBatchIterator(train, mbs, 1, dp)
    for _ in range(4):
        next(it)
    assert it.consumed_samples == 4 * mbs * dp and it.state_dict() == {"consumed_samples": 24}
    resumed = ResumableBatchIterator(train, mbs, 1, dp, consumed_samples=it.consumed_samples, num_workers=2)
    rest = list(resumed)
    assert len(rest) == steps - 4
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(rest, runs[1][4:]))
    assert resumed.consumed_samples == steps * mbs * dp
    with pytest.raises(ValueError, match="outside the dataset"):
        ResumableBatchIterator(train, mbs, 0, dp, consumed_samples=10_000)


def _dist_build(rank, world_size, prefix, model, cache):
    import torch.distributed as dist

    from megatron_kd.data.tokenizers import load_tokenizer

    dist.init_process_group("gloo")
    cfg = DataConfig(train_prefixes=[prefix, prefix], weights=[1, 1], split="90,10,0", seq_length=SEQ,
                     cache_dir=cache)
    train, valid, _ = build_gpt_datasets(cfg, load_tokenizer(model), 64, 8, 0)
    batches = list(ResumableBatchIterator(train, 2, rank, world_size))
    return [b["tokens"].tolist() for b in batches], len(valid)


@pytest.mark.slow
def test_two_ranks_build_once_and_read_disjoint_slices(demo_dataset, sp_tok, tmp_path):
    res = run_workers(_dist_build, 2, demo_dataset, sp_tok.path, str(tmp_path / "cache"))
    (b0, nv0), (b1, nv1) = res
    assert nv0 == nv1 and len(b0) == len(b1) == 16
    flat0 = [tuple(s) for b in b0 for s in b]
    flat1 = [tuple(s) for b in b1 for s in b]
    assert not set(flat0) & set(flat1)
