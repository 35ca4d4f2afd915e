"""`python -m mswa.bench data` at a small size: every loader step timed, the table printed, the JSON written."""

import json

from mswa.bench.cli import main


def test_data_benchmark_times_every_loader_step_and_writes_json(tmp_path, capsys):
    out = tmp_path / "data.json"
    main(["data", "--enwik8-bytes", "20000", "--wikitext-words", "20000", "--no-hf", "--workdir", str(tmp_path), "--output", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [row["step"] for row in rows] == [
        "enwik8: raw file -> verified cached splits",
        "enwik8: cached load (verified, memmap)",
        "wikitext (files): text -> cached ids",
        "wikitext (files): cached load (verified, memmap)",
    ]
    assert rows[0]["size"] == "20,000 bytes" and all(row["seconds"] >= 0 and row["cpu_seconds"] >= 0 for row in rows)
    assert list(tmp_path.iterdir()) == [out]  # the stand-ins' temporary folder is gone
    assert "enwik8: cached load" in capsys.readouterr().out
