import pytest


@pytest.fixture(autouse=True)
def _children_temp_dir(tmp_path, monkeypatch):
    """torchrun leaves a log directory (torchelastic_*) in the temporary directory of every launch: the
    processes a test starts (they copy this environment) put theirs in the test's own directory."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
