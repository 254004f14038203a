"""A parallel corpus made by rule: English number phrases and their French translations, 0 to 9999.

    >>> english(321), french(321)
    ('three hundred and twenty-one', 'trois cent vingt et un')

It is the translator's default training data: it needs no download, and it is a real translation task —
French counts in twenties from 60 up (71 "soixante et onze", 80 "quatre-vingts", 97 "quatre-vingt-dix-sept"),
joins with "et" only at 21, 31, 41, 51, 61 and 71, and pluralises "cent" and "quatre-vingt" only at the end of
a number ("deux cents" but "deux cent un"), while "mille" never takes an s. English follows British usage
("and" before the last two digits: "one thousand and five"). French uses the traditional spelling (hyphens
only below one hundred), the one of the Académie's dictionaries before the 1990 reform.

The train/valid split is a fixed function of the number (a multiplicative hash), the same on every machine.
"""

from __future__ import annotations

import os
from pathlib import Path

from genfast.data.parallel_text import Pair, write_tsv

MAX_NUMBER = 9999

_EN_UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
             "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_EN_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

_FR_UNITS = ["zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf", "dix", "onze", "douze",
             "treize", "quatorze", "quinze", "seize"]
_FR_TENS = ["", "", "vingt", "trente", "quarante", "cinquante", "soixante"]


def _check(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if not 0 <= n <= MAX_NUMBER:
        raise ValueError(f"n must be in [0, {MAX_NUMBER}], got {n}")
    return n


# ------------------------------------------------------------------------------------------- English
def _english_below_100(n: int) -> str:
    if n < 20:
        return _EN_UNITS[n]
    tens, units = divmod(n, 10)
    return _EN_TENS[tens] + (f"-{_EN_UNITS[units]}" if units else "")


def english(n: int) -> str:
    """British English words for 0 <= n <= 9999: 1005 -> "one thousand and five"."""
    n = _check(n)
    if n == 0:
        return "zero"
    thousands, rest = divmod(n, 1000)
    hundreds, below = divmod(rest, 100)
    words = []
    if thousands:
        words.append(f"{_EN_UNITS[thousands]} thousand")
    if hundreds:
        words.append(f"{_EN_UNITS[hundreds]} hundred")
    if below:
        words.append(("and " if words else "") + _english_below_100(below))
    return " ".join(words)


# ------------------------------------------------------------------------------------------- French
def _french_below_100(n: int) -> str:
    if n <= 16:
        return _FR_UNITS[n]
    if n < 20:
        return f"dix-{_FR_UNITS[n - 10]}"  # dix-sept, dix-huit, dix-neuf
    tens, units = divmod(n, 10)
    if tens <= 6:
        base = _FR_TENS[tens]
        if units == 0:
            return base
        return f"{base} et un" if units == 1 else f"{base}-{_FR_UNITS[units]}"
    if tens == 7:  # sixty plus ten..nineteen: soixante-dix, soixante et onze, soixante-douze
        return "soixante et onze" if units == 1 else f"soixante-{_french_below_100(10 + units)}"
    if tens == 8:  # four twenties: the s only when nothing follows, and never "et"
        return "quatre-vingts" if units == 0 else f"quatre-vingt-{_FR_UNITS[units]}"
    return f"quatre-vingt-{_french_below_100(10 + units)}"  # quatre-vingt-dix, quatre-vingt-onze, ...


def french(n: int) -> str:
    """French words for 0 <= n <= 9999 (traditional spelling): 200 -> "deux cents", 201 -> "deux cent un"."""
    n = _check(n)
    if n == 0:
        return "zéro"
    thousands, rest = divmod(n, 1000)
    hundreds, below = divmod(rest, 100)
    words = []
    if thousands:  # "mille", never "un mille"; invariable
        words.append("mille" if thousands == 1 else f"{_FR_UNITS[thousands]} mille")
    if hundreds:  # "cent", never "un cent"; "cents" when multiplied and nothing follows
        words.append("cent" if hundreds == 1 else f"{_FR_UNITS[hundreds]} cent" + ("" if below else "s"))
    if below:
        words.append(_french_below_100(below))
    return " ".join(words)


# ------------------------------------------------------------------------------------------- corpus
def is_valid_number(n: int, valid_every: int = 20) -> bool:
    """Whether n is held out for validation: Knuth's multiplicative hash, so about 1 in ``valid_every`` spread
    over the whole range (not one block of numbers)."""
    return (n * 2654435761 % 2**32) % valid_every == 0


def number_pairs(numbers=None) -> list[Pair]:
    """(English, French) for each number (default: all of 0..9999)."""
    numbers = range(MAX_NUMBER + 1) if numbers is None else numbers
    return [(english(n), french(n)) for n in numbers]


def number_phrase_splits(valid_every: int = 20) -> tuple[list[Pair], list[Pair]]:
    """(train, valid) pairs over 0..9999; valid holds about 1 in ``valid_every`` numbers (500 of 10000)."""
    if isinstance(valid_every, bool) or not isinstance(valid_every, int) or valid_every < 2:
        raise ValueError(f"valid_every must be an int >= 2, got {valid_every!r}")
    numbers = range(MAX_NUMBER + 1)
    train = number_pairs(n for n in numbers if not is_valid_number(n, valid_every))
    valid = number_pairs(n for n in numbers if is_valid_number(n, valid_every))
    return train, valid


def write_number_phrases(directory: str | os.PathLike, valid_every: int = 20) -> tuple[Path, Path]:
    """Write ``train.tsv`` and ``valid.tsv`` of the number-phrase corpus into ``directory``."""
    directory = Path(directory)
    train, valid = number_phrase_splits(valid_every)
    return write_tsv(train, directory / "train.tsv"), write_tsv(valid, directory / "valid.tsv")


__all__ = ["english", "french", "number_pairs", "number_phrase_splits", "write_number_phrases", "is_valid_number",
           "MAX_NUMBER"]
