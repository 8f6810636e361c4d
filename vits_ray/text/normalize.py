"""Bangladeshi Bangla text normalisation: one written form per spoken sentence.

The model reads graphemes, so everything that is *said* must be *written* as Bangla letters
(numbers, abbreviations, currency), and text that looks the same must be the same code points.
Characters this module does not know are left alone on purpose: `Vocabulary` then reports
them by name and position instead of the model silently skipping them.

Order matters: NFC first (so the tables below match), numbers before abbreviations (so
"টা. ৫০" can become "পঞ্চাশ টাকা"), `bnunicodenormalizer` last, on Bangla runs only.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

from bnnumerizer.words import numeric_words

# Bumped whenever `normalize_text` writes any sentence differently: a model only speaks text
# prepared the way its training text was, so exports and ONNX files carry the version they need.
NORMALIZER_VERSION = 1


def _nfc(s: str) -> str:
    return unicodedata.normalize("NFC", s)


# --- numbers ------------------------------------------------------------------------------

_BN_DIGITS = "০১২৩৪৫৬৭৮৯"
_TO_ASCII_DIGITS = str.maketrans(_BN_DIGITS, "0123456789")

# bnnumerizer's 1-99 table, with the Bangla Academy spellings for 12-18: its "বার" (twelve)
# is also the word for "day/times", and the others lack their final vowel.
_UNITS = {int(k): _nfc(v) for k, v in numeric_words.items() if k.isdigit() and not k.startswith("0")}
_UNITS.update({12: "বারো", 13: "তেরো", 15: "পনেরো", 16: "ষোলো", 17: "সতেরো", 18: "আঠারো"})
_UNITS.pop(100, None)
_ZERO = "শূন্য"
# Spoken Bangladeshi usage is "দুইশো", not the bookish "দুই শত".
_HUNDREDS = {h: _UNITS[h] + "শো" for h in range(1, 10)}

_ORDINALS = {1: "প্রথম", 2: "দ্বিতীয়", 3: "তৃতীয়", 4: "চতুর্থ", 5: "পঞ্চম",
             6: "ষষ্ঠ", 7: "সপ্তম", 8: "অষ্টম", 9: "নবম", 10: "দশম"}
_ORDINALS = {k: _nfc(v) for k, v in _ORDINALS.items()}
_MONTHS = [_nfc(m) for m in ("জানুয়ারি", "ফেব্রুয়ারি", "মার্চ", "এপ্রিল", "মে", "জুন", "জুলাই",
                             "আগস্ট", "সেপ্টেম্বর", "অক্টোবর", "নভেম্বর", "ডিসেম্বর")]

# Longer digit strings are identifiers (phone, account numbers), read digit by digit.
_MAX_CARDINAL_DIGITS = 12


def _digits_words(digits: str) -> str:
    return " ".join(_UNITS[int(d)] if d != "0" else _ZERO for d in digits)


def _int_words(n: int) -> str:
    """Indian grouping (কোটি, লাখ, হাজার), as numbers are said in Bangladesh."""
    if n == 0:
        return _ZERO
    parts = []
    koti, n = divmod(n, 10**7)
    if koti:
        parts += [_int_words(koti), "কোটি"]
    for size, name in ((10**5, "লাখ"), (1000, "হাজার")):
        count, n = divmod(n, size)
        if count:
            parts += [_UNITS[count], name]
    hundreds, n = divmod(n, 100)
    if hundreds:
        parts.append(_HUNDREDS[hundreds])
    if n:
        parts.append(_UNITS[n])
    return " ".join(parts)


def _number_words(digits: str) -> str:
    if (len(digits) > 1 and digits.startswith("0")) or len(digits) > _MAX_CARDINAL_DIGITS:
        return _digits_words(digits)
    return _int_words(int(digits))


def _year_words(year: int) -> str:
    # 1971 is "উনিশশো একাত্তর" when it is a year; 2024 stays "দুই হাজার চব্বিশ" (usual reading).
    if 1100 <= year <= 1999 and year % 100:
        return f"{_UNITS[year // 100]}শো {_UNITS[year % 100]}"
    return _int_words(year)


def _date_day_words(day: int) -> str:
    """The spoken form of a day of the month: পহেলা, দোসরা, ..., পাঁচই, ..., একুশে."""
    special = {1: "পহেলা", 2: "দোসরা", 3: "তেসরা", 4: "চৌঠা"}
    if day in special:
        return special[day]
    word = _UNITS[day]
    # 19-31 all end in শ (উনিশ, একুশ, ত্রিশ): the suffix শে merges into them as -শে.
    return word + ("ে" if day >= 19 else "ই")


_D = "[0-9]"
_NOT_DIGIT_AFTER = f"(?!{_D})"
_NOT_DIGIT_BEFORE = f"(?<!{_D})"
_BANGLA_LETTER = "\u0980-\u09ff"

_THOUSANDS_RE = re.compile(rf"{_NOT_DIGIT_BEFORE}{_D}{{1,3}}(?:,{_D}{{2,3}})*,{_D}{{3}}{_NOT_DIGIT_AFTER}")
_CURRENCY_BEFORE_RE = re.compile(rf"(?:৳|(?<![{_BANGLA_LETTER}0-9]){_nfc('টা')}\.)\s*({_D}+(?:\.{_D}+)?)")
_DATE_RE = re.compile(rf"{_NOT_DIGIT_BEFORE}({_D}{{1,2}})([/.-])({_D}{{1,2}})\2({_D}{{4}}|{_D}{{2}}){_NOT_DIGIT_AFTER}")
_TIME_RE = re.compile(rf"{_NOT_DIGIT_BEFORE}({_D}{{1,2}}):({_D}{{2}}){_NOT_DIGIT_AFTER}")
_DAY_SUFFIX_RE = re.compile(rf"{_NOT_DIGIT_BEFORE}({_D}{{1,2}})(লা|রা|ঠা|ই|শে)(?![{_BANGLA_LETTER}])")
_ORDINAL_RE = re.compile(rf"{_NOT_DIGIT_BEFORE}({_D}{{1,2}})({'|'.join(map(_nfc, ('ম', 'য়', 'র্থ', 'ষ্ঠ')))})(?![{_BANGLA_LETTER}])")
_YEAR_RE = re.compile(rf"{_NOT_DIGIT_BEFORE}({_D}{{4}})(\s*)(?=সাল|{_nfc('খ্রি')}|ইং)")
_PERCENT_RE = re.compile(rf"({_D})\s*%")
_DECIMAL_RE = re.compile(rf"({_D}+)\.({_D}+)")
_INTEGER_RE = re.compile(rf"{_D}+")


def _date(m: re.Match) -> str:
    day, month, year = int(m[1]), int(m[3]), m[4]
    if not (1 <= day <= 31 and 1 <= month <= 12):
        return m[0].replace(m[2], " ")  # not a date; read the numbers one after the other
    return f"{_date_day_words(day)} {_MONTHS[month - 1]} {_year_words(int(year)) if len(year) == 4 else _number_words(year)}"


def _time(m: re.Match) -> str:
    hour, minute = int(m[1]), int(m[2])
    if hour > 24 or minute > 59:
        return m[0]
    spoken = f"{_int_words(hour)}টা"
    return spoken if minute == 0 else f"{spoken} {_int_words(minute)}"


def _day_suffix(m: re.Match) -> str:
    day = int(m[1])
    return _date_day_words(day) if 1 <= day <= 31 else _number_words(m[1]) + m[2]


def _ordinal(m: re.Match) -> str:
    n = int(m[1])
    return _ORDINALS[n] if n in _ORDINALS else _number_words(m[1]) + m[2]


def expand_numbers(text: str) -> str:
    """Spell out every Bangla or ASCII digit (cardinals, decimals, dates, times, ordinals),
    and the ৳ and % signs that go with numbers."""
    text = text.translate(_TO_ASCII_DIGITS)
    text = _THOUSANDS_RE.sub(lambda m: m[0].replace(",", ""), text)
    text = _CURRENCY_BEFORE_RE.sub(r"\1 টাকা", text)  # "৳৫০০" / "টা. ৫০০" are said "৫০০ টাকা"
    text = _DATE_RE.sub(_date, text)
    text = _TIME_RE.sub(_time, text)
    text = _DAY_SUFFIX_RE.sub(_day_suffix, text)
    text = _ORDINAL_RE.sub(_ordinal, text)
    text = _YEAR_RE.sub(lambda m: _year_words(int(m[1])) + (m[2] or " "), text)
    text = _PERCENT_RE.sub(r"\1 শতাংশ", text)
    text = _DECIMAL_RE.sub(lambda m: f"{_number_words(m[1])} দশমিক {_digits_words(m[2])}", text)
    text = _INTEGER_RE.sub(lambda m: _number_words(m[0]), text)
    return text.replace("৳", " টাকা ").replace("%", " শতাংশ ")


# --- abbreviations ------------------------------------------------------------------------

# Both the dot and the visarga (ঃ) are used as the abbreviation mark in Bangladesh.
_ABBREVIATIONS = {
    "ড.": "ডক্টর", "ডঃ": "ডক্টর",
    "ডা.": "ডাক্তার", "ডাঃ": "ডাক্তার",
    "মো.": "মোহাম্মদ", "মোঃ": "মোহাম্মদ",
    "মোছা.": "মোছাম্মৎ", "মোছাঃ": "মোছাম্মৎ",
    "টা.": "টাকা",
    "অধ্য.": "অধ্যাপক",
    "সা.": "সাল্লাল্লাহু আলাইহি ওয়া সাল্লাম", "সাঃ": "সাল্লাল্লাহু আলাইহি ওয়া সাল্লাম",
    "রা.": "রাদিয়াল্লাহু আনহু", "রাঃ": "রাদিয়াল্লাহু আনহু",
    "খ্রি.": "খ্রিস্টাব্দ", "খ্রিঃ": "খ্রিস্টাব্দ",
    "কি.মি.": "কিলোমিটার", "কিমি": "কিলোমিটার",
    "বি.দ্র.": "বিশেষ দ্রষ্টব্য",
    "লি.": "লিমিটেড",
    "নং": "নম্বর",
    "ইং": "ইংরেজি",
}
_ABBREVIATIONS = {_nfc(k): _nfc(v) for k, v in _ABBREVIATIONS.items()}
# Whole words only: "বড." must not turn into "বডক্টর". Longest first so "মোছা." beats "মো.".
_ABBREVIATION_RE = re.compile(
    rf"(?<![{_BANGLA_LETTER}])("
    + "|".join(re.escape(k) + ("" if k[-1] in ".ঃ" else f"(?![{_BANGLA_LETTER}])")
               for k in sorted(_ABBREVIATIONS, key=len, reverse=True))
    + ")"
)


def _abbreviation(m: re.Match) -> str:
    full = _ABBREVIATIONS[m[1]]
    # "ড.ইউনূস" has no space after the dot; the expansion needs one.
    following = m.string[m.end():m.end() + 1]
    return full + " " if following and re.match(f"[{_BANGLA_LETTER}]", following) else full


def expand_abbreviations(text: str) -> str:
    return _ABBREVIATION_RE.sub(_abbreviation, text)


# --- characters and punctuation -----------------------------------------------------------

_ZWNJ, _ZWJ = "\u200c", "\u200d"
_CHAR_MAP = str.maketrans({
    "“": '"', "”": '"', "„": '"', "‟": '"', "«": '"', "»": '"',
    "‘": "'", "’": "'", "‚": "'", "‛": "'", "`": "'", "´": "'",
    "–": "-", "—": "-", "―": "-", "−": "-", "‐": "-", "‑": "-",
    "…": "...",
    "৷": "।",   # BENGALI CURRENCY NUMERATOR FOUR, a common look-alike typo for the danda
    "॥": "।",
    "(": " , ", ")": " , ", "[": " , ", "]": " , ", "{": " , ", "}": " , ",  # a bracket is said as a pause
    "&": " এবং ",
    "\u200b": "", "\u2060": "", "\ufeff": "", "\u00ad": "",  # invisible, never pronounced
})

_NUKTA_FORMS = {"\u09af\u09bc": "\u09df", "\u09a1\u09bc": "\u09dc", "\u09a2\u09bc": "\u09dd"}


def _zero_width(text: str) -> str:
    # ZWJ/ZWNJ only steer rendering (explicit hasanta vs conjunct) and keyboards insert them
    # inconsistently, so they are dropped, with two exceptions where they change the sound:
    # ত্+ZWJ is the old encoding of khanda ta ৎ, and র+ZWJ+্য is "র‍্যাব" (ra + ya-phala,
    # "rab"), not "র্য" (reph, as in "কার্য").
    text = text.replace("ত\u09cd" + _ZWJ, "ৎ")
    text = text.replace("র" + _ZWNJ + "\u09cd", "র" + _ZWJ + "\u09cd")
    text = text.replace(_ZWNJ, "")
    return re.sub(f"(?<!র){_ZWJ}|{_ZWJ}(?!\u09cdয)", "", text)


def clean_punctuation(text: str) -> str:
    text = re.sub(r"\.{2,}", "...", text)
    text = re.sub(r"([!?।])\1+", r"\1", text)
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,।?!;:])", r"\1", text)
    text = re.sub(r",(\s*,)+", ",", text)
    # a comma left by ")" right before a stop would be read as an extra pause
    text = re.sub(r",\s*([।.?!;:])", r"\1", text)
    return text.strip().lstrip(",").strip().rstrip(",").strip()


# --- Bangla orthography -------------------------------------------------------------------

@lru_cache(maxsize=1)
def _bnorm():
    from bnunicodenormalizer import Normalizer

    return Normalizer()


_BANGLA_RUN_RE = re.compile(f"[{_BANGLA_LETTER}{_ZWJ}]+")


def _orthography(m: re.Match) -> str:
    # bnunicodenormalizer fixes broken diacritics (অ+া → আ), doubled signs and nukta forms,
    # but returns None for words it rejects and strips non-Bangla characters, so it only
    # ever sees runs of Bangla letters, and a rejected run is kept as it was.
    normalized = _bnorm()(m[0])["normalized"]
    return normalized or m[0]


def _compose_nukta(text: str) -> str:
    # NFC *decomposes* য় ড় ঢ় (composition exclusions); one code point per letter is one token.
    for decomposed, composed in _NUKTA_FORMS.items():
        text = text.replace(decomposed, composed)
    return text


def normalize_text(text: str) -> str:
    """The canonical spoken-and-written form of a Bangladeshi Bangla sentence.

    Pure and deterministic. Output: Bangla letters and signs (NFC, except that য় ড় ঢ় are the
    precomposed code points), the danda and ASCII , . ? ! - ; : ' ", single spaces.
    """
    text = _nfc(text)
    text = _zero_width(text)
    text = text.translate(_CHAR_MAP)
    text = expand_numbers(text)
    text = expand_abbreviations(text)
    text = clean_punctuation(text)
    text = _BANGLA_RUN_RE.sub(_orthography, text)
    return _compose_nukta(text)
