"""phivision.distributed: messages once per job, one-line errors with their exit status."""

import pytest

from phivision.distributed import is_main_process, print_once, rank_and_world_size, stop


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


LOADS = """
import json, os, sys, time
import torch.distributed as dist
import phivision.data.hub as hub

dist.init_process_group("gloo")
load = hub._load
def logged_load(*args):
    with open(sys.argv[2], "a") as log:
        log.write(json.dumps([dist.get_rank(), "start", time.time()]) + "\\n")
    time.sleep(1)  # a download
    rows = load(*args)
    with open(sys.argv[2], "a") as log:
        log.write(json.dumps([dist.get_rank(), "end", time.time()]) + "\\n")
    return rows
hub._load = logged_load
assert len(hub.load_hf_dataset(sys.argv[1])) == 4
dist.destroy_process_group()
"""


def test_one_process_per_node_loads_a_dataset_first_the_others_after(tmp_path):
    import json

    import datasets
    from forked import forked_run

    datasets.Dataset.from_dict({"x": [1, 2, 3, 4]}).save_to_disk(str(tmp_path / "data"))
    (tmp_path / "loads.py").write_text(LOADS)
    log = tmp_path / "log.jsonl"
    # Two ranks with torchrun's environment, forked from a process that has imported the libraries (tests/forked.py).
    result = forked_run(tmp_path / "loads.py", [tmp_path / "data", log], nproc=2, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(rank, what) for rank, what, _ in sorted(events, key=lambda e: e[2])] == [
        (0, "start"), (0, "end"), (1, "start"), (1, "end")]  # rank 1 waited for rank 0's load
