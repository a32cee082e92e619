import gzip
from importlib import resources

import pytest
import torch

from lightning_trust.demo import AdultTextDataModule, WordTokenizer
from lightning_trust.demo.data import ADULT_SIDE_COLUMNS
from lightning_trust.demo.text import (
    CLS_TOKEN_ID,
    MASK_TOKEN_ID,
    PAD_TOKEN_ID,
    SENSITIVE_WORDS,
    SEP_TOKEN_ID,
    SPECIAL_TOKENS,
    UNK_TOKEN_ID,
    adult_sentence,
)

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def text_dm():
    dm = AdultTextDataModule(batch_size=64)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def subset_dir(tmp_path_factory):
    """The first 1,500 lines of each bundled Adult file, not gzipped: a small data_dir."""
    folder = resources.files("lightning_trust.demo") / "data"
    target = tmp_path_factory.mktemp("adult_subset")
    for name in ("adult.data", "adult.test"):
        lines = gzip.decompress((folder / f"{name}.gz").read_bytes()).decode().splitlines(keepends=True)
        (target / name).write_text("".join(lines[:1500]))
    return str(target)


def _dataset(dm, split):
    return getattr(dm, f"{split}_dataset")


def test_splits_labels_and_side_columns_are_adult_datamodules(text_dm, adult):
    for split in SPLITS:
        ours, theirs = _dataset(text_dm, split).tensors, _dataset(adult, split).tensors
        assert len(text_dm.texts(split)) == len(ours["input_ids"]) == len(theirs["y"])
        assert torch.equal(ours["labels"], theirs["y"])
        for name in ADULT_SIDE_COLUMNS:
            assert torch.equal(ours[name], theirs[name]), (split, name)
    assert (len(text_dm.train_dataset), len(text_dm.val_dataset), len(text_dm.test_dataset)) == (27146, 3016, 15060)
    assert text_dm.categories == adult.categories
    assert text_dm.categories["sex"] == ["Female", "Male"]
    assert text_dm.num_classes == adult.num_classes == 2
    # the sentences follow the rows: an age group of "<25" reads as an age below 25
    ages = [int(t.split(",")[0].removeprefix("age ")) for t in text_dm.texts("val")]
    codes = text_dm.val_dataset.tensors["age_group"].tolist()
    assert all((age < 25) == (code == 0) and (age >= 65) == (code == 3) for age, code in zip(ages, codes))


def test_dict_batches_shapes_dtypes_and_tokens(text_dm):
    batch = next(iter(text_dm.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels", *ADULT_SIDE_COLUMNS}
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (64, 32)
    for key, value in batch.items():
        assert value.dtype == torch.long, key
        if key not in ("input_ids", "attention_mask"):
            assert value.shape == (64,), key
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (ids[:, 0] == CLS_TOKEN_ID).all()
    assert torch.equal(mask, (ids != PAD_TOKEN_ID).long())
    lengths = mask.sum(1)
    assert (ids[torch.arange(64), lengths - 1] == SEP_TOKEN_ID).all()  # [SEP] closes every sentence
    assert set(batch["labels"].tolist()) <= {0, 1}
    # the ids are the tokenizer's encoding of the raw sentences, in order
    first = text_dm.texts("val")[:64]
    assert torch.equal(ids, text_dm.tokenizer.encode_batch(first, 32)[0])
    assert text_dm.tokenizer.decode(ids[0]) == " ".join(WordTokenizer.split(first[0]))
    # the whole vocabulary: specials, fitted words, unused padding up to vocab_size
    assert text_dm.vocab_size == text_dm.tokenizer.vocab_size == len(text_dm.id_to_token) == 1024
    assert text_dm.id_to_token[:5] == list(SPECIAL_TOKENS)
    assert (text_dm.pad_token_id, text_dm.mask_token_id) == (PAD_TOKEN_ID, MASK_TOKEN_ID) == (0, 4)
    assert (
        150 < len(text_dm.tokenizer) < 400 and text_dm.id_to_token[-1] == f"[unused{1024 - len(text_dm.tokenizer) - 1}]"
    )
    assert text_dm.vocab["age"] == text_dm.id_to_token.index("age")
    assert text_dm.batch_keys == {"input_keys": ["input_ids", "attention_mask"], "target": "labels"}


def test_batch_contract_reads_the_batches(text_dm):
    from lightning_trust.core.batch import BatchContract

    batch = next(iter(text_dm.train_dataloader()))
    contract = BatchContract.from_keys(text_dm.batch_keys)
    assert sorted(contract.inputs(batch)) == ["attention_mask", "input_ids"]
    assert torch.equal(contract.target(batch), batch["labels"])
    assert torch.equal(contract.side(batch, "sex"), batch["sex"])


def test_sentences_leave_sensitive_words_out_by_default(text_dm, subset_dir):
    vocabulary = set(text_dm.vocab)
    assert not SENSITIVE_WORDS & vocabulary
    for split in SPLITS:
        words = {w for text in text_dm.texts(split) for w in WordTokenizer.split(text)}
        assert not SENSITIVE_WORDS & words, split
        assert {"male", "female", "husband", "wife", "white", "black"}.isdisjoint(words)

    sensitive = AdultTextDataModule(include_sensitive=True, data_dir=subset_dir)
    sensitive.setup()
    assert {"male", "female", "husband", "wife", "white", "black"} <= set(sensitive.vocab)
    sex_names = sensitive.categories["sex"]
    for text, code in zip(sensitive.texts("test"), sensitive.test_dataset.tensors["sex"].tolist()):
        parts = text.split(", ")
        assert sex_names[code].lower() in parts  # "female" / "male" as its own phrase, matching the sex column
    plain = AdultTextDataModule(data_dir=subset_dir)
    plain.setup()
    for with_words, without in zip(sensitive.texts("val"), plain.texts("val")):
        removed = set(with_words.split(", ")) - set(without.split(", "))
        assert len(removed) == 3 and len(with_words.split(", ")) == len(without.split(", ")) + 3


def test_sentence_of_a_published_row():
    row = ["50", "Self-emp-not-inc", "83311", "Bachelors", "13", "Married-civ-spouse", "Exec-managerial",
           "Husband", "White", "Male", "0", "1902", "13", "United-States", ">50K"]  # fmt: skip
    assert adult_sentence(row) == (
        "age 50, self employed, bachelors, married, executive managerial, 13 hours a week, "
        "no capital gain, moderate capital loss, united states"
    )
    assert "husband, white, male" in adult_sentence(row, include_sensitive=True)
    row[10], row[11] = "15024", "0"
    assert "large capital gain, no capital loss" in adult_sentence(row)


def test_tokenizer_is_fitted_on_the_train_split_only(subset_dir):
    dm = AdultTextDataModule(data_dir=subset_dir, batch_size=16)
    dm.setup()
    train_words = {w for text in dm.texts("train") for w in WordTokenizer.split(text)}
    assert (
        set(dm.tokenizer.vocab) - set(SPECIAL_TOKENS) - {t for t in dm.id_to_token if t.startswith("[unused")}
        == train_words
    )
    unseen = {w for text in dm.texts("test") for w in WordTokenizer.split(text)} - train_words
    assert unseen, "the small subset should have test words (rare ages, hours, countries) the train split lacks"
    hits = 0
    for text, ids in zip(dm.texts("test"), dm.test_dataset.tensors["input_ids"].tolist()):
        words = WordTokenizer.split(text)
        for position, word in enumerate(words[:30], start=1):  # after [CLS]
            if word in unseen:
                assert ids[position] == UNK_TOKEN_ID, (word, text)
                hits += 1
            else:
                assert ids[position] == dm.vocab[word]
    assert hits > 0
    assert (dm.train_dataset.tensors["input_ids"] == UNK_TOKEN_ID).sum() == 0  # train words are all known


def test_same_seed_same_batches_other_seed_other_split(subset_dir):
    def first_batches(seed):
        dm = AdultTextDataModule(batch_size=32, seed=seed, data_dir=subset_dir)
        dm.setup("fit")
        it = iter(dm.train_dataloader())
        return [next(it) for _ in range(2)], dm.texts("val")

    (a, val_a), (b, val_b), (c, val_c) = first_batches(3), first_batches(3), first_batches(4)
    for batch_a, batch_b in zip(a, b):
        for key in batch_a:
            assert torch.equal(batch_a[key], batch_b[key]), key
    assert val_a == val_b and val_a != val_c
    assert not torch.equal(a[0]["input_ids"], c[0]["input_ids"])


def test_vocab_size_overflow_and_argument_errors(subset_dir):
    with pytest.raises(
        ValueError, match=r"`vocab_size=50` is too small: the training texts need \d+ ids.*at least \d+"
    ):
        AdultTextDataModule(vocab_size=50, data_dir=subset_dir).setup()
    with pytest.raises(ValueError, match="batch_size"):
        AdultTextDataModule(batch_size=0)
    with pytest.raises(ValueError, match="max_length"):
        AdultTextDataModule(max_length=2)
    with pytest.raises(ValueError, match="split"):
        AdultTextDataModule(data_dir=subset_dir).texts("dev")


def test_word_tokenizer():
    tok = WordTokenizer(vocab_size=12).fit(["b a, c", "a a"])
    assert tok.id_to_token == [*SPECIAL_TOKENS, "a", "b", "c", "[unused0]", "[unused1]", "[unused2]", "[unused3]"]
    assert len(tok) == 8 and tok.vocab_size == 12
    assert tok.encode("A, b. zebra", max_length=8) == [CLS_TOKEN_ID, 5, 6, UNK_TOKEN_ID, SEP_TOKEN_ID, 0, 0, 0]
    assert tok.encode("a b c a b c", max_length=4) == [CLS_TOKEN_ID, 5, 6, SEP_TOKEN_ID]  # truncated, [SEP] kept
    assert tok.decode(tok.encode("c b zebra", 6)) == "c b [UNK]"
    assert tok.decode(tok.encode("c b", 6), skip_special_tokens=False) == "[CLS] c b [SEP] [PAD] [PAD]"
    ids, mask = tok.encode_batch(["a", "a b c"], max_length=5)
    assert ids.dtype == mask.dtype == torch.long and mask.sum(1).tolist() == [3, 5]
    assert WordTokenizer().fit(["x y"]).vocab_size == 7  # no padding without vocab_size
    with pytest.raises(ValueError, match="vocab_size=6.*at least 8"):
        WordTokenizer(vocab_size=6).fit(["a b c"])
    with pytest.raises(ValueError, match="max_length"):
        tok.encode("a", max_length=1)
