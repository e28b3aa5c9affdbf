"""The real CLIP BPE tokenizer (as used by SD 1.4) written in Hugging Face's file layout, offline.

open_clip's wheel ships OpenAI's `bpe_simple_vocab_16e6.txt.gz` (a header line, then merges in rank order).
CLIP's vocabulary is fully determined by it: the 256 byte symbols, the same 256 with the end-of-word
marker `</w>`, one entry per merge (the first 48,894 merges), then `<|startoftext|>` and `<|endoftext|>`,
49,408 entries in all. Writing `vocab.json` + `merges.txt` like SD 1.4's `tokenizer/` folder lets
`CLIPTokenizer.from_pretrained` load it like the real one.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 49408
NUM_MERGES = 48894  # 49152 BPE ranks - 256 byte symbols - 2 special tokens
MODEL_MAX_LENGTH = 77
MERGES_HEADER = "#version: 0.2"  # first line of SD 1.4's tokenizer/merges.txt


def bpe_source_path() -> Path:
    """Path of open_clip's shipped `bpe_simple_vocab_16e6.txt.gz`."""
    import open_clip.tokenizer

    return Path(open_clip.tokenizer.default_bpe())


def _byte_symbols() -> list[str]:
    """The 256 printable unicode stand-ins for bytes 0..255, in CLIP's vocabulary order.

    CLIP's order lists the bytes that are printable Latin-1 characters first (they stand for themselves),
    then the remaining bytes, which map to code points 256, 257, ... in increasing byte order.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    printable_set = set(printable)
    others = [b for b in range(256) if b not in printable_set]
    mapping = {b: chr(b) for b in printable}
    mapping.update({b: chr(256 + i) for i, b in enumerate(others)})
    return [mapping[b] for b in printable + others]


def read_merges(bpe_path: Path | None = None) -> list[tuple[str, str]]:
    """The first NUM_MERGES merges of the BPE file, in rank order (rank 0 first)."""
    text = gzip.open(bpe_path or bpe_source_path()).read().decode("utf-8")
    lines = text.split("\n")[1 : 1 + NUM_MERGES]  # line 0 is the file's version header
    merges = []
    for line in lines:
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"unexpected BPE merge line {line!r} in {bpe_path or bpe_source_path()}")
        merges.append((parts[0], parts[1]))
    if len(merges) != NUM_MERGES:
        raise ValueError(f"expected {NUM_MERGES} merges, found {len(merges)}")
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's token -> id table (49,408 entries) from the merges."""
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"CLIP vocabulary should have {VOCAB_SIZE} distinct entries, got {len(vocab)}")
    return vocab


def write_clip_tokenizer(directory: Path) -> None:
    """Write `vocab.json`, `merges.txt`, `special_tokens_map.json` and `tokenizer_config.json` into `directory`.

    The directory is created if needed; existing files of those names are overwritten. Padding uses
    `<|endoftext|>` (id 49407) as in SD 1.4's tokenizer, and `model_max_length` is 77.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merges = read_merges()
    vocab = build_vocab(merges)

    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "\n".join([MERGES_HEADER, *(f"{a} {b}" for a, b in merges)]) + "\n"
    (directory / "merges.txt").write_text(merges_text, encoding="utf-8")

    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    config = {
        **special,
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
