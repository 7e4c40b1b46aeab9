"""phi3v.distributed: messages once per job, one-line errors with their exit status."""

import pytest

from phi3v.distributed import is_main_process, print_once, rank_and_world_size, stop


def test_rank_from_torchrun_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert rank_and_world_size() == (3, 4) and not is_main_process()
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert rank_and_world_size() == (0, 1) and is_main_process()


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_print_once_and_stop(monkeypatch, capsys, rank, printed):
    monkeypatch.setenv("RANK", rank)
    print_once("hello")
    with pytest.raises(SystemExit) as exit_info:
        stop("--data_dir nowhere: no such folder", status=1)
    assert exit_info.value.code == 1  # every rank exits
    captured = capsys.readouterr()
    assert captured.out == ("hello\n" if printed else "")
    assert captured.err == ("error: --data_dir nowhere: no such folder\n" if printed else "")
