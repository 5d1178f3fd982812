"""The bundled default dataset is what its generator writes, and the generator scales."""

import gzip
import json

from tfp_kernels.data import DEFAULT_SFT, load_default
from tfp_kernels.data.make_sft import TOPICS, make_records, write_jsonl
from tfp_kernels.text import detect_format


def test_bundled_file_is_the_generators_output(tmp_path):
    path = str(tmp_path / "sft.jsonl.gz")
    write_jsonl(make_records(), path)
    with open(path, "rb") as a, open(DEFAULT_SFT, "rb") as b:
        assert a.read() == b.read()  # same bytes: seeded, no time stamp in the gzip header


def test_bundled_records():
    records = load_default()
    assert len(records) == 4000 and detect_format(records) == "alpaca"
    assert {r["topic"] for r in records} == set(TOPICS)
    assert all(r["instruction"] and r["output"] for r in records)
    # planted near-duplicates: another record's instruction with a small edit, same answer

    def normal(text):
        text = text.lower().replace("please ", "").replace(" thanks!", "").replace("  ", " ")
        return text.rstrip(".?")

    seen, near_dups = {}, 0
    for r in records:
        key = (normal(r["instruction"]), r["output"])
        near_dups += key in seen and seen[key] != r["instruction"]
        seen.setdefault(key, r["instruction"])
    assert 0.03 * len(records) < near_dups < 0.07 * len(records)


def test_generator_plain_jsonl_and_other_sizes(tmp_path):
    path = tmp_path / "big.jsonl"
    write_jsonl(make_records(1000, seed=1), str(path))
    lines = path.read_text().splitlines()
    assert len(lines) == 1000 and json.loads(lines[0]).keys() == {"instruction", "input", "output", "topic"}
    assert make_records(50, seed=1) == make_records(1000, seed=1)[:50]
    with gzip.open(DEFAULT_SFT, "rt") as f:
        assert sum(1 for _ in f) == 4000
