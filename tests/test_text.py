import json
import re
import unicodedata

import pytest

from vits_ray.text import BANGLA_CHARACTERS, PUNCTUATIONS, UnsupportedCharactersError, Vocabulary, normalize_text

DIGITS = re.compile(r"[0-9০-৯]")


# --- normalisation ------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "expected"), [
    ("আমার ১২৩ টাকা", "আমার একশো তেইশ টাকা"),
    ("আমার 123 টাকা", "আমার একশো তেইশ টাকা"),
    ("2024 সালে", "দুই হাজার চব্বিশ সালে"),
    ("১৯৭১ সালে", "উনিশশো একাত্তর সালে"),
    ("৬.১৫ কিলোমিটার", "ছয় দশমিক এক পাঁচ কিলোমিটার"),
    ("০.০৫", "শূন্য দশমিক শূন্য পাঁচ"),
    ("১২৩৪৫৬৭৮৯", "বারো কোটি চৌত্রিশ লাখ ছাপ্পান্ন হাজার সাতশো ঊননব্বই"),
    ("৭,৯৭,০০০ কোটি", "সাত লাখ সাতানব্বই হাজার কোটি"),
    ("০১৭১১", "শূন্য এক সাত এক এক"),
    ("৮৩.০৪%", "তিরাশি দশমিক শূন্য চার শতাংশ"),
    ("৳৫০০", "পাঁচশো টাকা"),
    ("টা. ৩৫০ মাত্র", "তিনশো পঞ্চাশ টাকা মাত্র"),
    ("২১শে ফেব্রুয়ারি", "একুশে ফেব্রুয়ারি"),
    ("১২/০৫/২০২৪", "বারোই মে দুই হাজার চব্বিশ"),
    ("সকাল ৭:৩০", "সকাল সাতটা ত্রিশ"),
    ("৫ম শ্রেণি", "পঞ্চম শ্রেণি"),
    ("১১টা", "এগারোটা"),
    ("0", "শূন্য"),
])
def test_numbers_are_spelled_out(raw, expected):
    out = normalize_text(raw)
    assert out == unicodedata.normalize("NFC", expected).replace("\u09af\u09bc", "\u09df")
    assert not DIGITS.search(out)


def test_composed_and_decomposed_variants_become_one_form():
    decomposed = "বায\u09bcান্ন বাড\u09bcি আষাঢ\u09bc"
    precomposed = "বা\u09dfান্ন বা\u09dcি আষা\u09dd"
    assert normalize_text(decomposed) == normalize_text(precomposed) == precomposed
    # o-kar typed as e-kar + aa-kar; a broken aa written as অ + া
    assert normalize_text("ক\u09c7\u09beন") == "ক\u09cbন"
    assert normalize_text("অাম") == "আম"


def test_zero_width_characters():
    assert normalize_text("ক্\u200cষমা") == "ক্ষমা"            # ZWNJ only steers rendering
    assert normalize_text("উত্\u200dসব") == "উৎসব"             # old encoding of khanda ta
    assert normalize_text("র\u200c্যাব") == "র\u200d্যাব"      # kept: "rab", not reph "র্য"
    assert normalize_text("কার্য") == "কার্য"
    assert normalize_text("আমি\u200b তুমি\ufeff") == "আমি তুমি"


@pytest.mark.parametrize(("raw", "expected"), [
    ("ড. মুহম্মদ ইউনূস", "ডক্টর মুহম্মদ ইউনূস"),
    ("ডঃ ইউনূস", "ডক্টর ইউনূস"),
    ("ডা.সালমা", "ডাক্তার সালমা"),
    ("মো. রফিক ও মোঃ করিম", "মোহাম্মদ রফিক ও মোহাম্মদ করিম"),
    ("মোছা. রহিমা", "মোছাম্মৎ রহিমা"),
    ("২ কিমি", "দুই কিলোমিটার"),
    ("৩ নং", "তিন নম্বর"),
    ("সে বড.", "সে বড."),  # a word ending in ড is not "ড."
    ("ইংরেজি", "ইংরেজি"),
])
def test_abbreviations(raw, expected):
    assert normalize_text(raw) == expected


def test_punctuation_and_whitespace():
    assert normalize_text("“তুমি কোথায়?” — মা বললেন… ঠিক!!!") == '"তুমি কোথা\u09df?" - মা বললেন... ঠিক!'
    assert normalize_text("‘হ্যাঁ’ – না") == "'হ্যাঁ' - না"
    assert normalize_text("  ফি  ৳৫০০\t(ফেরতযোগ্য নয়) ।\n") == "ফি পাঁচশো টাকা, ফেরতযোগ্য ন\u09df।"
    assert normalize_text("আমি৷") == "আমি।"
    out = normalize_text("“ক” — খ… (গ) ঘ; ঙ: চ, ছ!")
    assert set(out) <= set(BANGLA_CHARACTERS) | set(PUNCTUATIONS)


def test_normalize_is_idempotent_on_the_demo_sentences():
    from vits_ray.demo.corpus import load_sentences

    for s in load_sentences():
        once = normalize_text(s)
        assert normalize_text(once) == once
        assert not Vocabulary.full_bangla().unsupported(once), once


# --- vocabulary ---------------------------------------------------------------------------

SENTENCES = [normalize_text(s) for s in [
    "আমার ১২৩ টাকা বাকি আছে।",
    "মা বললেন, “ভাত খেয়ে তারপর পড়তে বসো।”",
    "র‍্যাব সদস্যরা দ্রুত ঘটনাস্থলে পৌঁছেছেন!",
    "তুমি কি আজ বিকেলে মাঠে খেলতে যাবে?",
    "ভাত, ডাল আর আলুভর্তা—এটাই আমার প্রিয় খাবার; উৎসব: বাংলা 'ভাষা'।",
]]


@pytest.mark.parametrize("add_blank", [True, False])
@pytest.mark.parametrize("kind", ["full", "built"])
def test_ids_match_coqui_tokenizer(add_blank, kind):
    vocab = (Vocabulary.full_bangla(add_blank=add_blank) if kind == "full"
             else Vocabulary.build(SENTENCES, add_blank=add_blank))
    tokenizer = vocab.coqui_tokenizer()
    assert tokenizer.characters.num_chars == vocab.num_tokens
    assert tokenizer.characters.vocab == vocab.tokens
    for text in SENTENCES:
        ids = vocab.encode(text)
        assert ids == tokenizer.text_to_ids(text)
        assert (len(ids) == 2 * len(text) + 1) if add_blank else (len(ids) == len(text))
    assert tokenizer.not_found_characters == []


def test_full_bangla_contents():
    vocab = Vocabulary.full_bangla(extra="x")
    for c in "অআকখৎংঃঁ্ািীুূৃেৈোৌ\u09dc\u09dd\u09df\u200d":
        assert c in vocab.characters
    for c in "০১৯\u09bc৳":  # digits and ৳ are spelled out; nukta only lives inside য় ড় ঢ়
        assert c not in vocab.characters
    assert "x" in vocab.characters and " " in vocab.punctuations and "।" in vocab.punctuations


def test_unsupported_characters_are_reported_by_name_and_position():
    vocab = Vocabulary.full_bangla()
    with pytest.raises(UnsupportedCharactersError) as info:
        vocab.encode("আমি x খাই 😀")
    err = info.value
    assert isinstance(err, ValueError)
    assert err.problems == [(4, "x", "LATIN SMALL LETTER X"), (10, "😀", "GRINNING FACE")]
    assert "LATIN SMALL LETTER X at 4" in str(err) and "GRINNING FACE at 10" in str(err)
    assert vocab.unsupported("\x01") == [(0, "\x01", "U+0001")]


def test_build_uses_only_seen_characters_and_rejects_unknown_ones():
    vocab = Vocabulary.build(["আমার টাকা।"])
    assert vocab.characters == "".join(sorted(set("আমারটাক")))
    assert vocab.punctuations == "। "
    with pytest.raises(UnsupportedCharactersError, match="BENGALI DIGIT ONE at 2"):
        vocab.encode("আম১")
    with pytest.raises(UnsupportedCharactersError, match="text 1: .*LATIN CAPITAL LETTER A at 0"):
        Vocabulary.build(["ক", "A"])
    with pytest.raises(UnsupportedCharactersError):
        Vocabulary.build(["কখ"], allowed=Vocabulary.build(["ক"]))


def test_decode_inverts_encode():
    vocab = Vocabulary.build(SENTENCES)
    for text in SENTENCES:
        assert vocab.decode(vocab.encode(text)) == text
    with pytest.raises(ValueError):
        vocab.decode([vocab.num_tokens])


def test_invalid_vocabularies_are_rejected():
    with pytest.raises(ValueError, match="sorted"):
        Vocabulary("খক", " ")
    with pytest.raises(ValueError, match="overlap"):
        Vocabulary("।ক", "।")


def test_json_round_trip_and_bytes(tmp_path):
    vocab = Vocabulary.build(SENTENCES, add_blank=False)
    assert Vocabulary.from_dict(vocab.to_dict()) == vocab
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    vocab.save(a)
    Vocabulary.build(list(reversed(SENTENCES)), add_blank=False).save(b)
    assert a.read_bytes() == b.read_bytes()
    assert "আ" in a.read_text(encoding="utf-8")  # ensure_ascii=False
    loaded = Vocabulary.load(a)
    assert loaded == vocab and loaded.encode(SENTENCES[0]) == vocab.encode(SENTENCES[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]  # no temp files left
    data = json.loads(a.read_text(encoding="utf-8"))
    data["format_version"] = 99
    with pytest.raises(ValueError, match="format_version"):
        Vocabulary.from_dict(data)
