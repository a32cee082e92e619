"""The bundled Adult census data as short sentences, with a word-level tokenizer (nothing downloaded).

Each Adult row becomes one lowercase sentence such as ``"age 39, state government, bachelors,
never married, clerical, 40 hours a week, small capital gain, no capital loss, united states"``.
The splits, labels and side columns are those of :class:`~lightning_trust.demo.data.AdultDataModule`
(same rows in the same order), so a text model and the tabular one are judged on the same people.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Optional

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_trust.demo.data import (
    ADULT_COLUMNS,
    ADULT_SIDE_COLUMNS,
    AdultDataModule,
    DictDataset,
    SplitLoaders,
    _age_group,
    adult_split_rows,
)

__all__ = [
    "CLS_TOKEN_ID",
    "MASK_TOKEN_ID",
    "PAD_TOKEN_ID",
    "SEP_TOKEN_ID",
    "SPECIAL_TOKENS",
    "UNK_TOKEN_ID",
    "AdultTextDataModule",
    "WordTokenizer",
    "adult_sentence",
]

#: Special tokens, at ids 0..4 of every :class:`WordTokenizer` vocabulary.
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_TOKEN_ID, UNK_TOKEN_ID, CLS_TOKEN_ID, SEP_TOKEN_ID, MASK_TOKEN_ID = range(len(SPECIAL_TOKENS))

_WORD = re.compile(r"[^\s,.;:!?]+")  # words: whitespace and punctuation separate, punctuation is dropped


class WordTokenizer:
    """A word-level tokenizer in plain Python: lowercase words, punctuation dropped, BERT-style specials.

    Ids 0..4 are ``[PAD]``, ``[UNK]``, ``[CLS]``, ``[SEP]``, ``[MASK]``; then the words of the texts
    given to :meth:`fit`, sorted (so the ids depend only on which words the texts hold, not on how
    often: two train splits with the same words give the same ids). Words not seen by ``fit`` encode as
    ``[UNK]``. With ``vocab_size`` the vocabulary is padded to exactly that many ids with
    ``[unused0]``, ``[unused1]``... (as BERT's vocabulary is), so an embedding table of that size fits.

    Args:
        vocab_size: total number of ids (specials + words + padding); ``None``: exactly what ``fit`` finds.

    Example:
        >>> tok = WordTokenizer(vocab_size=16).fit(["age 39, bachelors", "age 50, masters"])
        >>> tok.id_to_token[:8]
        ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', '39', '50', 'age']
        >>> tok.encode("age 39, doctorate", max_length=7)
        [2, 7, 5, 1, 3, 0, 0]
        >>> tok.decode([2, 7, 5, 1, 3, 0, 0])
        'age 39 [UNK]'
        >>> tok.vocab_size, len(tok)
        (16, 10)
    """

    def __init__(self, vocab_size: Optional[int] = None) -> None:
        if vocab_size is not None and vocab_size < len(SPECIAL_TOKENS):
            raise ValueError(
                f"`vocab_size` must be at least {len(SPECIAL_TOKENS)} (the special tokens), got {vocab_size}."
            )
        self.requested_vocab_size = vocab_size
        self.id_to_token: list[str] = list(SPECIAL_TOKENS)
        self.vocab: dict[str, int] = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
        self.num_words = 0  # words learned by fit (not counting specials and padding)

    pad_token_id = PAD_TOKEN_ID
    unk_token_id = UNK_TOKEN_ID
    cls_token_id = CLS_TOKEN_ID
    sep_token_id = SEP_TOKEN_ID
    mask_token_id = MASK_TOKEN_ID

    @staticmethod
    def split(text: str) -> list[str]:
        """The words of a text: lowercase, split at whitespace and punctuation.

        Example:
            >>> WordTokenizer.split("Age 39, State government.")
            ['age', '39', 'state', 'government']
        """
        return _WORD.findall(text.lower())

    def fit(self, texts: Iterable[str]) -> WordTokenizer:
        """Learn the vocabulary of ``texts`` (replacing any earlier one); returns ``self``.

        Raises:
            ValueError: the texts need more ids than ``vocab_size``.
        """
        counts = Counter(word for text in texts for word in self.split(text))
        for special in SPECIAL_TOKENS:
            counts.pop(special.lower(), None)
        words = sorted(counts)
        needed = len(SPECIAL_TOKENS) + len(words)
        size = self.requested_vocab_size
        if size is not None and needed > size:
            raise ValueError(
                f"`vocab_size={size}` is too small: the training texts need {needed} ids "
                f"({len(SPECIAL_TOKENS)} special tokens + {len(words)} words). Set `vocab_size` to at least {needed} "
                f"(and the model's `vocab_size` to the same value)."
            )
        self.num_words = len(words)
        self.id_to_token = list(SPECIAL_TOKENS) + words
        if size is not None:
            self.id_to_token += [f"[unused{i}]" for i in range(size - needed)]
        self.vocab = {token: i for i, token in enumerate(self.id_to_token)}
        return self

    @property
    def vocab_size(self) -> int:
        """Number of ids, padding included (the embedding size a model needs)."""
        return len(self.id_to_token)

    def __len__(self) -> int:
        """Number of real tokens: specials plus fitted words (no padding)."""
        return len(SPECIAL_TOKENS) + self.num_words

    def encode(self, text: str, max_length: int = 32) -> list[int]:
        """``[CLS] words [SEP]``, truncated to ``max_length`` (``[SEP]`` kept last) and padded with ``[PAD]``."""
        if max_length < 2:
            raise ValueError(f"`max_length` must be >= 2 ([CLS] and [SEP]), got {max_length}.")
        lookup = self.vocab.get
        ids = [lookup(w, UNK_TOKEN_ID) for w in self.split(text)[: max_length - 2]]
        ids = [CLS_TOKEN_ID, *ids, SEP_TOKEN_ID]
        return ids + [PAD_TOKEN_ID] * (max_length - len(ids))

    def encode_batch(self, texts: Sequence[str], max_length: int = 32) -> tuple[Tensor, Tensor]:
        """``(input_ids, attention_mask)``, two ``(N, max_length)`` long tensors.

        Example:
            >>> ids, mask = WordTokenizer().fit(["a b"]).encode_batch(["a b", "b"], max_length=5)
            >>> ids.tolist(), mask.tolist()
            ([[2, 5, 6, 3, 0], [2, 6, 3, 0, 0]], [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
        """
        ids = torch.tensor([self.encode(t, max_length) for t in texts], dtype=torch.long).reshape(
            len(texts), max_length
        )
        return ids, (ids != PAD_TOKEN_ID).long()

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """The words of ``ids`` joined by spaces; ``[PAD]``/``[CLS]``/``[SEP]`` dropped unless
        ``skip_special_tokens=False`` (``[UNK]`` and ``[MASK]`` are always shown)."""
        skip = {PAD_TOKEN_ID, CLS_TOKEN_ID, SEP_TOKEN_ID} if skip_special_tokens else set()
        values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return " ".join(self.id_to_token[int(i)] for i in values if int(i) not in skip)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, words={self.num_words})"


# --- rows as sentences ---------------------------------------------------------------------------

_PHRASES: dict[str, dict[str, str]] = {
    "workclass": {
        "Private": "private sector", "Self-emp-not-inc": "self employed", "Self-emp-inc": "self employed incorporated",
        "Federal-gov": "federal government", "Local-gov": "local government", "State-gov": "state government",
    },
    "education": {
        "HS-grad": "high school graduate", "Assoc-acdm": "associate academic", "Assoc-voc": "associate vocational",
        "Prof-school": "professional school", "1st-4th": "1st to 4th grade", "5th-6th": "5th to 6th grade",
        "7th-8th": "7th to 8th grade", "9th": "9th grade", "10th": "10th grade", "11th": "11th grade",
        "12th": "12th grade",
    },
    "marital-status": {"Married-civ-spouse": "married", "Married-AF-spouse": "married armed forces spouse"},
    "occupation": {
        "Adm-clerical": "clerical", "Exec-managerial": "executive managerial", "Machine-op-inspct": "machine operator",
        "Priv-house-serv": "private house service", "Prof-specialty": "professional specialty",
        "Protective-serv": "protective service",
    },
    "relationship": {"Not-in-family": "not in family"},
    "race": {"Amer-Indian-Eskimo": "american indian eskimo", "Asian-Pac-Islander": "asian pacific islander",
             "Other": "other race"},
    "native-country": {
        "Outlying-US(Guam-USVI-etc)": "outlying us", "Trinadad&Tobago": "trinidad and tobago",
        "Holand-Netherlands": "netherlands", "Hong": "hong kong", "South": "south korea",
    },
}  # fmt: skip  # anything else: lowercase, hyphens as spaces

#: Columns whose words name (or leak) a sensitive attribute: left out unless ``include_sensitive``.
#: ``relationship`` is among them because "husband"/"wife" state the sex.
SENSITIVE_COLUMNS: tuple[str, ...] = ("relationship", "race", "sex")
#: The words only those columns produce (e.g. for checking that a text leaks none of them).
SENSITIVE_WORDS: frozenset[str] = frozenset(
    {"male", "female", "husband", "wife", "white", "black", "asian", "pacific", "islander", "american", "indian",
     "eskimo", "race", "unmarried", "own", "child", "relative", "family"}
)  # fmt: skip


def _phrase(column: str, value: str) -> str:
    return _PHRASES.get(column, {}).get(value) or value.lower().replace("-", " ")


def _bucket(amount: float, limits: tuple[float, float], what: str) -> str:
    if amount <= 0:
        return f"no {what}"
    return f"{'small' if amount < limits[0] else 'moderate' if amount < limits[1] else 'large'} {what}"


def adult_sentence(row: Sequence[str], include_sensitive: bool = False) -> str:
    """One raw Adult row (the 15 published fields, as strings) as a lowercase sentence.

    Capital gain is bucketed as no / small (< 3,000) / moderate (< 7,000) / large; capital loss as
    no / small (< 1,800) / moderate (< 2,000) / large. Relationship, race and sex are left out unless
    ``include_sensitive``.

    Example:
        >>> row = ["39", "State-gov", "77516", "Bachelors", "13", "Never-married", "Adm-clerical",
        ...        "Not-in-family", "White", "Male", "2174", "0", "40", "United-States", "<=50K"]
        >>> adult_sentence(row)
        'age 39, state government, bachelors, never married, clerical, 40 hours a week, small capital gain, no capital loss, united states'
        >>> adult_sentence(row, include_sensitive=True).split(", ")[5:8]
        ['not in family', 'white', 'male']
    """
    r = dict(zip(ADULT_COLUMNS, row))
    parts = [f"age {r['age']}"] + [_phrase(c, r[c]) for c in ("workclass", "education", "marital-status", "occupation")]
    if include_sensitive:
        parts += [_phrase(c, r[c]) for c in SENSITIVE_COLUMNS]
    parts += [
        f"{r['hours-per-week']} hours a week",
        _bucket(float(r["capital-gain"]), (3000, 7000), "capital gain"),
        _bucket(float(r["capital-loss"]), (1800, 2000), "capital loss"),
        _phrase("native-country", r["native-country"]),
    ]
    return ", ".join(parts)


class AdultTextDataModule(SplitLoaders, pl.LightningDataModule):
    """UCI Adult (bundled) as tokenized sentences, with the same splits and side columns as :class:`AdultDataModule`.

    Every row becomes a sentence (:func:`adult_sentence`); sex, race and relationship words are left
    out unless ``include_sensitive``. A :class:`WordTokenizer` is fitted on the train split's
    sentences only, so words seen only in validation/test encode as ``[UNK]``. The rows, their order,
    the train/val split (``seed``, ``val_fraction``) and the labels and side columns are exactly those
    of ``AdultDataModule(seed=seed, val_fraction=val_fraction)``. Batches are dicts: ``input_ids``,
    ``attention_mask`` (long ``(B, max_length)``), ``labels`` (income > 50K) and the integer-coded
    side columns ``sex``, ``race``, ``age_group``, ``native_region`` (names in :attr:`categories`).

    Args:
        batch_size: samples per batch.
        num_workers: DataLoader workers.
        seed: seed of the validation split and of the train loader's shuffling.
        val_fraction: share of the training file held out for validation.
        data_dir: folder with ``adult.data``/``adult.test`` (gzipped or not); default: the bundled copy.
        vocab_size: ids of the tokenizer, padded with unused tokens; must cover the training words.
        max_length: tokens per sentence, ``[CLS]`` first and ``[SEP]`` last (truncated/padded).
        include_sensitive: keep the relationship, race and sex words in the sentences.

    Example:
        >>> dm = AdultTextDataModule(batch_size=8)
        >>> dm.setup("fit")
        >>> dm.texts("train")[0].startswith("age ")
        True
        >>> batch = next(iter(dm.val_dataloader()))
        >>> sorted(batch), tuple(batch["input_ids"].shape)
        (['age_group', 'attention_mask', 'input_ids', 'labels', 'native_region', 'race', 'sex'], (8, 32))
        >>> dm.tokenizer.decode(batch["input_ids"][0]) == dm.tokenizer.decode(dm.tokenizer.encode(dm.texts("val")[0]))
        True
    """

    #: How the pack's callbacks read these batches: model keyword inputs and the target key.
    batch_keys = {"input_keys": ["input_ids", "attention_mask"], "target": "labels"}
    #: Text has no named input features (the tabular module's ``feature_names``).
    feature_names: Optional[list[str]] = None

    def __init__(
        self,
        batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 42,
        val_fraction: float = 0.1,
        data_dir: Optional[str] = None,
        vocab_size: int = 1024,
        max_length: int = 32,
        include_sensitive: bool = False,
    ) -> None:
        super().__init__()
        # the tabular module validates the shared arguments (and owns the rows, splits and side columns)
        self.tabular = AdultDataModule(
            batch_size=batch_size, num_workers=num_workers, seed=seed, val_fraction=val_fraction, data_dir=data_dir
        )
        if vocab_size < len(SPECIAL_TOKENS):
            raise ValueError(
                f"`vocab_size` must be at least {len(SPECIAL_TOKENS)} (the special tokens), got {vocab_size}."
            )
        if max_length < 3:
            raise ValueError(f"`max_length` must be >= 3 ([CLS], a word, [SEP]), got {max_length}.")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.val_fraction = val_fraction
        self.data_dir = data_dir
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.include_sensitive = include_sensitive
        self.tokenizer = WordTokenizer(vocab_size=vocab_size)
        self.categories: dict[str, list[str]] = self.tabular.categories  # filled in by setup
        self._texts: dict[str, list[str]] = {}
        self.train_dataset: Optional[DictDataset] = None
        self.val_dataset: Optional[DictDataset] = None
        self.test_dataset: Optional[DictDataset] = None

    num_classes = 2
    pad_token_id = PAD_TOKEN_ID
    mask_token_id = MASK_TOKEN_ID
    cls_token_id = CLS_TOKEN_ID
    sep_token_id = SEP_TOKEN_ID
    unk_token_id = UNK_TOKEN_ID

    @property
    def vocab(self) -> dict[str, int]:
        """Token -> id of the fitted tokenizer (read by the pack's text attributions)."""
        self._build()
        return self.tokenizer.vocab

    @property
    def id_to_token(self) -> list[str]:
        """Id -> token of the fitted tokenizer."""
        self._build()
        return self.tokenizer.id_to_token

    def texts(self, split: str) -> list[str]:
        """The raw sentences of ``"train"``, ``"val"`` or ``"test"``, in dataset order."""
        self._build()
        if split not in self._texts:
            raise ValueError(f"`split` must be one of {sorted(self._texts)}, got {split!r}.")
        return self._texts[split]

    def setup(self, stage: Optional[str] = None) -> None:
        self._build()

    def _build(self) -> None:
        if self.train_dataset is not None:
            return
        tab = self.tabular
        tab.setup()
        # the same rows in the same order as AdultDataModule (checked against its labels below)
        rows = adult_split_rows(self.data_dir, self.seed, self.val_fraction)
        tabular = {"train": tab.train_dataset, "val": tab.val_dataset, "test": tab.test_dataset}
        col = {name: i for i, name in enumerate(ADULT_COLUMNS)}
        for split, split_rows in rows.items():
            reference = tabular[split].tensors  # type: ignore[union-attr]
            labels = torch.tensor([r[col["income"]].rstrip(".") == ">50K" for r in split_rows], dtype=torch.long)
            ages = torch.tensor([_age_group(float(r[col["age"]])) for r in split_rows], dtype=torch.long)
            if not (torch.equal(labels, reference["y"]) and torch.equal(ages, reference["age_group"])):
                raise RuntimeError(
                    f"AdultTextDataModule's {split} rows no longer line up with AdultDataModule's; "
                    "its split logic changed: update AdultTextDataModule._build to follow it."
                )
            self._texts[split] = [adult_sentence(r, self.include_sensitive) for r in split_rows]
        self.tokenizer.fit(self._texts["train"])  # train split only
        datasets = {}
        for split, texts in self._texts.items():
            ids, mask = self.tokenizer.encode_batch(texts, self.max_length)
            reference = tabular[split].tensors  # type: ignore[union-attr]
            datasets[split] = DictDataset({
                "input_ids": ids, "attention_mask": mask, "labels": reference["y"].clone(),
                **{name: reference[name].clone() for name in ADULT_SIDE_COLUMNS},
            })  # fmt: skip
        self.categories = tab.categories
        self.val_dataset, self.test_dataset = datasets["val"], datasets["test"]
        self.train_dataset = datasets["train"]  # last: marks the build as done
