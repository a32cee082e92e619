import os
import warnings

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n auto` runs one worker per core: one intra-op thread each, or the workers oversubscribe the cores
    # (a test that measures threads sets its own, as the QAT latency does).
    import torch

    torch.set_num_threads(1)
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
    """A Trainer(deterministic=True) run leaves torch's global determinism on, also one in a module- or
    session-scoped fixture: every test starts from, and leaves, the modes the session started with."""
    import torch

    torch.use_deterministic_algorithms(_SESSION_DETERMINISM[0], warn_only=_SESSION_DETERMINISM[1])
    yield
    torch.use_deterministic_algorithms(_SESSION_DETERMINISM[0], warn_only=_SESSION_DETERMINISM[1])


def _session_determinism() -> tuple[bool, bool]:
    import torch

    return torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()


_SESSION_DETERMINISM = _session_determinism()
