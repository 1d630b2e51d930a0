"""BERT-style text tower (transformers ``BertModel``) with CLS pooling, and its tokenizer.

The tokenizer is a ``tokenizers`` WordPiece model whose vocabulary is learned from the corpus
captions (:func:`train_tokenizer`), saved as ``RUN/tokenizer/tokenizer.json``; it is loaded with ``PreTrainedTokenizerFast`` (transformers
5's ``BertTokenizer(vocab_file=...)`` silently yields a 5-token vocabulary, so it is not used).
With ``TextTowerConfig.weights`` a local pretrained folder (e.g. a PubMedBERT download) supplies
both the weights and its own tokenizer. Nothing is fetched from a hub.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertModel, PreTrainedTokenizerFast

from model.config import TextTowerConfig

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_tokenizer(texts: Iterable[str], out_dir: Path, vocab_size: int) -> Path:
    """Build a lower-casing BERT WordPiece tokenizer from ``texts``; write
    ``out_dir/tokenizer.json``.

    The vocabulary is learned deterministically: every character (and its ``##`` continuation)
    plus the most frequent whole words (ties alphabetical) up to ``vocab_size``, ids in a
    canonical order. (``tokenizers``' WordPieceTrainer breaks frequency ties in hash order, so
    the same captions gave different vocabularies from run to run, which breaks exact resume
    and reproducibility.) Words outside the vocabulary fall back to character pieces."""
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    norm = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    counts: Counter = Counter()
    for text in texts:
        counts.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
    chars = sorted({c for w in counts for c in w})
    pieces = chars + ["##" + c for c in chars]
    budget = max(0, vocab_size - len(SPECIAL) - len(pieces))
    words = [w for w in sorted(counts, key=lambda w: (-counts[w], w)) if len(w) > 1][:budget]
    order = SPECIAL + pieces + sorted(words)
    tok = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(order)}, unk_token="[UNK]",
                                     max_input_chars_per_word=100))
    tok.normalizer = norm
    tok.pre_tokenizer = pre
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.decoder = decoders.WordPiece()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tokenizer.json"
    tok.save(str(path))
    return path


def load_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """Tokenizer from a folder holding ``tokenizer.json`` (ours) or a pretrained model's files."""
    folder = Path(folder)
    if (folder / "tokenizer.json").exists() and not (folder / "tokenizer_config.json").exists():
        return PreTrainedTokenizerFast(
            tokenizer_file=str(folder / "tokenizer.json"), pad_token="[PAD]", unk_token="[UNK]",
            cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


class TextTower(nn.Module):
    """input_ids (T, L), attention_mask (T, L) → CLS features (T, hidden)."""

    def __init__(self, cfg: TextTowerConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        if cfg.weights:
            self.bert = BertModel.from_pretrained(cfg.weights, add_pooling_layer=False,
                                                  local_files_only=True)
        else:
            self.bert = BertModel(BertConfig(
                vocab_size=vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
                num_attention_heads=cfg.heads, intermediate_size=cfg.intermediate,
                max_position_embeddings=max(64, cfg.max_len), hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0), add_pooling_layer=False)
        self.width = self.bert.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state[:, 0]  # (T, hidden): CLS pooling


def build_text_tower(cfg: TextTowerConfig, vocab_size: int) -> TextTower:
    return TextTower(cfg, vocab_size)
