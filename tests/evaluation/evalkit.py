"""Shared helpers for the evaluation tests: a byte tokenizer, a tiny model, float64 references."""
from __future__ import annotations

import numpy as np
import torch

CFG = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
           vocab_size=300, max_position_embeddings=64)
EOD = 256


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, end-of-document 256 (model vocab 300 > 257: some real ids unused)."""

    vocab_size = 257
    eod = EOD
    pad = EOD
    identity = "bytes:test"
    path = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


def model_config():
    from megatron_kd.models import ModelConfig

    return ModelConfig(**CFG)


def build_model(state=None, seed: int = 0):
    """This rank's stage of the tiny model (parallel_state initialised); ``state``: full weights."""
    from megatron_kd.models import build_gpt_model
    from megatron_kd.models.sharding import gather_full_state, load_full_state
    from megatron_kd.runtime import set_seed

    set_seed(seed)
    cfg = model_config()
    model = build_gpt_model(cfg)
    if state is None:
        state = gather_full_state(model, cfg)
    else:
        load_full_state(model, state, cfg)
    model.eval()
    return model, state


def ref_logprobs(model, ids: list[int]) -> np.ndarray:
    """float64 log p(ids[t+1] | ids[:t+1]) for t = 0..n-2 from one unpadded forward (TP=1, PP=1)."""
    tokens = torch.tensor([ids[:-1]])
    with torch.no_grad():
        logits = model(tokens, torch.arange(len(ids) - 1)[None], None)[0, :, : CFG["vocab_size"]].double()
    lp = torch.log_softmax(logits, dim=-1)
    return lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()


def ref_greedy(model, ids: list[int], n_new: int, eod: int = EOD) -> list[int]:
    """Greedy continuation from full logits (TP=1, PP=1), stopping at ``eod``."""
    ids, new = list(ids), []
    for _ in range(n_new):
        with torch.no_grad():
            logits = model(torch.tensor([ids]), torch.arange(len(ids))[None], None)[0, -1, : CFG["vocab_size"]]
        nxt = int(logits.double().argmax())
        if nxt == eod:
            break
        ids.append(nxt)
        new.append(nxt)
    return new


def write_indexed_dataset(prefix: str, docs: list[list[int]]) -> None:
    """A megatron indexed dataset with one sequence per document."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in docs:
        builder.add_document(torch.tensor(doc, dtype=torch.int64), [len(doc)])
    builder.finalize(prefix + ".idx")


def random_docs(seed: int, lengths: list[int], vocab: int = 257) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=n).tolist() for n in lengths]


MC_EXAMPLES = [
    {"context": "The cat sat on the", "choices": ["mat", "moon", "dog house"], "label": 0},
    {"context": "2 + 2 =", "choices": ["4", "five", "22"], "label": 1},
    {"context": "Paris is the capital of ", "choices": ["France", "Italy"], "label": 0, "id": "trailing-space"},
    {"context": "", "choices": ["hello world", "x"], "label": 1, "id": "empty-context"},
    {"context": "Ünïcode ✓ test:", "choices": ["ok", "no way", "perhaps so"], "label": 2},
    {"context": "A long context " * 6, "choices": ["end", "stop", "fin", "halt"], "label": 3},
]


def ref_choice_loglikelihoods(model, examples=MC_EXAMPLES, delimiter: str = " ",
                              max_length: int = CFG["max_position_embeddings"]) -> list[list[float]]:
    """Independent float64 log p(delimiter + choice | EOD + context) with the byte tokenizer
    (bytes never merge, so the context/continuation split is exact); inputs keep their last
    ``max_length`` tokens."""
    out = []
    for ex in examples:
        ctx, lls = ex["context"], []
        stripped = ctx.rstrip()
        for choice in ex["choices"]:
            cont = ctx[len(stripped):] + delimiter + choice
            c_ids, k_ids = list(stripped.encode()), list(cont.encode())
            lp = ref_logprobs(model, ([EOD] + c_ids + k_ids)[-(max_length + 1):])
            lls.append(float(lp[-len(k_ids):].sum()))
        out.append(lls)
    return out
