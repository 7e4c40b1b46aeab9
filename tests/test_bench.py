"""The benchmark runs and measures what it claims (figures themselves belong in BENCHMARKS.md)."""

import json

import pytest
import torch

from phivision import bench


def test_padding_statistics_of_the_length_distributions():
    samples = bench.make_samples("docvqa", 200)
    mean = sum(len(s.input_ids) for s in samples) / len(samples)
    assert 1900 < mean < 2700  # DocVQA-like: about 2,400 tokens at num_crops 16
    grouped = bench.padding_fraction(bench.batches(samples, 4, grouped=True))
    assert grouped <= 0.05 < bench.padding_fraction(bench.batches(samples, 4, grouped=False))
    assert all(s.as_dict()["pixel_values"].shape[:2] == (2, 5) for s in bench.make_samples("nlvr2", 3))


def test_bench_rows_count_flops_against_the_useful_work(tmp_path, capsys):
    out = tmp_path / "rows.json"
    # At nlvr2's own 4 crops per image: at 2, the activations no longer outweigh what recomputing a checkpointed
    # layer holds in the backward pass, and the last assertion's claim would not hold.
    bench.main(["--size", "tiny", "--distribution", "nlvr2", "--modes", "full", "--batch_size", "2",
                "--steps", "1", "--num_samples", "6", "--peak_tflops", "1", "--json", str(out)])
    rows = {row["config"]: row for row in json.loads(out.read_text())}
    assert len(rows) == 5  # the mode's baseline, 2 batch-1 rows, 2 batched
    # Every row timed the same samples: the batch-1 rows one by one, the batched ones in one batch of 2.
    assert {(row["samples"], row["tokens"]) for row in rows.values()} == {
        (2, sum(len(s.input_ids) for s in bench.make_samples("nlvr2", 6)[:2]))}
    assert [len(row["step seconds"]) for row in rows.values()] == [2, 2, 2, 1, 1]
    # MFU counts the model's FLOPs, HFU also the recomputation of checkpointed layers.
    checkpointed, unchecked = rows["full b1"], rows["full b1 no checkpointing"]
    assert checkpointed["model TFLOP"] == unchecked["model TFLOP"] == unchecked["executed TFLOP"]
    assert checkpointed["executed TFLOP"] > 1.2 * checkpointed["model TFLOP"]
    assert checkpointed["hfu"] / checkpointed["mfu"] == pytest.approx(
        checkpointed["executed TFLOP"] / checkpointed["model TFLOP"])
    assert unchecked["mfu"] == unchecked["hfu"]
    assert checkpointed["mfu"] == pytest.approx(
        checkpointed["model TFLOP"] * 1e12 / sum(checkpointed["step seconds"]) / 1e12)
    assert checkpointed["peak_reserved_gb"] is None  # CPU: no allocator cache
    assert rows["full b1"]["exec/useful"] == 1.0  # nothing but the useful work
    assert rows["full baseline (reference)"]["exec/useful"] > 1.05  # padded crops + full logits
    assert rows["full baseline (reference)"]["logits MB"] > 10 * rows["full b1"]["logits MB"]
    assert rows["full b2 packed"]["padding"] == 0.0
    assert rows["full b2 packed"]["exec/useful"] < 1.02  # per-sample attention: no cross-sample work
    assert "full baseline (reference)" in capsys.readouterr().out
    assert rows["full b1"]["vs baseline"] == rows["full b1"]["samples_per_s"] / rows["full baseline (reference)"]["samples_per_s"]
    assert rows["full baseline (reference)"]["peak_allocated_gb"] > rows["full b1"]["peak_allocated_gb"] > 0  # full logits held at once
    # What auto checkpointing picks when memory allows: the same useful work, more activations held.
    assert rows["full b1 no checkpointing"]["exec/useful"] == 1.0
    assert rows["full b1 no checkpointing"]["peak_allocated_gb"] > rows["full b1"]["peak_allocated_gb"]


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A10", 125.0), ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.0),
    ("NVIDIA GeForce RTX 4090", 165.0), ("NVIDIA RTX A6000", 155.0), ("Tesla V100-SXM2-16GB", 125.0),
    ("Tesla V100-PCIE-16GB", 125.0), ("Tesla T4", 65.0), ("NVIDIA GB200", None)])
def test_peak_tflops_by_gpu_name(name, tflops):
    assert bench.peak_tflops(name) == tflops


@pytest.mark.parametrize("capability, dtype", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                               ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_the_bench_autocasts_to_fp16_where_bf16_is_only_emulated(monkeypatch, capability, dtype):
    """V100 (7.0) and T4 (7.5): torch.cuda.is_bf16_supported() says yes, but bf16 is emulated there."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert bench.autocast_dtype(torch.device("cuda")) == dtype
    assert bench.autocast_dtype(torch.device("cpu")) == torch.float32


def test_peak_tensor_memory_counts_each_live_storage_once():
    weights = torch.zeros(250_000)  # 1 MB, there before the block
    with bench.PeakTensorMemory([weights, weights[10:]]) as memory:
        assert memory.peak == 1_000_000
        a = torch.ones(500_000)  # +2 MB
        b = a * 2  # +2 MB: 5 MB live
        view = b[1:]  # no new storage
        del a, b, view
        c = torch.ones(750_000)  # +3 MB after 4 MB were freed: 4 MB live
        del c
        total = weights.requires_grad_().exp().sum()  # exp's output: no name, kept alive by autograd
        d = torch.ones(1_250_000)  # +5 MB: 7 MB live
        del d
        total.backward()  # gradients: 3 MB at most
    assert memory.peak == pytest.approx(7_000_000, abs=64)


@pytest.mark.parametrize("distribution", ["memes"])
def test_bench_runs_every_training_mode_with_mfu(tmp_path, distribution):
    """The modes the GPU table needs, QLoRA's 4-bit load included (bitsandbytes runs on CPU too). At 1 crop per
    image, not the distribution's 16: the rows are the same, and CLIP's work and the sequences far shorter (193 s
    at 16 on 2 cores; at 4, twice the time of 1)."""
    out = tmp_path / "rows.json"
    bench.main(["--size", "tiny", "--distribution", distribution, "--num_crops", "1", "--modes", "frozen", "lora",
                "qlora", "--no_baseline", "--batch_size", "2", "--steps", "1", "--num_samples", "4",
                "--peak_tflops", "1", "--json", str(out)])
    rows = {row["config"]: row for row in json.loads(out.read_text())}
    assert len(rows) == 13
    cached = rows["frozen b1 cached features"]  # epoch 2 on: the frozen tower's output read, not computed
    assert cached["exec/useful"] == 1.0
    assert cached["peak_allocated_gb"] < rows["frozen b1 no checkpointing"]["peak_allocated_gb"]
    for mode in ["frozen", "lora", "qlora"]:
        assert rows[f"{mode} b1"]["exec/useful"] == 1.0
        assert 0 < rows[f"{mode} b1"]["mfu"] < 1 and rows[f"{mode} b1"]["peak_allocated_gb"] > 0


def test_each_mode_is_timed_against_the_reference_in_the_same_mode(tmp_path):
    """Frozen vision against the reference's frozen-vision step (no CLIP backward), not full fine-tuning's; batch 1
    only, at the crops asked (2, not docvqa's 16: a global crop and one HD crop per image in 3 slots, the reference
    running the empty one too; a fifth of the tokens)."""
    out = tmp_path / "rows.json"
    bench.main(["--size", "tiny", "--distribution", "docvqa", "--num_crops", "2", "--modes", "full", "frozen",
                "--batch_size", "1", "--steps", "1", "--num_samples", "3", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [row["config"] for row in rows] == [
        "full baseline (reference)", "full b1", "full b1 no checkpointing",
        "frozen baseline (reference)", "frozen b1", "frozen b1 no checkpointing", "frozen b1 cached features"]
    rows = {row["config"]: row for row in rows}
    for mode in ["full", "frozen"]:
        baseline = rows[f"{mode} baseline (reference)"]
        assert baseline["vs baseline"] == 1.0 and baseline["exec/useful"] > 1.05  # all of CLIP, every slot, logits
        assert rows[f"{mode} b1"]["vs baseline"] == rows[f"{mode} b1"]["samples_per_s"] / baseline["samples_per_s"]
    assert {s.as_dict()["pixel_values"].shape[1] for s in bench.make_samples("docvqa", 3, num_crops=2)} == {3}


def test_the_compiled_row_times_the_model_under_torch_compile(tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    out = tmp_path / "rows.json"
    # 1 crop per image (nlvr2's own is 4): what is compiled is the same model, on half the tokens.
    bench.main(["--size", "tiny", "--distribution", "nlvr2", "--num_crops", "1", "--modes", "lora", "--batch_size", "1",
                "--no_baseline", "--torch_compile_backend", "eager", "--steps", "2", "--num_samples", "3",
                "--json", str(out)])
    rows = {row["config"]: row for row in json.loads(out.read_text())}
    compiled = rows["lora b1 no checkpointing compiled"]
    assert compiled["exec/useful"] == 1.0 and compiled["samples_per_s"] > 0 and len(compiled["step seconds"]) == 2
    assert counters["stats"]["unique_graphs"] > 0  # dynamo traced the model's forward
    torch._dynamo.reset()


def test_a_configuration_out_of_memory_is_reported_and_the_rest_still_run(tmp_path, monkeypatch, capsys):
    run_config = bench.run_config

    def full_size_on_a_small_gpu(row, *args):
        if "padded" in row.name:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return run_config(row, *args)

    monkeypatch.setattr(bench, "run_config", full_size_on_a_small_gpu)
    out = tmp_path / "rows.json"
    bench.main(["--size", "tiny", "--distribution", "nlvr2", "--num_crops", "1", "--modes", "full", "--no_baseline",
                "--batch_size", "2", "--steps", "1", "--num_samples", "4", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [row["config"] for row in rows] == ["full b1", "full b1 no checkpointing", "full b2 padded+grouped",
                                               "full b2 packed"]
    assert rows[2] == {"config": "full b2 padded+grouped", "distribution": "nlvr2", "error": "out of memory on cpu"}
    assert rows[0]["samples_per_s"] > 0 and rows[3]["samples_per_s"] > 0 and "out of memory on cpu" in capsys.readouterr().out


def test_full_size_is_the_shipped_hub_config(reference_dir):
    """The bench's full size needs no file outside the package, and is Phi-3.5-vision-instruct's config."""
    import json

    import torch

    from phivision.phi3v.modeling import Phi3VForCausalLM

    config = bench.make_config("full")
    hub = json.loads((reference_dir / "phi35v_hub_files" / "config.json").read_text())
    from phivision.families import CONFIGS, known_families

    assert json.loads((CONFIGS / known_families()["phi3_v"].full_config).read_text()) == hub
    with torch.device("meta"):
        model = Phi3VForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == 4_146_621_440
    assert config.rope_parameters["rope_type"] == "longrope"
