"""Cross-domain evaluation of token models: text perturbations by hand, token-level targets, the text
demo with a tiny BERT (per-region and corrupted-copy metrics recomputed by hand), setup refusals."""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from sklearn.metrics import accuracy_score, log_loss

from lightning_trust.evaluation import CrossDomainEvaluation
from lightning_trust.evaluation.extra_passes import corruption_seed
from lightning_trust.evaluation.text import IGNORE_INDEX, Vocabulary, find_vocabulary, perturb_tokens
from lightning_trust.evaluation.tokens import align_tokens, label_shift
from tests.foundation.models import HFTextClassifier, build
from tests.support import trainer

VOCAB = Vocabulary(size=30, pad_token_id=0, special_ids=frozenset({0, 1, 2, 3}))


def _batch(n: int = 64, length: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(4, 30, (n, length), generator=g)
    lengths = torch.randint(4, length + 1, (n,), generator=g)
    positions = torch.arange(length)[None, :]
    ids = torch.where(positions < lengths[:, None], words, 0)
    ids[:, 0] = 2  # [CLS]
    ids[torch.arange(n), lengths - 1] = 3  # [SEP]
    return {"input_ids": ids, "attention_mask": (ids != 0).long(), "token_type_ids": torch.zeros_like(ids)}


def _hits(ids: torch.Tensor, mask: torch.Tensor, severity: int, seed: int) -> torch.Tensor:
    """The word tokens a perturbation at ``severity`` picks with generator ``seed`` (drawn as it draws)."""
    rate = (0.05, 0.1, 0.2, 0.3, 0.5)[severity - 1]
    words = mask.bool() & (ids > 3)
    return (torch.rand(ids.shape, generator=torch.Generator().manual_seed(seed)) < rate) & words


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_token_dropout_deletes_the_picked_words_and_shifts_the_rest(severity):
    batch = _batch()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    out, target = perturb_tokens(batch, "token_dropout", severity, torch.Generator().manual_seed(7), VOCAB, labels)
    hit = _hits(batch["input_ids"], batch["attention_mask"], severity, 7)
    assert hit.any()
    for i in range(len(hit)):
        row = batch["input_ids"][i]
        kept = [int(t) for t, h, m in zip(row, hit[i], batch["attention_mask"][i]) if m and not h]
        expected = kept + [0] * (len(row) - len(kept))
        assert out["input_ids"][i].tolist() == expected
        assert out["attention_mask"][i].tolist() == [1] * len(kept) + [0] * (len(row) - len(kept))
        assert target[i].tolist() == kept + [IGNORE_INDEX] * (len(row) - len(kept))  # labels follow the ids
    assert out["token_type_ids"].shape == batch["token_type_ids"].shape
    again, _ = perturb_tokens(batch, "token_dropout", severity, torch.Generator().manual_seed(7), VOCAB)
    assert torch.equal(again["input_ids"], out["input_ids"])  # seeded


def test_word_swap_draws_from_the_vocabulary_without_specials_and_keeps_the_mask():
    batch = _batch()
    out, _ = perturb_tokens(batch, "word_swap", 5, torch.Generator().manual_seed(3), VOCAB)
    hit = _hits(batch["input_ids"], batch["attention_mask"], 5, 3)
    changed = out["input_ids"] != batch["input_ids"]
    assert changed.any() and not (changed & ~hit).any()  # only picked word tokens change
    swapped = out["input_ids"][hit]
    assert ((swapped >= 4) & (swapped < 30)).all()  # training vocabulary, specials excluded
    assert torch.equal(out["attention_mask"], batch["attention_mask"])
    # a higher severity changes more tokens
    low, _ = perturb_tokens(batch, "word_swap", 1, torch.Generator().manual_seed(3), VOCAB)
    assert (low["input_ids"] != batch["input_ids"]).sum() < changed.sum()


def test_char_noise_edits_words_of_the_decoded_text_and_reencodes(adult_text):
    tokenizer = adult_text.tokenizer
    vocab = find_vocabulary(torch.nn.Linear(1, 1), adult_text)
    assert vocab is not None and vocab.size == len(tokenizer) and {0, 1, 2, 3, 4} <= vocab.special_ids
    batch = next(iter(adult_text.val_dataloader()))
    inputs = {"input_ids": batch["input_ids"][:32], "attention_mask": batch["attention_mask"][:32]}
    out, _ = perturb_tokens(inputs, "char_noise", 5, torch.Generator().manual_seed(0), vocab)
    clean = [tokenizer.decode(r) for r in inputs["input_ids"]]
    noisy = [tokenizer.decode(r) for r in out["input_ids"]]
    # a misspelt word is out of the word-level vocabulary: it encodes as [UNK], the rest is unchanged
    unk = tokenizer.unk_token_id
    assert (out["input_ids"] == unk).sum() > (inputs["input_ids"] == unk).sum()
    changed = 0
    for a, b in zip(clean, noisy):
        assert len(a.split()) == len(b.split())
        for w, v in zip(a.split(), b.split()):
            # one character edit (a swap is two substitutions); [UNK] where the result is no known word
            assert w == v or v == "[UNK]" or _distance(w, v) <= 2, (w, v)
            changed += w != v
    assert changed > 0.2 * sum(len(a.split()) for a in clean)  # severity 5 edits half of the words
    assert torch.equal(out["attention_mask"], (out["input_ids"] != 0).long())


def _distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def test_token_level_targets_are_aligned_by_the_label_shift():
    ids = torch.tensor([[5, 6, 7, 0]])
    labels = torch.tensor([[5, 6, 7, IGNORE_INDEX]])
    assert label_shift("auto", {"input_ids": ids}, labels) == 1  # Hugging Face causal LM: labels are the ids
    assert label_shift("auto", ids, torch.tensor([[6, 7, 8, 9]])) == 0  # already shifted targets
    logits = torch.zeros(1, 4, 9)
    logits[0, 0, 6] = logits[0, 1, 1] = logits[0, 2, 3] = 1.0
    preds, target, index = align_tokens(logits, labels, torch.tensor([2]), shift=1)
    assert target.tolist() == [6, 7] and index.tolist() == [2, 2]  # the pad label is left out
    assert (preds.argmax(1) == target).tolist() == [True, False]


# the text demo ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adult_text():
    from lightning_trust.demo import AdultTextDataModule

    dm = AdultTextDataModule(batch_size=128)
    dm.setup("fit")
    return dm


def _tiny_bert() -> HFTextClassifier:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=1024, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2, pad_token_id=0)  # fmt: skip
    return HFTextClassifier(BertForSequenceClassification(config), lr=3e-3)


@contextmanager
def _keeps_determinism():
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


@pytest.mark.slow
def test_text_demo_regions_and_text_perturbations_equal_a_hand_computation(adult_text, tmp_path):
    pl.seed_everything(0)
    model = _tiny_bert()
    cb = CrossDomainEvaluation(domain_key="native_region", corruptions="all", severities=[2, 5],
                               metrics=["accuracy", "nll"], figures=False, max_overhead=None)  # fmt: skip
    with _keeps_determinism():
        trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=20, limit_val_batches=3).fit(model, adult_text)
    assert cb.corruptions == ["token_dropout", "word_swap", "char_noise"]  # the text suite, tokenizer found
    report = cb.report()
    model.eval()
    batches = [b for _, b in zip(range(3), adult_text.val_dataloader())]
    vocab = find_vocabulary(model, adult_text)

    def probabilities(ids, mask):
        with torch.no_grad():
            return model(ids, attention_mask=mask).logits.softmax(-1).numpy()

    probs = [probabilities(b["input_ids"], b["attention_mask"]) for b in batches]
    labels = torch.cat([b["labels"] for b in batches]).numpy()
    regions = torch.cat([b["native_region"] for b in batches]).numpy()
    all_probs = torch.cat([torch.from_numpy(p) for p in probs]).numpy()
    for code, name in enumerate(adult_text.categories["native_region"]):
        rows = regions == code
        if rows.sum() == 0:
            assert report["per_domain"][name]["accuracy"] is None
            continue
        expected = accuracy_score(labels[rows], all_probs[rows].argmax(1))
        assert report["per_domain"][name]["accuracy"] == pytest.approx(expected, abs=1e-6)
    for ci, name in enumerate(cb.corruptions):
        for severity in (2, 5):
            noisy = []
            for i, b in enumerate(batches):
                g = torch.Generator().manual_seed(corruption_seed(0, 0, i, ci, severity))
                inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
                out, _ = perturb_tokens(inputs, name, severity, g, vocab, b["labels"])
                noisy.append(probabilities(out["input_ids"], out["attention_mask"]))
            p = torch.cat([torch.from_numpy(x) for x in noisy]).numpy()
            entry = report["per_domain"][f"{name}_s{severity}"]
            assert entry["accuracy"] == pytest.approx(accuracy_score(labels, p.argmax(1)), abs=1e-6)
            assert entry["nll"] == pytest.approx(log_loss(labels, p, labels=[0, 1]), rel=1e-4)
    assert report["extra_passes"] == "run" and not math.isnan(report["corruption_error"])


@pytest.mark.slow
def test_causal_lm_is_scored_per_token_with_its_word_swaps(tmp_path):
    torch.manual_seed(0)
    module, dm = build("gpt2_lm")
    cb = CrossDomainEvaluation(domain_key="domain", corruptions=["token_dropout", "word_swap"], severities=[4],
                               metrics=["accuracy"], figures=False)  # fmt: skip
    trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=2, limit_val_batches=2).fit(module, dm)
    report = cb.report()
    module.eval()
    hits = []
    for i, batch in enumerate([b for _, b in zip(range(2), dm.val_dataloader())]):
        g = torch.Generator().manual_seed(corruption_seed(0, 0, i, 0, 4))
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        out, labels = perturb_tokens(inputs, "token_dropout", 4, g, cb._probed.vocabulary, batch["labels"])
        with torch.no_grad():
            logits = module(out["input_ids"], attention_mask=out["attention_mask"]).logits
        target = labels[:, 1:]  # dropped tokens leave the labels with the ids; the model predicts t + 1
        hits.append((logits[:, :-1].argmax(-1) == target)[target != IGNORE_INDEX].float())
    expected = torch.cat(hits).mean().item()
    assert report["per_domain"]["token_dropout_s4"]["accuracy"] == pytest.approx(expected, abs=1e-6)
    assert report["sizes"]["token_dropout_s4"] > 32  # tokens, not sentences


# refusals at setup -------------------------------------------------------------------------------
def _refused(module, dm, cb, tmp_path: Path, match: str) -> None:
    steps = []

    class Steps(pl.Callback):
        def on_train_batch_start(self, *args):
            steps.append(1)

    with pytest.raises((ValueError, KeyError), match=match):
        trainer(tmp_path, [cb, Steps()], max_epochs=1, limit_train_batches=2, limit_val_batches=2).fit(module, dm)
    assert not steps  # before any training step


def test_image_corruptions_on_token_ids_are_refused_naming_the_text_suite(tmp_path):
    module, dm = build("bert")
    cb = CrossDomainEvaluation(domain_key="domain", corruptions=["blur"], figures=False)
    _refused(module, dm, cb, tmp_path, r"token ids.*use `corruptions: \[token_dropout, word_swap, char_noise\]`")


def test_text_corruptions_on_images_and_any_corruption_on_tabular_rows_are_refused(tmp_path, adult):
    module, dm = build("vit")
    cb = CrossDomainEvaluation(domain_key="domain", corruptions=["word_swap"], figures=False)
    _refused(module, dm, cb, tmp_path, r"need integer token ids.*use image corruptions")
    from lightning_trust.demo import TabularMLP

    cb = CrossDomainEvaluation(domain_key="native_region", corruptions="all", figures=False)
    _refused(TabularMLP(), adult, cb, tmp_path, r"float images.*remove `corruptions`")


def test_char_noise_needs_a_tokenizer_and_sentence_targets(tmp_path):
    module, dm = build("bert")
    cb = CrossDomainEvaluation(domain_key="domain", corruptions=["char_noise"], figures=False)
    _refused(module, dm, cb, tmp_path, r"pass `tokenizer=`")
    module, dm = build("gpt2_lm")

    class Codec:
        def encode(self, text):
            return [int(t) for t in text.split()]

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(str(int(i)) for i in ids)

    cb = CrossDomainEvaluation(domain_key="domain", corruptions=["char_noise"], tokenizer=Codec(), figures=False)
    _refused(module, dm, cb, tmp_path, r"per-token targets.*use `corruptions: \[token_dropout, word_swap\]`")


def test_no_target_and_no_validation_step_are_refused_naming_the_fix(tmp_path):
    module, dm = build("boring")
    _refused(module, dm, CrossDomainEvaluation(domain_key="domain"), tmp_path, r"batch_keys: \{target: ")
    module, dm = build("demo_transformer")
    _refused(module, dm, CrossDomainEvaluation(domain_key="domain"), tmp_path, r"add a `validation_step`")


def test_label_shift_is_checked():
    with pytest.raises(ValueError, match="`label_shift`"):
        CrossDomainEvaluation(domain_key="domain", label_shift=2)
