"""Real interaction logs that registry packages ship inside their wheels (no download at run
time). `movielens_100k()` is the path of MovieLens-100k (943 users, 1,682 movies, 100k
ratings with timestamps) as the RecBole atomic file that the ``recbole`` wheel ships;
`reqdedup import-interactions PATH` reads it (``.inter``: tab-separated, ``name:type``
headers). The package is installed --no-deps for its data (requirements-data.txt) and its
code is never imported: the file is found through the installed distribution's metadata.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from reqdedup.errors import InputError

ML100K = "recbole/dataset_example/ml-100k/ml-100k.inter"


def movielens_100k() -> Path:
    try:
        dist = metadata.distribution("recbole")
    except metadata.PackageNotFoundError:
        raise InputError("MovieLens-100k comes from the recbole wheel, which is not installed: "
                         "`uv pip install --no-deps -r requirements-data.txt` (make setup does it)") from None
    path = Path(dist.locate_file(ML100K))
    if not path.is_file():
        raise InputError(f"recbole {dist.version} is installed but has no {ML100K} (expected at {path})")
    return path


def main() -> int:
    print(movielens_100k())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
