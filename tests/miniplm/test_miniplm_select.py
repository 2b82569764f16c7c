"""``miniplm select``: exactly floor(alpha*N) highest-r instances, in order; outputs and report."""
import json
import math

import numpy as np
import pytest

from miniplm_testlib import make_dataset, random_docs
from megatron_kd.miniplm.dataset_io import dataset_identity, open_dataset
from megatron_kd.miniplm.instances import split_instances
from megatron_kd.miniplm.select import SelectConfig, select_corpus
from megatron_kd.miniplm.store import SCORE_DTYPE, ScoreStore

CHUNK = 8


class ByteTokenizer:
    """Test tokenizer: token i is chr(65 + i % 26); id 299 is the end-of-document token."""

    eod = 299

    def decode(self, ids):
        return "".join(chr(65 + i % 26) for i in ids)

    def encode(self, text):
        return [ord(c) - 65 for c in text]


def _fake_scores(root, data, mode="chunk", shard_size=5, seed=0):
    """A complete scores store with random (tied) NLLs for the dataset's instances."""
    ds = open_dataset(data)
    inst = split_instances(ds.sequence_lengths, CHUNK, mode)
    rng = np.random.default_rng(seed)
    rows = np.zeros(len(inst), dtype=SCORE_DTYPE)
    rows["instance"] = np.arange(len(inst))
    for f in ("doc", "offset", "length"):
        rows[f] = inst[f]
    rows["n_pred"] = inst["length"] - 1
    rows["nll_teacher"] = np.round(rng.uniform(1, 3, len(inst)), 1)
    rows["nll_ref"] = np.round(rng.uniform(1, 5, len(inst)), 1)
    store = ScoreStore(root)
    ident = {"teacher": {"path": "t"}, "reference": {"path": "r"}, "dataset": dataset_identity(data, ds),
             "instances": {"mode": mode, "chunk_length": CHUNK, "min_length": 2}, "shard_size": shard_size,
             "num_instances": len(inst), "tokenizer": None}
    store.create_or_resume(ident)
    for k in range(store.manifest()["num_shards"]):
        store.write_shard(k, rows[k * shard_size:(k + 1) * shard_size])
    store.finalize()
    return rows


@pytest.fixture
def corpus(tmp_path):
    docs = random_docs(25, 1, 40, seed=5, vocab=299)
    docs = [np.append(d, ByteTokenizer.eod) for d in docs]  # preprocess appends the end-of-document id
    domains = ["web" if i % 2 else "code" for i in range(25)]
    data = make_dataset(tmp_path / "src", docs, domains)
    texts = [ByteTokenizer().decode(d[:-1]) for d in docs]
    with open(tmp_path / "src.jsonl", "w") as fh:
        for t in texts:
            fh.write(json.dumps({"text": "verbatim:" + t}) + "\n")
    return tmp_path, data, docs, domains


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.57])
def test_select_keeps_floor_alpha_n_highest_in_order(corpus, alpha):
    tmp, data, docs, domains = corpus
    rows = _fake_scores(tmp / "scores", data)
    out = tmp / f"refined{alpha}"
    report = select_corpus(SelectConfig(scores=str(tmp / "scores"), alpha=alpha, out=str(out), export_text=True),
                           tokenizer=ByteTokenizer())
    n = len(rows)
    k = math.floor(round(alpha * n, 9))
    r = rows["nll_ref"] - rows["nll_teacher"]
    expected = sorted(sorted(range(n), key=lambda i: (-r[i], i))[:k])  # highest r, ties -> earlier, then order
    assert report["kept_instances"] == k and report["num_instances"] == n
    # the refined dataset holds exactly the kept instances' tokens, in corpus order
    refined = open_dataset(out)  # keep it alive: its arrays are views of its mmap
    got = np.concatenate([np.array(refined[i]) for i in range(len(refined))])
    want = np.concatenate([docs[rows["doc"][i]][rows["offset"][i]:rows["offset"][i] + rows["length"][i]]
                           for i in expected])
    assert np.array_equal(got, want)
    meta = [json.loads(line) for line in open(f"{out}.meta.jsonl")]
    firsts = [m["first_instance"] for m in meta]
    assert firsts == sorted(firsts) and set(firsts) <= set(expected)
    assert sum(m["length"] for m in meta) == report["kept_tokens"] == len(want)
    man = json.load(open(f"{out}.manifest.json"))
    assert man["num_tokens"] == len(want) and man["selection"]["kept_instances"] == k
    assert man["tokenizer"] == "test-tokenizer" and len(man["checksums"]["bin_sha256"]) == 64
    thr = report["thresholds"]
    assert thr["r_min_kept"] == pytest.approx(min(r[expected])) and thr["r_max_dropped"] <= thr["r_min_kept"]
    for dom in ("web", "code"):
        in_dom = np.array([domains[d] == dom for d in rows["doc"]])
        assert report["domains"][dom]["kept_instances"] == int(in_dom[expected].sum())
    assert sum(report["histogram"]["kept"]) == k and sum(report["histogram"]["all"]) == n
    assert open(f"{out}.report.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    text = [json.loads(line) for line in open(f"{out}.jsonl")]
    assert len(text) == len(meta)
    for t, m in zip(text, meta):  # detokenised chunks, the end-of-document id dropped
        toks = docs[m["source_doc"]][m["offset"]:m["offset"] + m["length"]]
        assert t["text"] == ByteTokenizer().decode([i for i in toks if i != ByteTokenizer.eod])


def test_export_copies_whole_documents_from_source_jsonl(corpus):
    tmp, data, docs, _ = corpus
    rows = _fake_scores(tmp / "docscores", data, mode="document")
    out = tmp / "docsel"
    select_corpus(SelectConfig(scores=str(tmp / "docscores"), alpha=0.5, out=str(out), export_text=True,
                               source_jsonl=str(tmp / "src.jsonl")))  # no tokenizer needed: all verbatim
    text = [json.loads(line) for line in open(f"{out}.jsonl")]
    assert len(text) == math.floor(0.5 * len(rows)) and all(t["verbatim"] for t in text)
    src = [json.loads(line)["text"] for line in open(tmp / "src.jsonl")]
    assert [t["text"] for t in text] == [src[t["source_doc"]] for t in text]


def test_select_refuses_bad_inputs(corpus):
    tmp, data, _, _ = corpus
    _fake_scores(tmp / "scores", data)
    cfg = dict(scores=str(tmp / "scores"), alpha=0.5, out=str(tmp / "sel"))
    select_corpus(SelectConfig(**cfg))
    with pytest.raises(FileExistsError, match="--overwrite"):
        select_corpus(SelectConfig(**cfg))
    with pytest.raises(ValueError, match="--alpha"):
        select_corpus(SelectConfig(**{**cfg, "alpha": 1.5, "overwrite": True}))
    with pytest.raises(ValueError, match="no tokenizer is known"):
        select_corpus(SelectConfig(**{**cfg, "overwrite": True, "export_text": True}))
    shard = tmp / "scores" / "shard_00001.npy"
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match="checksum"):
        select_corpus(SelectConfig(**{**cfg, "overwrite": True}))
    man = json.loads((tmp / "scores" / "manifest.json").read_text())
    man["complete"] = False
    (tmp / "scores" / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ValueError, match="incomplete"):
        select_corpus(SelectConfig(**{**cfg, "overwrite": True}))
