"""A mixture-of-experts teacher behind the offline consumers: the teacher-logits store (``megatron-kd
logits``) and MiniPLM scores (``megatron-kd miniplm score``) made from converted Qwen2-MoE (shared
expert, top-4 un-renormalised) and Mixtral (top-2) checkpoints equal a direct ``transformers``
forward of the original HF models: stored ids exactly, log-probs within the codec's tolerance,
mean NLLs within 1e-4."""

import numpy as np
import pytest
import torch

import logits_testlib as L
import miniplm_testlib as M
from dist_helpers import run_workers
from moe_hf import make_hf_moe

VOCAB = L.TEACHER["vocab_size"]  # 1000: the logits-store dataset's ids
STEP = 1.0 / 16
CHUNK = 16


def _worker(rank, world_size, base, teacher_hf, reference_hf):
    from megatron_kd.interop import hf_to_mcore
    from megatron_kd.logits.precompute import PrecomputeConfig, precompute_logits
    from megatron_kd.miniplm.score import ScoreConfig, score_corpus

    teacher, reference = f"{base}/teacher", f"{base}/reference"
    hf_to_mcore(teacher_hf, teacher, show_progress=False)
    hf_to_mcore(reference_hf, reference, show_progress=False)
    precompute_logits(PrecomputeConfig(teacher=teacher, data=f"{base}/ds", out=f"{base}/store", top_p=L.TOP_P,
                                       top_k=L.TOP_K, seq_length=L.SEQ, overlap=L.OVERLAP, micro_batch_size=2,
                                       shard_tokens=300, dtype="fp32"))
    score_corpus(ScoreConfig(teacher=teacher, reference=reference, data=f"{base}/plm", out=f"{base}/scores",
                             chunk_length=CHUNK, shard_size=8, micro_batch_size=2))
    return True


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("moe_teacher")
    teacher_hf = make_hf_moe("qwen2_moe", base / "hf", vocab=VOCAB, out_scale=8.0)
    reference_hf = make_hf_moe("mixtral", base / "hf", vocab=VOCAB)
    from megatron_kd.data.tokenizers import load_tokenizer

    # The dataset's manifest names the teacher's tokenizer, as preprocess with it would.
    L.make_dataset(str(base / "ds"), tokenizer_identity=load_tokenizer(str(teacher_hf)).identity)
    M.make_dataset(base / "plm", M.random_docs(12, 1, 40, seed=5, vocab=VOCAB), tokenizer=str(teacher_hf))
    assert run_workers(_worker, 1, str(base), str(teacher_hf), str(reference_hf), timeout=900) == [True]
    return base, teacher_hf, reference_hf


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_logits_store_from_moe_teacher_equals_transformers(built):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_kd.logits import LogitsStore

    base, teacher_hf, _ = built
    model, store, ds = _hf(teacher_hf), LogitsStore(str(base / "store")), IndexedDataset(str(base / "ds"))
    assert store.manifest["complete"]
    checked, counts = 0, set()
    for d in range(len(ds)):
        doc = ds[d].astype(np.int64)
        n = len(doc)
        ids, lps = store.get(d)
        for s in sorted({L.window_start(o) for o in range(n - 1)}):
            with torch.no_grad():
                lsm = torch.log_softmax(model(torch.from_numpy(doc[s:s + L.SEQ])[None]).logits[0].double(), -1).numpy()
            for o in range(s, min(s + L.SEQ, n - 1)):
                if L.window_start(o) != s:
                    continue
                want = L.truncate_reference(lsm[o - s])
                got = {int(i): float(v) for i, v in zip(ids[o], lps[o]) if i >= 0}
                assert set(got) == set(want), (d, o)
                top = max(want.values())
                assert max(abs(got[i] - want[i]) for i in want) <= STEP / 2 + abs(top) * 2.0 ** -11 + 1e-4
                counts.add(len(got))
                checked += 1
    assert checked == sum(n - 1 for n in L.DOC_LENGTHS)
    assert 1 in counts and len(counts) > 3  # peaked and flat rows: a real truncation


def test_miniplm_scores_from_moe_models_equal_transformers(built):
    from megatron_kd.miniplm.dataset_io import open_dataset
    from megatron_kd.miniplm.store import ScoreStore

    base, teacher_hf, reference_hf = built
    rows, manifest = ScoreStore(str(base / "scores")).read()
    assert manifest["complete"] and len(rows) > 10
    models = (_hf(teacher_hf), _hf(reference_hf))
    ds = open_dataset(str(base / "plm"))
    for row in rows:
        toks = torch.as_tensor(np.asarray(ds.get(int(row["doc"]), offset=int(row["offset"]),
                                                  length=int(row["length"])), dtype=np.int64))[None]
        want = []
        for m in models:
            with torch.no_grad():
                logp = torch.log_softmax(m(toks[:, :-1]).logits[0].double(), -1)
            want.append(float(-logp.gather(-1, toks[0, 1:, None]).mean()))
        assert abs(row["nll_teacher"] - want[0]) < 1e-4 and abs(row["nll_ref"] - want[1]) < 1e-4, row
    assert np.abs(rows["nll_teacher"] - rows["nll_ref"]).max() > 1e-3
