import pytest
from semiseg.data import make_synthetic


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    "A small embedded benchmark (48 train / 16 val scenes) shared by the tests."
    return make_synthetic(tmp_path_factory.mktemp("data"), n_train=48, n_val=16, seed=0)
