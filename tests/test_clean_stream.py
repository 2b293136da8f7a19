"""Every core busy for one input file: a compressed jsonl file is decompressed once by the driver
and its line batches are cleaned in parallel, a plain one is cut into parts; either way line
numbers, ids and the clean outputs are those of one task reading the whole file."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_prep.clean import WORK_DIR, _identity, _work_paths, clean_corpus, plan_work, resolve_inputs
from data_prep.readers import line_batches, read_batch, read_file
from pretrain_pipeline.artifacts import RunPaths, read_json
from pretrain_pipeline.config import build_config

_LINE = st.sampled_from([
    b'{"id": "a", "text": "short"}', b'{"text": "no id, a longer document with several words in it"}', b"",
    b"{truncated", b'{"id": "u", "text": "bad \xff utf8"}', b"  \t", b"\r", b'{"id": "n", "text": null}',
    b'{"id": "big", "text": "' + b"x" * 3000 + b'"}',
])


def _compress(data: bytes, suffix: str) -> bytes:
    return gzip.compress(data) if suffix == ".jsonl.gz" else zstandard.ZstdCompressor().compress(data)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lines=st.lists(st.tuples(_LINE, st.sampled_from([b"\n", b"\r\n"])), max_size=50),
    bom=st.booleans(), final_newline=st.booleans(), cut=st.integers(0, 300),
    batch_bytes=st.integers(1, 5000), suffix=st.sampled_from([".jsonl.gz", ".jsonl.zst"]),
)
def test_line_batches_read_as_the_whole_file_does(tmp_path_factory, lines, bom, final_newline, cut, batch_bytes, suffix):
    data = (b"\xef\xbb\xbf" if bom else b"") + b"".join(a + b for a, b in lines)
    if not final_newline:
        data = data.rstrip(b"\r\n")
    packed = _compress(data, suffix)
    # Some files are cut short: the batches end with the same read error row as the whole file.
    path = tmp_path_factory.mktemp("batches") / f"a{suffix}"
    path.write_bytes(packed[: len(packed) - cut] if cut < len(packed) else packed)
    whole_skipped, batch_skipped = Counter(), Counter()
    whole = list(read_file(path, skipped=whole_skipped))
    batches = list(line_batches(path, batch_bytes))
    assert [b.first_line for b in batches] == [1, *[b.first_line + b.n_lines for b in batches[:-1]]]
    assert [r for b in batches for r in read_batch(str(path), b, skipped=batch_skipped)] == whole
    assert batch_skipped == whole_skipped


def _corpus(root: Path, suffix: str) -> tuple[Path, int]:
    """The sample corpus (exact and near duplicates) in one compressed file, with blank lines,
    whitespace-only lines and lines that are not JSON among the documents."""
    from data_prep.sample_corpus import build_sample_corpus

    build_sample_corpus(root / "base.jsonl", max_docs=400)
    lines = (root / "base.jsonl").read_bytes().splitlines(keepends=True)
    odd = range(0, len(lines), 37)
    for i in odd:
        lines[i] += b"\n   \n{not json\n"
    path = root / f"corpus{suffix}"
    path.write_bytes(_compress(b"".join(lines), suffix))
    return path, len(odd)


def _outputs(clean: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(clean.iterdir()) if p.is_file() and p.suffix in (".parquet", ".jsonl")}


@pytest.mark.integration
@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_one_compressed_file_cleaned_in_batches_gives_the_one_task_bytes(ray_cluster, tmp_path, suffix):
    corpus, n_odd = _corpus(tmp_path, suffix)

    def run(name: str, batch_mb: float):
        cfg = build_config({
            "data": {"inputs": [str(corpus)], "documents_per_shard": 150, "clean_batch_mb": batch_mb},
            "runtime": {"runs_root": str(tmp_path / "runs"), "run_name": name, "num_cpus": 2},
        })
        return cfg, RunPaths(cfg.run_dir()), clean_corpus(cfg, RunPaths(cfg.run_dir()))

    _, one_paths, one = run("one", 0)  # 0: one task for the file, as before streaming existed
    cfg, paths, streamed = run("streamed", 0.02)
    files = resolve_inputs(cfg, paths)
    (unit,) = plan_work(cfg.data, files, [_identity(p) for p in files], cpus=2)
    assert unit.stream and one.tasks == streamed.tasks == 1
    assert _outputs(paths.clean) == _outputs(one_paths.clean)
    # The stats differ only in the config (and the fingerprint made from it).
    stats, one_stats = (
        {k: v for k, v in read_json(p.clean / "stats.json").items() if k not in ("config", "input_fingerprint")}
        for p in (paths, one_paths)
    )
    assert stats == one_stats
    assert stats["skipped_blank_lines"] == 2 * n_odd and stats["quarantine_reasons"] == {"bad_json": n_odd}
    assert stats["dropped"].get("exact_duplicate") or stats["dropped"].get("minhash_duplicate")


@pytest.mark.integration
def test_a_streamed_file_resumes_only_its_unfinished_batches(ray_cluster, tmp_path):
    corpus, _ = _corpus(tmp_path, ".jsonl.gz")
    cfg = build_config({
        "data": {"inputs": [str(corpus)], "clean_batch_mb": 0.02},
        "runtime": {"runs_root": str(tmp_path / "runs"), "run_name": "r", "num_cpus": 2},
    })
    paths = RunPaths(cfg.run_dir())
    reference = clean_corpus(cfg, paths)
    from data_prep.clean import clean_files
    from data_prep.ray_runtime import RayRunner

    files = resolve_inputs(cfg, paths)
    (unit,) = plan_work(cfg.data, files, [_identity(p) for p in files], cpus=2)
    work = tmp_path / WORK_DIR
    work.mkdir()
    clean_files([unit], work, cfg.data, RayRunner())
    batches = read_json(_work_paths(work, unit.key)[2])["batches"]
    assert len(batches) > 2 and read_json(_work_paths(work, unit.key)[2])["rows"] == reference.docs_in
    # A crash after two batches: the file's own record and one batch's are gone.
    _work_paths(work, unit.key)[2].unlink()
    _work_paths(work, batches[1])[2].unlink()
    before = {key: _work_paths(work, key)[0].stat().st_mtime_ns for key in batches if key != batches[1]}
    clean_files([unit], work, cfg.data, RayRunner())
    assert {key: _work_paths(work, key)[0].stat().st_mtime_ns for key in before} == before
    assert read_json(_work_paths(work, unit.key)[2])["batches"] == batches


def test_fewer_files_than_cpus_are_cut_smaller_and_compressed_ones_streamed(tmp_path):
    plain = tmp_path / "a.jsonl"
    plain.write_text("".join(json.dumps({"id": str(i), "text": "word " * 100}) + "\n" for i in range(2000)))
    packed = tmp_path / "b.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    cfg = build_config({"data": {"inputs": [str(tmp_path)], "clean_batch_mb": 0.1}}).data
    files = [plain, packed]
    ids = [_identity(p) for p in files]
    assert [(u.part is None, u.stream) for u in plan_work(cfg, files, ids)] == [(True, False), (True, False)]
    cut = plan_work(cfg, files, ids, cpus=4)
    assert sum(1 for u in cut if u.path == str(plain)) == 4 and [u.stream for u in cut if u.path == str(packed)] == [True]
    # As many files as CPUs: one task per file, as before.
    assert len(plan_work(cfg, files, ids, cpus=2)) == 2
    off = build_config({"data": {"inputs": [str(tmp_path)], "clean_batch_mb": 0}}).data
    assert len(plan_work(off, files, ids, cpus=4)) == 2
