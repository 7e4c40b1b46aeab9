"""slurm/finetune.sbatch: one torchrun per node, meeting at the job's first node through c10d rendezvous."""

import os
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sbatch_script_starts_one_torchrun_per_node_with_c10d_rendezvous(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # Stand-ins for SLURM's commands: the job's nodes, and an srun that records what it would run.
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-017\\ngpu-018\\n'\n")
    (bin_dir / "srun").write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path / 'srun.txt'}\n"
                                  f"env | grep ^HF_ >> {tmp_path / 'env.txt'}\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "USER": "me", "SLURM_JOB_NODELIST": "gpu-[017-018]",
           "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "4"}
    subprocess.run(["bash", str(ROOT / "slurm" / "finetune.sbatch"), "finetune_hf_trainer_docvqa.py", "--output_dir",
                    "/shared/run one", "--bf16"], check=True, env=env, cwd=tmp_path)
    command = (tmp_path / "srun.txt").read_text().splitlines()
    assert shlex.join(command) == shlex.join([
        "--kill-on-bad-exit=1", "torchrun", "--nnodes=2", "--nproc_per_node=4", "--rdzv_backend", "c10d",
        "--rdzv_endpoint", "gpu-017:29500", "--rdzv_id", "4242", "finetune_hf_trainer_docvqa.py", "--output_dir",
        "/shared/run one", "--bf16"])
    assert {"HF_HOME=/tmp/me/huggingface", "HF_DATASETS_CACHE=/tmp/me/huggingface/datasets"} <= set(
        (tmp_path / "env.txt").read_text().splitlines())


def test_sbatch_script_without_a_recipe_says_how_to_call_it(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "slurm" / "finetune.sbatch")], capture_output=True, text=True,
                            env={"PATH": os.environ["PATH"]}, cwd=tmp_path)
    assert result.returncode != 0 and "usage: sbatch [--nodes=N] slurm/finetune.sbatch RECIPE.py" in result.stderr
