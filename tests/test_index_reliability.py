"""Failure behaviour of an embedded index: one writer at a time (two real processes), repair of
chunk vectors that cannot be read back (`refrag index --verify`, and the check of a re-run)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from chromadb.api.client import SharedSystemClient

from refrag_integrations import RefragEngine
from refrag_integrations.index import index_paths, verify_index
from refrag_integrations import index_lock
from refrag_integrations.index_lock import StaleIndexError
from refrag_integrations.store import ChunkStore

from tiny import FakeEmbedder

WORKER = Path(__file__).with_name("index_worker.py")
WORDS = "the tower river mountain violin light energy paris france engineer built company designed".split()
SIZES = {"min_words": 20, "max_words": 40}
N = 60  # passages per file


@pytest.fixture()
def engine(tiny_engine):
    return RefragEngine(tiny_engine.decoder, tiny_engine.tokenizer, tiny_engine.chunk_encoder, tiny_engine.config)


@pytest.fixture()
def corpus(tmp_path) -> list[Path]:
    """Two files of N passages each (~2,400 chunk vectors per file at k = 4: past the 1,000 that
    Chroma keeps in its log before writing its vector index, so a lost vector index loses vectors)."""
    rng = random.Random(0)
    files = []
    for j in range(2):
        path = tmp_path / f"doc{j}.txt"
        path.write_text("".join(" ".join(rng.choice(WORDS) for _ in range(30)) + f" doc{j}p{p}.\n\n" for p in range(N)))
        files.append(path)
    return files


def _worker(tiny_dirs, index_dir: Path, mode: str, lock_timeout: float, files) -> subprocess.Popen:
    dec, enc = tiny_dirs
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(dec), str(enc), str(index_dir), mode, str(lock_timeout), *map(str, files)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def _result(proc: subprocess.Popen) -> tuple[int, dict, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, json.loads(out.strip().splitlines()[-1]), err


def _all_ids(store: ChunkStore) -> list[str]:
    return [r.id for page in store.iter_passages() for r in page]


def _roll_back_chunk_index(index_dir: Path, saved: Path) -> None:
    """Put back an older copy of the chunk collection's vector index, as a second writer with an
    out-of-date view of the directory does: the rows stay listed, their vectors are gone."""
    segments = [d for d in index_dir.iterdir() if d.is_dir()]
    biggest = max(segments, key=lambda d: (d / "data_level0.bin").stat().st_size)
    if saved.exists():
        shutil.rmtree(biggest)
        shutil.copytree(saved, biggest)
    else:
        shutil.copytree(biggest, saved)


def test_two_index_processes_on_one_index_lose_nothing(tmp_path, tiny_dirs, engine, corpus):
    idx = tmp_path / "idx"
    a = _worker(tiny_dirs, idx, "writer", 120, corpus)
    b = _worker(tiny_dirs, idx, "writer", 120, corpus[::-1])
    (rc_a, rep_a, _), (rc_b, rep_b, err_b) = _result(a), _result(b)
    assert rc_a == 0 and rc_b == 0, (rep_a, rep_b)
    store = ChunkStore.for_engine(engine, idx)
    ids = _all_ids(store)
    assert len(ids) == 2 * N and rep_a["passages"] == rep_b["passages"] == 2 * N
    assert rep_a["added"] + rep_b["added"] == 2 * N  # one wrote them, the other found them
    assert store.complete_chunk_vectors(ids) == set(ids)
    assert store.unreadable_chunk_vectors(ids) == set() and store.unreadable_passages(ids) == set()
    assert set(store.fetch_chunk_vectors(ids)) == set(ids)


def test_a_second_writer_times_out_naming_the_holder(tmp_path, tiny_dirs, corpus):
    idx = tmp_path / "idx"
    idx.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from refrag_integrations import index_lock; "
         "index_lock.acquire(sys.argv[1], 0); print('locked', flush=True); time.sleep(600)", str(idx)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1],
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, out, err = _result(_worker(tiny_dirs, idx, "writer", 1.5, corpus[:1]))
        assert rc == 3 and out["error"] == "IndexLockedError"
        assert f"pid {holder.pid}" in out["message"] and "1.5 s" in out["message"] and str(idx) in out["message"]
        assert "waiting for the index" in err  # it said it was waiting before giving up
        # It gave up while the lock was still held (the holder sleeps 600 s), not when it was released;
        # a wall-clock bound would depend on the machine's load (a worker takes >60 s to start on a busy one).
        assert holder.poll() is None
    finally:
        holder.terminate()
        holder.wait(timeout=10)
    # the lock dies with its holder: the next writer goes ahead without waiting
    index_lock.acquire(idx, 0)
    assert index_lock.is_held(idx) and index_lock.holder_pid(idx) == os.getpid()
    index_lock.release(idx)
    assert not index_lock.is_held(idx)


def test_a_process_with_an_out_of_date_view_refuses_to_write(tmp_path, tiny_dirs, engine, corpus):
    idx = tmp_path / "idx"
    mine = ChunkStore.for_engine(engine, idx)  # opened before the other process writes
    rc, out, _ = _result(_worker(tiny_dirs, idx, "writer", 30, corpus[:1]))
    assert rc == 0 and out["added"] == N
    with pytest.raises(StaleIndexError, match="written by another process"):
        index_paths(corpus[1:], mine, engine, FakeEmbedder(), progress=False, **SIZES)


def test_rerun_and_verify_repair_unreadable_chunk_vectors(tmp_path, engine, corpus, caplog):
    idx, saved = tmp_path / "idx", tmp_path / "saved-segment"
    emb = FakeEmbedder()
    store = ChunkStore.for_engine(engine, idx)
    index_paths(corpus[:1], store, engine, emb, progress=False, **SIZES)
    store.close()
    SharedSystemClient.clear_system_cache()  # as if the process had ended
    _roll_back_chunk_index(idx, saved)  # saves a copy
    # a later run adds the second file ...
    store = ChunkStore.for_engine(engine, idx)
    index_paths(corpus[1:], store, engine, emb, progress=False, **SIZES)
    store.close()
    SharedSystemClient.clear_system_cache()
    _roll_back_chunk_index(idx, saved)  # ... and its vectors are lost, as after two writers at once
    store = ChunkStore.for_engine(engine, idx)
    ids = _all_ids(store)
    broken = store.unreadable_chunk_vectors(ids)
    assert len(ids) == 2 * N and len(broken) >= N // 2
    assert store.complete_chunk_vectors(ids) == set(ids)  # the rows are listed: only reading finds it
    with caplog.at_level("WARNING", logger="refrag_integrations.store"):
        assert len(store.fetch_chunk_vectors(ids)) == 2 * N - len(broken)  # no crash: those are encoded at query time
    assert "refrag index --verify" in caplog.text
    # a re-run on the same files does not say "0 added, all fine": it repairs them
    again = index_paths(corpus, store, engine, emb, progress=False, **SIZES)
    assert again.added == 0 and again.repaired == len(broken) and again.chunks > 0
    assert f"repaired {len(broken)}" in again.summary()
    assert store.unreadable_chunk_vectors(ids) == set()
    assert set(store.fetch_chunk_vectors(ids)) == set(ids)
    # --verify finds the same damage without the files
    store.close()
    SharedSystemClient.clear_system_cache()
    _roll_back_chunk_index(idx, saved)
    store = ChunkStore.for_engine(engine, idx)
    broken = store.unreadable_chunk_vectors(ids)
    assert broken
    report = verify_index(store, engine, emb, progress=False)
    assert report.passages == 2 * N and report.repaired == len(broken) and report.added == 0
    assert store.unreadable_chunk_vectors(ids) == set()
    fresh = RefragEngine(engine.decoder, engine.tokenizer, engine.chunk_encoder, engine.config)
    vectors = store.fetch_chunk_vectors(ids)
    first = sorted(broken)[0]
    text = store.get_passages([first])[first].text
    np.testing.assert_allclose(vectors[first].numpy(), fresh.chunk_vectors([text]).vectors[0].numpy(), rtol=1e-4, atol=1e-5)
    assert verify_index(store, engine, emb, progress=False).repaired == 0  # nothing left to repair
