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
