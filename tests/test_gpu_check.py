"""phi3v.gpu_check: its plan and its commands' flags are checked on CPU, before it ever runs on a GPU."""

import shlex

from phi3v import gpu_check


def test_dry_run_lists_every_mode_with_flags_that_parse(tmp_path, capsys):
    assert gpu_check.main(["--dry-run", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in ("full ZeRO-2 bf16", "full ZeRO-2 fp16", "frozen vision bf16 packed", "full ZeRO-3 bf16",
                 "full FSDP2 bf16", "LoRA bf16 packed",
                 "LoRA resumed", "QLoRA bf16", "bench full size", "bench full-CLIP size"):
        assert f"{name}: flags parse" in out
    assert "optional packages: flash_attn " in out
    commands = [shlex.split(line.strip()) for line in out.splitlines() if line.startswith("  ")]
    assert all("--nproc_per_node=1" in c for c in commands if "torch.distributed.run" in c)
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


def test_a_flag_typo_in_the_plan_is_caught(tmp_path, monkeypatch, capsys):
    plan = gpu_check.plan

    def typo(workdir, nproc):
        checks = plan(workdir, nproc)
        checks[0].command.append("--batchsize")
        return checks

    monkeypatch.setattr(gpu_check, "plan", typo)
    assert gpu_check.main(["--dry-run", "--workdir", str(tmp_path)]) == 1
    assert "full ZeRO-2 bf16: unknown flags ['--batchsize']" in capsys.readouterr().out


def test_a_bad_bench_flag_in_the_plan_is_caught(tmp_path, monkeypatch, capsys):
    plan = gpu_check.plan

    def typos(workdir, nproc):
        checks = plan(workdir, nproc)
        benches = [c for c in checks if c.name.startswith("bench")]
        benches[0].command += ["--stesp", "3"]
        benches[1].command += ["--size", "huge"]
        return checks

    monkeypatch.setattr(gpu_check, "plan", typos)
    assert gpu_check.main(["--dry-run", "--workdir", str(tmp_path)]) == 1
    out = capsys.readouterr()
    assert "bench full size: unknown flags ['--stesp', '3']" in out.out
    assert "bench full-CLIP size: a flag's value does not parse" in out.out and "invalid choice: 'huge'" in out.err


def test_each_check_ends_as_pass_fail_or_skipped():
    import sys

    ok = gpu_check.Check("ok", [sys.executable, "-c", "print('Resuming from checkpoint-2')"], expect="Resuming from")
    wrong = gpu_check.Check("wrong", [sys.executable, "-c", "print('trained from scratch')"], expect="Resuming from")
    crash = gpu_check.Check("crash", [sys.executable, "-c", "raise SystemExit('error: out of memory')"])
    missing = gpu_check.Check("missing", [sys.executable, "-c", "pass"], needs=("no_such_package_here",))
    for check in (ok, wrong, crash, missing):
        gpu_check.run_check(check)
    assert ok.result.startswith("pass")
    assert wrong.result.startswith("FAIL") and "trained from scratch" in wrong.result
    assert crash.result.startswith("FAIL") and "error: out of memory" in crash.result
    assert missing.result == "skipped (no_such_package_here missing)"
