"""fastsae asks PyTorch for transparent huge pages on large CPU tensors (fastsae/_hugepages.py) unless the
user chose, or the kernel has them off."""

import os
import subprocess
import sys

import pytest

from fastsae import _hugepages


@pytest.fixture
def no_choice(monkeypatch):
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)


@pytest.mark.parametrize("mode, expected", [("always [madvise] never\n", "1"), ("[always] madvise never\n", "1"),
                                            ("always madvise [never]\n", None)])
def test_follows_the_kernels_setting(tmp_path, monkeypatch, no_choice, mode, expected):
    setting = tmp_path / "enabled"
    setting.write_text(mode)
    monkeypatch.setattr(_hugepages, "_SETTING", str(setting))
    _hugepages.enable()
    assert os.environ.get("THP_MEM_ALLOC_ENABLE") == expected


def test_no_thp_in_the_kernel_sets_nothing(tmp_path, monkeypatch, no_choice):
    monkeypatch.setattr(_hugepages, "_SETTING", str(tmp_path / "absent"))
    _hugepages.enable()
    assert "THP_MEM_ALLOC_ENABLE" not in os.environ


def test_the_users_choice_wins(tmp_path, monkeypatch):
    setting = tmp_path / "enabled"
    setting.write_text("[always] madvise never\n")
    monkeypatch.setattr(_hugepages, "_SETTING", str(setting))
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    _hugepages.enable()
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"


def test_large_tensors_get_huge_pages():
    # PyTorch reads the variable once, at its first large allocation: importing fastsae must set it before
    # torch allocates, and a 64 MB tensor is then backed by 2 MB pages (where the kernel offers THP).
    try:
        with open(_hugepages._SETTING) as f:
            if "[never]" in f.read():
                pytest.skip("transparent huge pages are off in this kernel")
    except OSError:
        pytest.skip("no transparent huge pages here")
    code = ("import os, fastsae, torch; t = torch.ones(16 << 20); "
            "print(os.environ['THP_MEM_ALLOC_ENABLE'], "
            "[int(line.split()[1]) for line in open('/proc/self/smaps_rollup') if line.startswith('AnonHuge')][0])")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    flag, huge_kb = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                   check=True).stdout.split()
    assert flag == "1"
    assert int(huge_kb) >= 2048  # at least one 2 MB page (all 32 when memory is not fragmented)
