"""CLIP's byte-level BPE tokenizer, for OneFormer's training text lists ("a photo with a {class name}").

Hand-written because transformers and open_clip are not runtime dependencies of this package. The vocabulary is
CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (OpenAI CLIP, MIT license), shipped next to this module: 256 byte symbols,
the same with the end-of-word marker ``</w>``, 48894 merges, start-of-text 49406 and end-of-text 49407. Text is
cleaned as CLIP does (HTML entities unescaped twice, whitespace collapsed, lower case; ftfy's mojibake repair is
left out), split with CLIP's pattern (``re`` character classes standing in for ``\\p{L}`` / ``\\p{N}``), each piece's
UTF-8 bytes mapped to printable symbols and merged by rank. ``tokenize`` frames the ids with start / end of text,
truncates to the context length keeping the end-of-text token last, and pads with zeros, as open_clip's tokenizer
and OneFormer's processor (its attention mask times the ids) do.
"""
import functools
import gzip
import html
import re
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

VOCABULARY_FILE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
NUM_MERGES = 49152 - 256 - 2
START_OF_TEXT = 49406
END_OF_TEXT = 49407
PIECE_PATTERN = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+",
                           re.IGNORECASE)


def byte_symbols() -> Dict[int, str]:
    """Byte value -> a printable unicode character (GPT-2's table: printable bytes stand for themselves)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    code_points = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            code_points.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code_point) for code_point in code_points)))


class ClipTokenizer:
    """Text -> CLIP token ids, from the shipped vocabulary (or another file of the same format)."""

    def __init__(self, vocabulary_file: Path = VOCABULARY_FILE):
        self.byte_symbols = byte_symbols()
        lines = gzip.open(vocabulary_file).read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
        symbols = list(self.byte_symbols.values())
        vocabulary = symbols + [symbol + "</w>" for symbol in symbols] + ["".join(merge) for merge in merges]
        vocabulary += ["<start_of_text>", "<end_of_text>"]
        self.encoder = {token: index for index, token in enumerate(vocabulary)}
        self.merge_ranks: Dict[Tuple[str, str], int] = {merge: rank for rank, merge in enumerate(merges)}
        self.bpe = functools.lru_cache(maxsize=65536)(self._bpe)

    def _bpe(self, piece: str) -> Tuple[str, ...]:
        """One piece (byte symbols) -> its merged tokens, the last one ending in ``</w>``."""
        word = tuple(piece[:-1]) + (piece[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(zip(word[:-1], word[1:]))
            best = min(pairs, key=lambda pair: self.merge_ranks.get(pair, float("inf")))
            if best not in self.merge_ranks:
                break
            merged: List[str] = []
            position = 0
            while position < len(word):
                if position < len(word) - 1 and (word[position], word[position + 1]) == best:
                    merged.append(word[position] + word[position + 1])
                    position += 2
                else:
                    merged.append(word[position])
                    position += 1
            word = tuple(merged)
        return word

    def encode(self, text: str) -> List[int]:
        """Text -> ids, without start / end of text."""
        cleaned = re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip().lower()
        ids: List[int] = []
        for piece in PIECE_PATTERN.findall(cleaned):
            symbols = "".join(self.byte_symbols[byte] for byte in piece.encode("utf-8"))
            ids.extend(self.encoder[token] for token in self.bpe(symbols))
        return ids

    def tokenize(self, texts: Sequence[str], context_length: int) -> torch.Tensor:
        """Texts -> (len(texts), context_length) int64 ids: start, text, end of text, zeros."""
        tokens = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [START_OF_TEXT] + self.encode(text) + [END_OF_TEXT]
            ids = ids[:context_length]
            ids[-1] = END_OF_TEXT
            tokens[row, :len(ids)] = torch.tensor(ids)
        return tokens


@functools.lru_cache(maxsize=1)
def clip_tokenizer() -> ClipTokenizer:
    """The shipped vocabulary's tokenizer, read once per process."""
    return ClipTokenizer()
