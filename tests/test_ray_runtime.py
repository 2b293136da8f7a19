"""The unit runners of data_prep.ray_runtime: the scheduling rules on the in-process runner, and the
cleaning and encoding units giving the same bytes in process as on a real local Ray (2 CPUs)."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.clean import (
    WorkUnit,
    _identity,
    _work_paths,
    _write_outputs,
    clean_corpus,
    clean_files,
    find_duplicates,
    plan_work,
    resolve_inputs,
)
from data_prep.ray_runtime import LocalRunner, RayRunner, ray_runner
from data_prep.shards import SPLITS, assign_splits, encode_parts, write_shards
from data_prep.tokenizer import MODEL_FILE, clean_parts, train_tokenizer
from pretrain_pipeline.artifacts import RunPaths, read_json, sha256_file
from pretrain_pipeline.config import DataConfig, PipelineConfig, build_config

# --------------------------------------------------------------------------------------------
# Scheduling, on the in-process runner


class WatchedRunner(LocalRunner):
    """The in-process runner, noting which units it started and which it cancelled."""

    def __init__(self) -> None:
        self.started: list = []
        self.cancelled: list = []

    def _starter(self, fn, shared):
        start = super()._starter(fn, shared)

        def watched(unit):
            self.started.append(unit)
            return start(unit)

        return watched

    def _cancel(self, handle) -> None:
        self.cancelled.append(handle.args[0])


def test_results_come_in_unit_order_with_the_shared_arguments():
    results = LocalRunner().map(divmod, [7, 8, 9], shared=(4,), describe=str, desc="divmod")
    assert list(results) == [(1, 3), (2, 0), (2, 1)]


def test_at_most_window_units_are_started_ahead_of_the_consumer():
    runner = WatchedRunner()
    units = list(range(10))
    for consumed, result in enumerate(runner.map(abs, units, describe=str, desc="abs", window=3), start=1):
        assert result == consumed - 1
        assert len(runner.started) == min(len(units), 3 + consumed)
    assert runner.started == units and not runner.cancelled


def test_a_failing_unit_is_named_and_the_units_in_flight_are_cancelled():
    runner = WatchedRunner()
    units = ["1", "2", "x", "4", "5", "6"]
    results = runner.map(int, units, describe=lambda u: f"parsing {u!r}", desc="int", window=3)
    with pytest.raises(RuntimeError, match=r"^parsing 'x' failed: invalid literal"):
        list(results)
    assert runner.started == ["1", "2", "x", "4", "5"]
    assert runner.cancelled == ["4", "5"]


def _kill_own_worker_once(unit: int, marks: str) -> int:
    """A unit whose first attempt kills its worker (as the OOM killer would), when it is unit 3."""
    import os
    import signal

    mark = Path(marks) / f"unit-{unit}"
    if unit == 3 and not mark.exists():
        mark.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return unit * unit


def _kill_own_worker_always(unit: int) -> int:
    import os
    import signal

    if unit == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return unit


def test_a_killed_pool_worker_is_replaced_and_its_units_start_again(tmp_path):
    from data_prep.ray_runtime import TASK_RETRIES, process_pool_runner

    with process_pool_runner(2) as runner:
        results = list(runner.map(_kill_own_worker_once, range(8), shared=(str(tmp_path),), window=3,
                                  describe=lambda u: f"unit {u}", desc="test"))
        assert results == [u * u for u in range(8)]
        # A unit that kills every worker it meets fails after TASK_RETRIES fresh pools, naming the
        # unit awaited then (the one that died, or one that died with it).
        make_pool, pools = runner._new_pool, []

        def counted_pool():
            pools.append(make_pool())
            return pools[-1]

        runner._new_pool = counted_pool
        with pytest.raises(RuntimeError, match=r"^unit [01] failed: A process in the process pool was terminated"):
            list(runner.map(_kill_own_worker_always, range(4), describe=lambda u: f"unit {u}", desc="test"))
        assert len(pools) == TASK_RETRIES


def test_a_unit_that_cannot_read_its_file_keeps_errno_and_file(tmp_path):
    missing = tmp_path / "missing.bin"
    with pytest.raises(OSError) as err:
        list(LocalRunner().map(Path.read_bytes, [missing], describe=lambda p: f"reading {p}", desc="read"))
    assert err.value.errno == errno.ENOENT and err.value.filename == str(missing)
    assert str(err.value).startswith(f"[Errno {errno.ENOENT}] reading {missing} failed: No such file")


def test_closing_the_results_early_cancels_the_units_not_consumed():
    runner = WatchedRunner()
    results = runner.map(abs, [1, 2, 3, 4], describe=str, desc="abs", window=2)
    assert next(results) == 1
    results.close()
    assert runner.started == [1, 2, 3] and runner.cancelled == [2, 3]


# --------------------------------------------------------------------------------------------
# The stages' units: in process and on Ray, the same bytes


@pytest.fixture(scope="module")
def small_run(ray_cluster, tmp_path_factory) -> tuple[PipelineConfig, RunPaths]:
    """The sample corpus (it has exact and near duplicates) in three files, cleaned with small
    tasks (so files are cut into parts), a tokenizer and shards, all on Ray."""
    from data_prep.sample_corpus import build_sample_corpus

    root = tmp_path_factory.mktemp("runners")
    corpus = root / "corpus.jsonl"
    build_sample_corpus(corpus, max_docs=600)
    lines = corpus.read_text().splitlines(keepends=True)
    for i in range(3):
        (root / "raw" / f"part-{i}.jsonl").parent.mkdir(exist_ok=True)
        (root / "raw" / f"part-{i}.jsonl").write_text("".join(lines[i::3]))
    cfg = build_config(
        {
            "data": {"inputs": [str(root / "raw")], "documents_per_shard": 100, "clean_task_mb": 0.05},
            "tokenizer": {"vocab_size": 400, "val_fraction": 0.1, "shard_size_mb": 0.02},
            "runtime": {"runs_root": str(root / "runs"), "run_name": "r", "num_cpus": 2},
        }
    )
    paths = RunPaths(cfg.run_dir())
    clean_corpus(cfg, paths)
    train_tokenizer(cfg, paths)
    write_shards(cfg, paths)
    return cfg, paths


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file() and p.name != "_SUCCESS.json"}


@pytest.mark.integration
def test_cleaning_units_in_process_give_the_bytes_ray_gives(small_run, tmp_path):
    cfg, paths = small_run
    files = resolve_inputs(cfg, paths)
    units = plan_work(cfg.data, files, [_identity(p) for p in files])
    assert any(u.part for u in units) and len(units) > len(files)

    def stage1(runner, work_dir: Path) -> dict[int, str]:
        work_dir.mkdir()
        clean_files(units, work_dir, cfg.data, runner)
        return find_duplicates([_work_paths(work_dir, u.key)[1] for u in units], runner)

    local_drops = stage1(LocalRunner(), tmp_path / "local")
    with ray_runner(cfg.runtime) as runner:
        ray_drops = stage1(runner, tmp_path / "ray")
    assert local_drops and local_drops == ray_drops
    assert _files(tmp_path / "local") == _files(tmp_path / "ray")

    out = tmp_path / "clean"
    out.mkdir()
    fingerprint = read_json(paths.clean / "stats.json")["input_fingerprint"]
    _write_outputs(units, tmp_path / "local", local_drops, out, cfg.data, fingerprint)
    assert _files(out) == _files(paths.clean)  # the clean stage's own output, cleaned on Ray


@pytest.mark.integration
def test_encoding_in_process_gives_the_tables_ray_gives_and_the_shards_hold(small_run):
    cfg, paths = small_run
    parts = clean_parts(paths)
    model = paths.tokenizer / MODEL_FILE
    args = (str(model), sha256_file(model), cfg.tokenizer.vocab_size)
    local = list(encode_parts(parts, *args, LocalRunner()))
    with ray_runner(cfg.runtime) as runner:
        on_ray = list(encode_parts(parts, *args, runner))
    row_groups = [pq.ParquetFile(p).metadata.row_group(g).num_rows for p in parts for g in range(pq.ParquetFile(p).metadata.num_row_groups)]
    assert [t.num_rows for t in local] == row_groups
    assert len(local) == len(on_ray) and all(a.equals(b) for a, b in zip(local, on_ray))

    encoded = pa.concat_tables(local)
    splits = assign_splits(encoded.column("id").to_pylist(), cfg.tokenizer.seed, cfg.tokenizer.val_fraction)
    for split in SPLITS:
        shards = [pa.ipc.open_stream(pa.memory_map(str(f))).read_all() for f in sorted(paths.shards.glob(f"{split}-*.arrow"))]
        assert pa.concat_tables(shards).equals(encoded.filter(pa.array([s == split for s in splits])))


@pytest.fixture(params=["local", pytest.param("ray", marks=pytest.mark.integration)])
def runner(request):
    if request.param == "local":
        return LocalRunner()
    request.getfixturevalue("ray_cluster")
    return RayRunner()


def test_a_cleaning_unit_that_fails_is_named(runner, tmp_path):
    table = tmp_path / "notes.csv"
    table.write_text("id,text\n1,not a format the readers know\n")
    (tmp_path / "work").mkdir()
    named = rf"(?s)^clean: cleaning {re.escape(str(table))} failed: .*unsupported file type"
    with pytest.raises(RuntimeError, match=named):
        clean_files([WorkUnit(str(table), 0, None, "k", 1)], tmp_path / "work", DataConfig(), runner)


def test_an_encoding_unit_that_fails_is_named(runner, tmp_path):
    part = tmp_path / "part-00000.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": ["one", "two", "three"]}), part, row_group_size=2)
    missing_model = tmp_path / "missing.model"
    named = rf"(?s)shards: encoding {re.escape(str(part))} row groups 0-0 failed: .*{re.escape(missing_model.name)}"
    with pytest.raises(RuntimeError, match=named):
        list(encode_parts([part], str(missing_model), "0" * 64, 400, runner))
