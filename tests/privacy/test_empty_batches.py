"""Empty Poisson batches are noise-only steps (Opacus's semantics) in every grad_sample_mode, for
tuple, dict, Hugging Face keyword and bare-tensor batches, the first batch of a fit included."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.demos.boring_classes import BoringModel
from opacus.accountants import RDPAccountant
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate

from lightning_trust.privacy import DifferentialPrivacy
from lightning_trust.privacy.empty import EmptyDrawCollate, is_empty
from lightning_trust.privacy.hooks import GRAD_SAMPLE_MODES
from tests.privacy.helpers import TinyModule, tiny_data, trainer

MODES = [m for m in GRAD_SAMPLE_MODES if m != "auto"]
SIGMA, LR = 1.3, 0.5
# torch.manual_seed(SEED) right before fit: the first six Poisson draws at q = 1/N (batch size 1)
SEED_32, SIZES_32 = 10, [0, 2, 2, 0, 2, 2]  # N = 32
SEED_64, SIZES_64 = 1, [0, 0, 1, 0, 2, 1]  # N = 64 (BoringModel's own loader, whose dataset draws from the RNG)


class NoiseOnly(pl.Callback):
    """For each batch: its size; for an empty one, the parameters before the step and the global
    RNG state the DP optimizer draws its noise from (to replay the noise exactly)."""

    def __init__(self, check: bool = True) -> None:
        self.check = check
        self.sizes: list[int] = []
        self.checked = 0
        self._pending: Any = None
        self._empty = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._empty = is_empty(batch)
        rows = [t.shape[0] for t in _tensors(batch)]
        self.sizes.append(max(rows) if rows else 0)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        if self._empty and self.check:  # runs after DifferentialPrivacy's hook, right before Opacus adds the noise
            self._pending = (
                [(p, p.detach().clone()) for p in optimizer.params],
                torch.get_rng_state(),
                optimizer.noise_multiplier * optimizer.max_grad_norm,
                optimizer.expected_batch_size,
            )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._pending is None:
            return
        params, state, std, expected = self._pending
        self._pending = None
        replay = torch.Generator().set_state(state)
        for p, before in params:
            noise = torch.normal(0.0, std, size=p.shape, generator=replay, dtype=p.dtype)
            torch.testing.assert_close(p.detach(), before - LR * noise / expected, rtol=1e-5, atol=1e-7)
        self.checked += 1


def _tensors(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    values = batch.values() if isinstance(batch, dict) else batch
    return [t for t in values if isinstance(t, torch.Tensor) and t.dim() >= 1]


class SGDModule(TinyModule):
    def __init__(self) -> None:
        super().__init__(hidden=3, lr=LR)


class DictRows(Dataset):
    def __init__(self, n: int) -> None:
        self.data = tiny_data(n)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = self.data[i]
        return {"x": x, "y": y}


class DictModule(SGDModule):
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        assert set(batch) == {"x", "y"}  # the user's structure, also for an empty draw
        return super().training_step((batch["x"], batch["y"]), batch_idx)


class Loader(pl.LightningDataModule):
    def __init__(self, dataset: Dataset) -> None:
        super().__init__()
        self.dataset = dataset

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=1, shuffle=True)


class HFKeywords(pl.LightningModule):
    """A Hugging Face classifier called with keyword inputs (PEFT LoRA on a tiny BERT), plain SGD."""

    def __init__(self) -> None:
        super().__init__()
        from tests.foundation.models import _bert_lora

        self.model = _bert_lora()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=LR)


class Boring(BoringModel):
    """Lightning's BoringModel (bare-tensor batches of RandomDataset(32, 64), batch size 1), SGD at LR."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


def _build(kind: str) -> tuple[pl.LightningModule, Any]:
    torch.manual_seed(0)
    if kind == "tuple":
        return SGDModule(), Loader(tiny_data(32))
    if kind == "dict":
        return DictModule(), Loader(DictRows(32))
    if kind == "hf_kwargs":
        from tests.foundation.models import TokenDataset

        return HFKeywords(), Loader(TokenDataset(32, 0))
    return Boring(), None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["tuple", "dict", "hf_kwargs", "bare_tensor"])
def test_an_empty_batch_is_a_noise_only_step(tmp_path, kind, mode):
    module, data = _build(kind)
    recorder = NoiseOnly()
    dp = DifferentialPrivacy(noise_multiplier=SIGMA, target_delta=1e-3, accountant="rdp", grad_sample_mode=mode)
    t = trainer(tmp_path, max_steps=6, callbacks=[dp, recorder])
    torch.manual_seed(SEED_64 if kind == "bare_tensor" else SEED_32)
    t.fit(module, datamodule=data) if data is not None else t.fit(module)
    expected_sizes = SIZES_64 if kind == "bare_tensor" else SIZES_32
    assert recorder.sizes == expected_sizes  # the first draw is empty, and another one later
    assert recorder.checked == expected_sizes.count(0)  # each moved the parameters by exactly the noise
    q = 1 / (64 if kind == "bare_tensor" else 32)
    assert dp.steps == 6 == t.global_step and dp._empty.skipped == expected_sizes.count(0)
    reference = RDPAccountant()
    reference.history = [(SIGMA, q, 6)]
    assert dp._accountant.history == reference.history
    assert dp.epsilon_spent == pytest.approx(reference.get_epsilon(delta=1e-3), abs=1e-12)
    assert "training_step" not in vars(module) and "backward" not in vars(module)  # the user's methods are back


def test_an_empty_logical_batch_under_gradient_accumulation(tmp_path):
    recorder = NoiseOnly(check=False)
    dp = DifferentialPrivacy(noise_multiplier=SIGMA, target_delta=1e-3, accountant="rdp")
    t = trainer(tmp_path, max_epochs=1, limit_train_batches=8, accumulate_grad_batches=2, callbacks=[dp, recorder])
    module = SGDModule()
    torch.manual_seed(5)
    t.fit(module, Loader(tiny_data(32)))
    assert recorder.sizes[:2] == [0, 0]  # the first logical batch (two accumulated parts) is empty
    assert dp.steps == 4 == t.global_step and dp._accountant.history == [(SIGMA, 1 / 16, 4)]
    assert all(torch.isfinite(p).all() for p in t.lightning_module.parameters())


def test_empty_physical_batches_under_virtual_batching(tmp_path):
    recorder = NoiseOnly(check=False)
    dp = DifferentialPrivacy(noise_multiplier=SIGMA, target_delta=1e-3, accountant="rdp", max_physical_batch_size=1)
    t = trainer(tmp_path, max_steps=12, callbacks=[dp, recorder])  # 4 physical batches per logical batch
    module = SGDModule()
    torch.manual_seed(SEED_32)
    t.fit(module, Loader(tiny_data(32)))
    assert dp._opacus.physical_parts == 4 and recorder.sizes.count(0) >= 6
    assert dp.steps == 3 and dp._accountant.history == [(SIGMA, 1 / 32, 3)]
    assert all(torch.isfinite(p).all() for p in t.lightning_module.parameters())


def test_an_empty_batch_with_manual_optimization_steps_once(tmp_path):
    class Manual(SGDModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch: Any, batch_idx: int) -> None:
            optimizer = self.optimizers()
            optimizer.zero_grad()
            x, y = batch
            self.manual_backward(F.cross_entropy(self(x), y))
            optimizer.step()

    recorder = NoiseOnly()
    dp = DifferentialPrivacy(noise_multiplier=SIGMA, target_delta=1e-3, accountant="rdp")
    t = trainer(tmp_path, max_steps=6, callbacks=[dp, recorder])
    module = Manual()
    torch.manual_seed(3)
    t.fit(module, Loader(tiny_data(32)))
    assert recorder.sizes == [0, 2, 1, 1, 1, 0] and recorder.checked == 2 and dp.steps == 6


def test_the_empty_draw_keeps_the_users_collated_structure():
    def tagged(samples: list[Any]) -> Any:
        x, y = default_collate(samples)
        return {"features": x, "target": y, "tag": "custom"}

    collate = EmptyDrawCollate(tagged, TensorDataset(torch.randn(4, 3), torch.arange(4)))
    empty = collate([])
    assert set(empty) == {"features", "target", "tag"} and empty["tag"] == "custom"
    assert empty["features"].shape == (0, 3) and empty["target"].dtype == torch.long and is_empty(empty)
    assert not is_empty(collate([(torch.ones(3), torch.tensor(1))]))
