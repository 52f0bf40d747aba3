"""The dequantised model cache: written aside and renamed, so that a killed or concurrent first load leaves it whole."""

import pytest

from fastsae.model.loading import _write_cache


def _write_config(text):
    return lambda folder: (folder / "config.json").write_text(text)


def test_the_model_cache_is_written_whole_and_a_second_writer_keeps_the_first(tmp_path):
    cached = tmp_path / "cache" / "model"
    _write_cache(cached, _write_config("first"))
    assert (cached / "config.json").read_text() == "first"
    _write_cache(cached, _write_config("second"))  # the race: another process renamed its copy first
    assert (cached / "config.json").read_text() == "first"
    assert [p.name for p in cached.parent.iterdir()] == ["model"]  # no folder left aside


def test_a_failed_model_cache_write_raises_and_leaves_nothing(tmp_path):
    def fails(folder):
        (folder / "config.json").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _write_cache(tmp_path / "model", fails)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "model").mkdir()  # a folder in place without config.json is no finished cache: the error stands
    (tmp_path / "model" / "stray").write_text("x")
    with pytest.raises(OSError):
        _write_cache(tmp_path / "model", _write_config("new"))
