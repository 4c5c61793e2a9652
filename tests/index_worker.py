"""A second process for the index tests: index files into an embedded index with the tiny engine.

Run as ``python tests/index_worker.py DECODER ENCODER INDEX MODE LOCK_TIMEOUT FILE...`` where MODE
is ``writer`` (``ChunkStore(..., writer=True)``, as ``refrag index`` opens it) or ``plain`` (the
lock is taken at the first write). Prints one JSON line: the report, or the error's type and text.
"""

from __future__ import annotations

import json
import sys

from tiny import FakeEmbedder  # the script directory (tests/) is on sys.path


def main(argv: list[str]) -> int:
    from refrag_integrations import RefragEngine
    from refrag_integrations.index import index_paths
    from refrag_integrations.index_lock import IndexLockedError, StaleIndexError
    from refrag_integrations.store import ChunkStore

    decoder, encoder, index_dir, mode, lock_timeout, *files = argv
    engine = RefragEngine.from_pretrained(decoder=decoder, encoder=encoder, chunk_size=4, device="cpu")
    try:
        store = ChunkStore.for_engine(engine, index_dir, writer=mode == "writer", lock_timeout=float(lock_timeout))
        report = index_paths(files, store, engine, FakeEmbedder(), batch_size=8, progress=False,
                             min_words=20, max_words=40)
    except (IndexLockedError, StaleIndexError) as err:
        print(json.dumps({"error": type(err).__name__, "message": str(err)}), flush=True)
        return 3
    print(json.dumps(report.to_dict()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
