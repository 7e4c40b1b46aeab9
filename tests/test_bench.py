"""The benchmark runs and measures what it claims (figures themselves belong in BENCHMARKS.md)."""

import json

from phi3v import bench


def test_padding_statistics_of_the_length_distributions():
    samples = bench.make_samples("docvqa", 200)
    mean = sum(len(s.input_ids) for s in samples) / len(samples)
    assert 1900 < mean < 2700  # DocVQA-like: about 2,400 tokens at num_crops 16
    grouped = bench.padding_fraction(bench.batches(samples, 4, grouped=True))
    assert grouped <= 0.05 < bench.padding_fraction(bench.batches(samples, 4, grouped=False))
    assert all(s.as_dict()["pixel_values"].shape[:2] == (2, 5) for s in bench.make_samples("nlvr2", 3))


def test_bench_rows_count_flops_against_the_useful_work(tmp_path, capsys):
    out = tmp_path / "rows.json"
    bench.main(["--size", "tiny", "--distribution", "nlvr2", "--modes", "full", "--batch_size", "2",
                "--steps", "1", "--num_samples", "6", "--json", str(out)])
    rows = {row["config"]: row for row in json.loads(out.read_text())}
    assert rows["full b1"]["exec/useful"] == 1.0  # nothing but the useful work
    assert rows["baseline (reference)"]["exec/useful"] > 1.05  # padded crops + full logits
    assert rows["baseline (reference)"]["logits MB"] > 10 * rows["full b1"]["logits MB"]
    assert rows["full b2 packed"]["padding"] == 0.0
    assert rows["full b2 packed"]["exec/useful"] < 1.02  # per-sample attention: no cross-sample work
    assert "vs baseline" in rows["full b1"] and "baseline (reference)" in capsys.readouterr().out
