"""tests/forked.py, the launcher that forks the suite's two-rank runs: the environment torchrun gives, the output and
exit status subprocess.run gives, and a failed rank ending the run, as torchrun does."""

import json
import subprocess
import sys
import time

from forked import forked_launch, forked_run, torchrun_environment

SHOW = """
import json, os, pathlib, sys
folder = pathlib.Path(sys.argv[1])
(folder / (os.environ["RANK"] + ".json")).write_text(json.dumps({"argv": sys.argv[2:], "cwd": os.getcwd(),
                                                                 "env": dict(os.environ)}))
print("to stdout")
print("to stderr", file=sys.stderr)
"""


def seen_by_each_rank(folder) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]


def test_each_rank_gets_the_variables_torchrun_gives_its_workers(tmp_path):
    script, real, forked = tmp_path / "show.py", tmp_path / "real", tmp_path / "forked"
    script.write_text(SHOW)
    real.mkdir()
    forked.mkdir()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(script), str(real)], capture_output=True, text=True, timeout=120, check=True)
    result = forked_run(script, [forked, "a", 1], nproc=2, cwd=tmp_path, env={"EXTRA": "x"})
    assert result.returncode == 0 and result.stdout.count("to stdout") == result.stderr.count("to stderr") == 2
    ours = seen_by_each_rank(forked)
    assert all(rank["argv"] == ["a", "1"] and rank["cwd"] == str(tmp_path) and rank["env"]["EXTRA"] == "x"
               for rank in ours)
    workers = seen_by_each_rank(real)
    assert [rank["env"]["RANK"] for rank in ours] == [worker["env"]["RANK"] for worker in workers] == ["0", "1"]
    for worker, rank in zip(workers, ours, strict=True):
        for key in torchrun_environment(0, 2, 0):
            if key not in ("MASTER_PORT", "TORCHELASTIC_RUN_ID"):
                assert rank["env"][key] == worker["env"][key], key


def test_a_failed_rank_stops_the_others_and_gives_its_exit_status(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import os, sys, time\nif os.environ['RANK'] == '1':\n    sys.exit(3)\ntime.sleep(300)\n")
    start = time.time()
    result = forked_run(script, [], nproc=2)
    assert result.returncode == 3 and time.time() - start < 60


def test_a_traceback_is_printed_and_the_run_fails(tmp_path):
    script = tmp_path / "raise.py"
    script.write_text("raise ValueError('bad input')\n")
    result = forked_run(script, [], nproc=None)
    assert result.returncode == 1 and "ValueError: bad input" in result.stderr


def test_pythonpath_comes_first_and_its_sitecustomize_runs_as_at_interpreter_start(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import builtins\nbuiltins.CUSTOMIZED = True\n")
    (site / "helper_module.py").write_text("WHERE = 'site'\n")
    script = tmp_path / "show.py"
    script.write_text("import sys, helper_module\nprint(CUSTOMIZED, helper_module.WHERE, sys.path[0])\n")
    result = forked_run(script, [], nproc=None, env={"PYTHONPATH": str(site)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "site", str(tmp_path)]


def test_a_run_left_running_by_a_failed_test_is_killed_before_the_next_one(tmp_path):
    (tmp_path / "sleep.py").write_text("import time\ntime.sleep(300)\n")
    (tmp_path / "quick.py").write_text("print('next')\n")
    left = forked_launch(tmp_path / "sleep.py", [], nproc=2)
    assert left.poll() is None
    start = time.time()
    result = forked_run(tmp_path / "quick.py", [], nproc=None)
    assert result.returncode == 0 and result.stdout == "next\n" and time.time() - start < 30
    assert left.returncode == -9
