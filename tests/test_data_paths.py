"""How a --data argument that is not a file here is read: a path typo is named at once, with
the files it may have meant, and only a Hub-looking id with no local folder goes to the Hub."""

from __future__ import annotations

import json

import pytest

from adapterkit import DataFormatError
from adapterkit.training import data as data_mod


def test_a_mistyped_path_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "pc.jsonl").write_text('{"text": "x"}\n', encoding="utf-8")
    monkeypatch.chdir(tmp_path)

    def hub(dataset_id):
        raise AssertionError(f"asked the Hub for {dataset_id}")  # it retried for ~25 s

    monkeypatch.setattr(data_mod, "_read_hub", hub)
    with pytest.raises(DataFormatError, match=r"data file data/pc does not exist; did you mean "
                                              r"data/pc\.jsonl\?"):
        data_mod.read_rows("data/pc")


def test_a_hub_id_goes_to_the_hub_even_beside_a_folder_named_like_its_owner(tmp_path,
                                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "someone").mkdir()  # e.g. huggingface-cli download --local-dir someone/model
    asked = []
    monkeypatch.setattr(data_mod, "_read_hub", lambda i: asked.append(i) or [{"text": "x"}])
    rows, source, _ = data_mod.read_rows("someone/their-data")
    assert asked == ["someone/their-data"] and source == "hub:someone/their-data"


def test_a_line_that_is_not_json_says_skip_bad_rows_does_not_skip_it(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "fine"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"broken\.jsonl line 2: invalid JSON .*; fix the "
                                              r"line \(--skip-bad-rows skips rows of the wrong "
                                              r"shape, not lines that are not JSON\)"):
        data_mod.load_data(str(path), skip_bad_rows=True)


def test_a_missing_file_names_the_files_it_may_mean(tmp_path, monkeypatch):
    (tmp_path / "pc.jsonl").write_text('{"text": "x"}\n', encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    for given in ("pc", "pc.json"):  # beside it in the working folder; another suffix
        with pytest.raises(DataFormatError, match=rf"data file {given} does not exist; did you "
                                                  r"mean pc\.jsonl\?"):
            data_mod.read_rows(given)



def test_a_folder_is_read_as_one_dataset_or_refused_naming_its_files(tmp_path):
    """A folder was "does not exist", or "could not be loaded from the Hub"."""
    from adapterkit.training.data import load_data

    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(2):
        (shards / f"train-0000{i}.jsonl").write_text(
            "".join(json.dumps({"prompt": f"q{i}{j}", "completion": "a"}) + "\n"
                    for j in range(3)))
    data = load_data(str(shards))
    assert (data.shape, len(data.rows)) == ("prompt_completion", 6)
    assert sorted(r["prompt"] for r in data.rows) == ["q00", "q01", "q02", "q10", "q11", "q12"]
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "pairs_test.jsonl").write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n')
    with pytest.raises(DataFormatError, match=rf"data {mixed} is a folder that datasets cannot "
                                              rf"read as one dataset .*give one data file, e.g. "
                                              rf"{mixed / 'pairs_test.jsonl'}"):
        load_data(str(mixed))


def test_a_save_to_disk_folder_is_read_and_its_files_name_the_folder(tmp_path):
    """A ``save_to_disk`` folder was "a folder datasets cannot read", with the hint to give
    its dataset_info.json or state.json (metadata, refused in turn as "expected a JSON list of
    objects"); its .arrow file was an "unsupported data file"."""
    from datasets import Dataset, DatasetDict

    rows = [{"prompt": f"p{i}", "chosen": "c", "rejected": "r"} for i in range(3)]
    saved = tmp_path / "pairs_ds"
    Dataset.from_list(rows).save_to_disk(str(saved))
    data = data_mod.load_data(str(saved))
    assert (data.shape, data.rows) == ("preference", rows)
    splits = tmp_path / "pairs_dd"
    DatasetDict({"train": Dataset.from_list(rows),
                 "test": Dataset.from_list(rows[:1])}).save_to_disk(str(splits))
    assert data_mod.load_data(str(splits)).rows == rows  # its train split
    for inside in ["dataset_info.json", "state.json", *(p.name for p in saved.glob("*.arrow"))]:
        with pytest.raises(DataFormatError, match=rf"{inside} is part of a datasets save_to_disk "
                                                  rf"folder; give the folder itself: {saved}$"):
            data_mod.load_data(str(saved / inside))
    # a folder datasets cannot read is never answered with metadata files as its data files
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "state.json").write_text("{}")
    (mixed / "pairs_test.jsonl").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(DataFormatError, match=rf"give one data file, e.g. "
                                              rf"{mixed / 'pairs_test.jsonl'}$"):
        data_mod.load_data(str(mixed))


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".txt"])
def test_a_file_with_a_utf8_byte_order_mark_is_read(tmp_path, suffix):
    """What Windows tools write was refused: "invalid JSON (Unexpected UTF-8 BOM ...)"."""
    text = {".jsonl": '{"prompt": "p\\u00e9", "completion": "c"}\n',
            ".json": '[{"prompt": "p\\u00e9", "completion": "c"}]',
            ".csv": "prompt,completion\npé,c\n",
            ".txt": "pé c\n"}[suffix]
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    data = data_mod.load_data(str(path))
    expected = [{"text": "pé c"}] if suffix == ".txt" else [{"prompt": "pé", "completion": "c"}]
    assert data.rows == expected
    # a bad byte is still named by its offset in the file, the mark counted
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8") + b"\xff")
    if suffix != ".txt":
        with pytest.raises(DataFormatError, match=rf"byte 0xff at offset {3 + len(text.encode())}"):
            data_mod.load_data(str(path))


def test_unpaired_preferences_labelled_false_are_not_read_as_answers_to_learn(tmp_path):
    """TRL's KTO format (prompt/completion/label): `train sft` learnt the completions labelled
    false — answers NOT to give — as any other, since its rows keep no label."""
    import json

    from adapterkit import DataFormatError, load_data

    rows = [{"prompt": "Hi?", "completion": " Hello!", "label": True},
            {"prompt": "Hi?", "completion": " Go away.", "label": False}]
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataFormatError, match=r"has a label column, and row\(s\) 2 are labelled "
                                              r"false .* learnt as answers to give"):
        load_data(str(path))
    kept = tmp_path / "good.jsonl"  # every row labelled true: the answers to learn, read so
    kept.write_text(json.dumps(rows[0]) + "\n")
    assert load_data(str(kept)).rows == [{"prompt": "Hi?", "completion": " Hello!"}]
    classes = tmp_path / "classes.jsonl"  # a class index is no preference label
    classes.write_text(json.dumps({"text": "a", "label": 0}) + "\n")
    assert load_data(str(classes)).shape == "text"
