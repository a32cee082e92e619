import contextlib
import csv
import io
import time
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_trust.demo import AdultTextDataModule, TinyTextTransformer, TinyViT
from lightning_trust.demo.foundation import load_encoder_state
from lightning_trust.demo.text import CLS_TOKEN_ID, MASK_TOKEN_ID, PAD_TOKEN_ID, SEP_TOKEN_ID

pytest.importorskip("transformers")
pytest.importorskip("peft")

SMALL = {"vocab_size": 64, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}
NEW_IN_CLASSIFIER = ["bert.pooler.dense.bias", "bert.pooler.dense.weight", "classifier.bias", "classifier.weight"]


def _trainer(tmp_path, **kwargs):
    defaults = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": tmp_path}  # fmt: skip
    return pl.Trainer(**{**defaults, **kwargs})


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine, two threads per process oversubscribe the
    cores (a training step here ran 5x slower with two than with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def text_dm():
    dm = AdultTextDataModule(batch_size=128)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A masked-LM encoder pretrained (shortly) by `pretrain_if_missing` and cached as a .ckpt."""
    path = tmp_path_factory.mktemp("encoder") / "cache" / "mlm.ckpt"  # the parent folder does not exist yet
    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        model = TinyTextTransformer(
            pretrained=str(path), pretrain_epochs=1, pretrain_limit_batches=40, pretrain_batch_size=128
        )
    return SimpleNamespace(path=path, message=out.getvalue(), model=model, seconds=time.perf_counter() - start)


# --- fast ------------------------------------------------------------------------------------


def test_text_transformer_returns_hugging_face_outputs():
    from transformers.utils import ModelOutput

    model = TinyTextTransformer(**SMALL).eval()
    ids = torch.tensor([[CLS_TOKEN_ID, 7, 9, SEP_TOKEN_ID, PAD_TOKEN_ID], [CLS_TOKEN_ID, 8, SEP_TOKEN_ID, 0, 0]])
    mask = (ids != PAD_TOKEN_ID).long()
    labels = torch.tensor([0, 1])
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert isinstance(out, ModelOutput) and out.logits.shape == (2, 2)
    assert torch.allclose(out.loss, F.cross_entropy(out.logits, labels))
    assert model(input_ids=ids, attention_mask=mask).loss is None
    assert type(model.model).__name__ == "BertForSequenceClassification"
    mlm = TinyTextTransformer(task="mlm", **SMALL)
    assert type(mlm.model).__name__ == "BertForMaskedLM"
    assert mlm(input_ids=ids, attention_mask=mask).logits.shape == (2, 5, 64)


def test_init_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = (
        TinyTextTransformer(seed=3, **SMALL),
        TinyTextTransformer(seed=3, **SMALL),
        TinyTextTransformer(seed=4, **SMALL),
    )
    assert torch.equal(state, torch.get_rng_state())
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(
        a.model.bert.embeddings.word_embeddings.weight, c.model.bert.embeddings.word_embeddings.weight
    )
    assert "seed" not in a.hparams and a.seed == 3  # the datamodule's `seed` would clash in the logger's hparams


def test_mask_tokens_follows_bert_masking():
    model = TinyTextTransformer(task="mlm", mlm_probability=0.15, **SMALL)
    torch.manual_seed(0)
    n, length = 4000, 24
    ids = torch.randint(5, 64, (n, length))
    lengths = torch.randint(4, length + 1, (n,))
    positions = torch.arange(length).expand(n, length)
    ids[positions >= lengths[:, None]] = PAD_TOKEN_ID
    ids[:, 0] = CLS_TOKEN_ID
    ids[torch.arange(n), lengths - 1] = SEP_TOKEN_ID
    mask = (ids != PAD_TOKEN_ID).long()
    masked, labels = model.mask_tokens(ids, mask, generator=torch.Generator().manual_seed(1))
    chosen = labels != -100
    words = (ids >= 5) & mask.bool()
    assert not (chosen & ~words).any()  # never [PAD], [CLS], [SEP]
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])  # only chosen positions change
    per_row = words.sum(1).double()  # 15 % of the words, plus one forced where a sentence drew none
    expected = (0.15 * per_row + 0.85**per_row).sum() / per_row.sum()
    assert abs(chosen.sum() / words.sum() - expected) < 0.01 and 0.15 < expected < 0.2
    share_mask = (masked[chosen] == MASK_TOKEN_ID).float().mean()
    share_kept = (masked[chosen] == ids[chosen]).float().mean()
    assert abs(share_mask - 0.8) < 0.02 and 0.08 < share_kept < 0.13  # 10 % kept (+ swaps that drew the same word)
    assert ((masked[chosen] >= 5) | (masked[chosen] == MASK_TOKEN_ID)).all()  # swaps draw real words
    # a one-word sentence still gets its word masked; same generator, same masks
    _, one = model.mask_tokens(
        torch.tensor([[CLS_TOKEN_ID, 9, SEP_TOKEN_ID]]), generator=torch.Generator().manual_seed(0)
    )
    assert one.tolist() == [[-100, 9, -100]]
    again, _ = model.mask_tokens(ids, mask, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again, masked)


def test_lora_trains_only_adapters_and_head():
    model = TinyTextTransformer(lora_rank=4, lora_alpha=8, **SMALL)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".classifier.modules_to_save." in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable if "lora_" in n} == {"query", "value"}
    assert sum("modules_to_save" in n for n in trainable) == 2  # classifier weight and bias
    optimizer = model.configure_optimizers()
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for p in model.parameters() if p.requires_grad
    }
    plain = TinyTextTransformer(**SMALL)
    assert all(p.requires_grad for p in plain.parameters())


def test_load_encoder_from_save_pretrained_folder(tmp_path):
    mlm = TinyTextTransformer(task="mlm", seed=5, **SMALL)
    mlm.model.save_pretrained(str(tmp_path / "encoder"))
    model = TinyTextTransformer(pretrained=str(tmp_path / "encoder"), **SMALL)
    assert model.pretrained_report["missing"] == NEW_IN_CLASSIFIER and model.pretrained_report["unexpected"] == []
    source = mlm.model.state_dict()
    for name, value in model.model.state_dict().items():
        if name.startswith("bert.") and not name.startswith("bert.pooler."):
            assert torch.equal(value, source[name]), name
    with pytest.raises(ValueError, match="does not fit this model"):
        TinyTextTransformer(pretrained=str(tmp_path / "encoder"), **{**SMALL, "hidden_size": 8})
    with pytest.raises(ValueError, match="missing"):
        load_encoder_state(TinyTextTransformer(**{**SMALL, "num_hidden_layers": 3}).model, source, "classification")


def test_text_transformer_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="task"):
        TinyTextTransformer(task="generation")
    with pytest.raises(ValueError, match="LoRA"):
        TinyTextTransformer(task="mlm", lora_rank=4)
    with pytest.raises(ValueError, match="multiple"):
        TinyTextTransformer(hidden_size=30, num_attention_heads=4)
    with pytest.raises(FileNotFoundError, match="text_pretrain.yaml"):
        TinyTextTransformer(pretrained=str(tmp_path / "nothing.ckpt"), pretrain_if_missing=False)
    assert not (tmp_path / "nothing.ckpt").exists()


def test_vit_returns_hugging_face_outputs():
    model = TinyViT().eval()
    out = model(torch.rand(5, 1, 8, 8))
    assert out.logits.shape == (5, 10) and type(model.model).__name__ == "ViTForImageClassification"
    assert model.model.config.image_size == 8 and model.model.config.patch_size == 2
    with pytest.raises(ValueError, match="patch_size"):
        TinyViT(patch_size=3)


# --- trainings -------------------------------------------------------------------------------


def _epoch_means(path, key):
    with open(path) as handle:
        rows = [r for r in csv.DictReader(handle) if r.get(key)]
    return [float(r[key]) for r in rows]


@pytest.mark.slow
def test_mlm_pretraining_lowers_the_loss(text_dm, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    model = TinyTextTransformer(task="mlm")
    logger = CSVLogger(str(tmp_path), name="", version="")
    trainer = _trainer(tmp_path, max_epochs=3, limit_train_batches=10, limit_val_batches=4, logger=logger)
    trainer.fit(model, text_dm)
    train = _epoch_means(tmp_path / "metrics.csv", "train/loss")
    val = _epoch_means(tmp_path / "metrics.csv", "val/loss")
    print(f"MLM train loss per epoch {train}, val loss {val}")
    assert len(train) == 3 and len(val) == 3
    assert train[-1] < train[0] - 0.5  # from ~ln(1024) = 6.9 at random init
    assert val[-1] < val[0]


@pytest.mark.slow
def test_pretrain_if_missing_caches_the_encoder(pretrained, text_dm, tmp_path, capsys):
    assert pretrained.path.is_file()
    assert "no pretrained encoder at" in pretrained.message and "cached it there" in pretrained.message
    assert str(pretrained.path) in pretrained.message and len(pretrained.message.strip().splitlines()) == 1
    print(pretrained.message.strip(), f"(fixture: {pretrained.seconds:.1f} s)")
    checkpoint = torch.load(pretrained.path, weights_only=True)
    assert checkpoint["hyper_parameters"]["task"] == "mlm"
    assert checkpoint["tokenizer_vocab"] == text_dm.id_to_token  # the vocabulary the ids mean
    # a second model finds the cache: no pretraining
    capsys.readouterr()
    TinyTextTransformer(pretrained=str(pretrained.path))
    assert "no pretrained encoder" not in capsys.readouterr().out
    # a path without .ckpt caches a save_pretrained folder with BERT's vocab.txt
    folder = tmp_path / "enc" / "folder"
    model = TinyTextTransformer(pretrained=str(folder), pretrain_epochs=1, pretrain_limit_batches=2)
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert (folder / "vocab.txt").read_text().splitlines() == text_dm.id_to_token
    assert not list(folder.parent.glob("*partial"))  # written aside, then renamed
    assert model.pretrained_report["missing"] == NEW_IN_CLASSIFIER


@pytest.mark.slow
def test_pretrained_encoder_is_copied_exactly(pretrained):
    state = torch.load(pretrained.path, weights_only=True)["state_dict"]
    model = TinyTextTransformer(pretrained=str(pretrained.path), seed=9)
    report = model.pretrained_report
    assert report["missing"] == NEW_IN_CLASSIFIER and report["unexpected"] == []
    encoder = {
        k: v for k, v in model.model.state_dict().items() if k.startswith("bert.") and not k.startswith("bert.pooler.")
    }
    assert len(encoder) == len(report["loaded"]) > 30
    for name, value in encoder.items():
        assert torch.equal(value, state[f"model.{name}"]), name
    fresh = TinyTextTransformer(seed=9)  # what the weights would be without `pretrained`
    assert not torch.equal(
        fresh.model.bert.embeddings.word_embeddings.weight, model.model.bert.embeddings.word_embeddings.weight
    )
    assert torch.equal(fresh.model.classifier.weight, model.model.classifier.weight)  # the head starts fresh


@pytest.mark.slow
def test_finetuning_from_the_pretrained_encoder_beats_the_majority_class(pretrained, text_dm, tmp_path):
    pl.seed_everything(0)
    model = TinyTextTransformer(pretrained=str(pretrained.path), lr=3e-3)
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=80, limit_test_batches=20)
    trainer.fit(model, text_dm)
    labels = text_dm.val_dataset.tensors["labels"].float()
    majority = max(labels.mean(), 1 - labels.mean()).item()
    accuracy = trainer.callback_metrics["val/acc"].item()
    print(f"fine-tuned val/acc {accuracy:.4f} vs majority {majority:.4f}")
    assert accuracy > majority + 0.03
    assert {"train/loss", "val/loss", "val/acc"} <= set(trainer.callback_metrics)
    trainer.test(model, text_dm, verbose=False)
    assert trainer.callback_metrics["test/acc"] > majority


@pytest.mark.slow
def test_lora_leaves_every_base_weight_bit_identical(pretrained, text_dm, tmp_path):
    pl.seed_everything(0)
    model = TinyTextTransformer(pretrained=str(pretrained.path), lora_rank=4, lr=5e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=8, limit_val_batches=0)
    trainer.fit(model, text_dm)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and not changed & frozen  # every base weight bit-identical
    lora_b = {n for n in before if "lora_B" in n}
    assert lora_b and lora_b <= changed  # LoRA B starts at zero and moved
    assert {n for n in before if "modules_to_save" in n} <= changed
    # the frozen encoder is still the pretrained one
    state = torch.load(pretrained.path, weights_only=True)["state_dict"]
    base = model.model.base_model.model
    assert torch.equal(base.bert.encoder.layer[0].attention.self.query.base_layer.weight,
                       state["model.bert.encoder.layer.0.attention.self.query.weight"])  # fmt: skip
    # a checkpoint of the LoRA classifier restores the same predictions
    trainer.save_checkpoint(tmp_path / "lora.ckpt")
    restored = TinyTextTransformer.load_from_checkpoint(tmp_path / "lora.ckpt").eval()
    batch = next(iter(text_dm.val_dataloader()))
    with torch.no_grad():
        expected = model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert torch.equal(
            restored(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, expected
        )


@pytest.mark.slow
def test_finetuning_refuses_another_tokenizer(pretrained, tmp_path):
    other = AdultTextDataModule(include_sensitive=True)  # more words: ids mean other words
    with pytest.raises(ValueError, match="tokenizer differs"):
        _trainer(tmp_path, fast_dev_run=True).fit(TinyTextTransformer(pretrained=str(pretrained.path)), other)


@pytest.mark.slow
def test_vit_learns_digits(digits, tmp_path):
    pl.seed_everything(0)
    model = TinyViT()
    trainer = _trainer(tmp_path, max_epochs=10)
    trainer.fit(model, digits)
    accuracy = trainer.callback_metrics["val/acc"].item()
    print(f"TinyViT val/acc {accuracy:.4f}")
    assert accuracy > 0.7  # chance: 0.1
    assert {"train/loss", "val/loss", "val/acc"} <= set(trainer.callback_metrics)
    images, labels = next(iter(digits.val_dataloader()))
    assert model(images).logits.shape == (len(labels), 10)
