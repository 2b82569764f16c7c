"""Sentence splitting for ``preprocess --split-sentences`` with nltk's Punkt, fully offline.

nltk's pretrained Punkt models are a separate download (``nltk.download("punkt_tab")``), which is
impossible without network. So: if the model for ``lang`` is already installed in an nltk data
directory it is used; otherwise an unsupervised ``PunktTrainer`` is trained on the first
``train_chars`` characters of the input itself (Punkt was designed for exactly that: it learns
abbreviations, collocations and sentence starters from raw text). The manifest records which.
"""
from __future__ import annotations

from typing import Any, Iterable


def installed_punkt(lang: str) -> Any | None:
    """nltk's pretrained Punkt tokenizer for ``lang`` if its data is installed locally, else None."""
    try:
        import nltk
        from nltk.tokenize import PunktTokenizer

        nltk.data.find(f"tokenizers/punkt_tab/{lang}/")
        return PunktTokenizer(lang)
    except (LookupError, ImportError, OSError, ValueError):
        return None


def train_punkt(texts: Iterable[str], train_chars: int = 1_000_000) -> tuple[Any, int]:
    """Train Punkt parameters on up to ``train_chars`` characters of ``texts`` (deterministic).

    Returns ``(PunktSentenceTokenizer, characters used)``.
    """
    from nltk.tokenize.punkt import PunktSentenceTokenizer, PunktTrainer

    parts, used = [], 0
    for text in texts:
        if used >= train_chars:
            break
        take = text[: train_chars - used]
        parts.append(take)
        used += len(take)
    trainer = PunktTrainer()
    trainer.train("\n\n".join(parts), finalize=False)
    trainer.finalize_training()
    return PunktSentenceTokenizer(trainer.get_params()), used


def build_splitter(lang: str, sample_texts: Iterable[str], train_chars: int = 1_000_000) -> tuple[Any, dict]:
    """A sentence splitter (``span_tokenize(text)``) and its description for the manifest."""
    pretrained = installed_punkt(lang)
    if pretrained is not None:
        return pretrained, {"kind": "nltk-punkt-pretrained", "lang": lang}
    splitter, used = train_punkt(sample_texts, train_chars)
    return splitter, {"kind": "nltk-punkt-trained-on-input", "lang": lang, "train_chars": used,
                      "note": f"no installed nltk punkt_tab/{lang} model, so Punkt was trained on the input"}
