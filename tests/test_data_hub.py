"""phivision.data.hub: Hub datasets' local copies (save_to_disk folders, parquet files by split)."""

import pytest
from PIL import Image

from phivision.data import DatasetError, load_hf_dataset


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """Keeps the parquet builder's cache inside tmp_path."""
    import datasets

    cache = tmp_path / "hf_datasets_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def test_load_hf_dataset_from_save_to_disk(tmp_path):
    from phivision.synthetic import make_shapes_dataset

    path = make_shapes_dataset(tmp_path / "shapes", num_train=2, num_eval=1)
    rows = load_hf_dataset(str(path))
    assert len(rows) == 3
    row = rows[0]
    assert isinstance(row["images"][0], Image.Image)
    assert row["texts"][0]["assistant"] in {"red", "green", "blue"}
    assert load_hf_dataset(str(path), split="train")[2]["texts"] == rows[2]["texts"]
    with pytest.raises(DatasetError, match=r"\['train'\]") as error:
        load_hf_dataset(str(path), split="test")
    assert "'test'" in str(error.value)


def test_load_hf_dataset_from_parquet_files(tmp_path, datasets_cache):
    import datasets

    folder = tmp_path / "parquet"
    (folder / "data").mkdir(parents=True)
    datasets.Dataset.from_dict({"query": ["q1", "q2", "q3"], "answer": ["a1", "a2", "a3"]}).to_parquet(
        str(folder / "data" / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_dict({"query": ["t1", "t2"], "answer": ["b1", "b2"]}).to_parquet(
        str(folder / "data" / "test-00000-of-00001.parquet"))

    train = load_hf_dataset(str(folder), split="train")
    test = load_hf_dataset(str(folder), split="test")
    assert list(train["query"]) == ["q1", "q2", "q3"]
    assert list(test["query"]) == ["t1", "t2"] and list(test["answer"]) == ["b1", "b2"]
    with pytest.raises(DatasetError, match="'validation'"):
        load_hf_dataset(str(folder), split="validation")


def test_load_hf_dataset_single_parquet_split_and_empty_folder(tmp_path, datasets_cache):
    import datasets

    single = tmp_path / "single"
    single.mkdir()
    datasets.Dataset.from_dict({"x": [1, 2]}).to_parquet(str(single / "part.parquet"))
    assert list(load_hf_dataset(str(single))["x"]) == [1, 2]  # any *.parquet is the train split

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no parquet files"):
        load_hf_dataset(str(empty))
    with pytest.raises(DatasetError):
        load_hf_dataset(str(empty), split="test")


def test_load_hf_dataset_never_passes_another_split_off_as_train(tmp_path, datasets_cache):
    """Eval data must not become training data because no train file exists."""
    import datasets

    folder = tmp_path / "eval_only"
    folder.mkdir()
    datasets.Dataset.from_dict({"x": [1]}).to_parquet(str(folder / "validation-00000-of-00001.parquet"))
    datasets.Dataset.from_dict({"x": [2]}).to_parquet(str(folder / "test-00000-of-00001.parquet"))
    with pytest.raises(DatasetError, match=r"'test', 'validation'"):
        load_hf_dataset(str(folder), split="train")
    assert list(load_hf_dataset(str(folder), split="test")["x"]) == [2]

    single = tmp_path / "single"
    datasets.Dataset.from_dict({"x": [3]}).save_to_disk(str(single))
    assert list(load_hf_dataset(str(single))["x"]) == [3]  # a lone Dataset is the train split...
    with pytest.raises(DatasetError, match="not 'test'"):  # ...and has no other split
        load_hf_dataset(str(single), split="test")
