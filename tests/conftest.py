import os
import warnings

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
warnings.filterwarnings("ignore", ".*does not have many workers.*")


@pytest.fixture(scope="session")
def adult():
    """The bundled Adult datamodule, set up once per session (read-only: do not mutate its datasets)."""
    from lightning_trust.demo import AdultDataModule

    dm = AdultDataModule(batch_size=256)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="session")
def digits():
    from lightning_trust.demo import DigitsDataModule

    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    return dm


@pytest.fixture(autouse=True)
def _restore_global_torch_modes():
    """A Trainer(deterministic=True) run inside a test leaves torch's global determinism on; undo it."""
    import torch

    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
