"""What every command over a dataset shares (`score`, `evaluate`, `qa predict`, `merge`): the input's
cases found once, with whether it is a BIDS dataset decided there, and the output folder checked
before any work, written under a temporary name and marked as anomaseg's when complete.

    output = OutputFolder(out)                # refuses a file or a folder anomaseg did not write
    dataset = Dataset.find(data, modalities, shard=shard)
    ...                                       # calibrate, load models: errors before anything is written
    with output.writing() as tmp:             # one writer per output (flock), renamed into place at the end
        parts = parallel.run_sharded(task, dataset.cases, workers, ...)
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from anomaseg.atomic import OUTPUT_MARKER, atomic_dir, check_output_dir
from anomaseg.data import bids as bids_io
from anomaseg.data.cases import Case
from anomaseg.data.layout import find_cases
from anomaseg.shards import select


@dataclass(frozen=True)
class Dataset:
    """The cases of one input (folder or datalist) for one job: `cases` its share (all of them
    without a shard), `all_ids` every case id of the input (shards of one job name the same list)."""

    root: Path
    cases: list[Case]
    all_ids: list[str]
    is_bids: bool
    shard: tuple[int, int] | None = None

    @classmethod
    def find(cls, root: str | Path, modalities: list[str] | None, require_seg: bool = False, query=None,
             shard: tuple[int, int] | None = None) -> "Dataset":
        """`query`: the `BidsQuery` of a BIDS dataset; `shard` (index, count): that share of the
        cases (`shards.select`)."""
        root = Path(root)
        cases = find_cases(root, modalities, require_seg=require_seg, bids=query)
        all_ids = [c.case_id for c in cases]
        if shard is not None:
            cases = select(cases, shard)
        return cls(root, cases, all_ids, bids_io.is_bids_root(root), shard)

    @property
    def resolved(self) -> str:
        """The input's absolute path, as outputs record it."""
        return str(self.root.resolve())


class OutputFolder:
    """An output folder anomaseg replaces whole. Checked when the job starts (`atomic.check_output_dir`:
    not a file, not a folder of someone else's), so a bad --out fails before any work."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        check_output_dir(self.path)

    @contextmanager
    def writing(self) -> Iterator[Path]:
        """A temporary folder beside the output, locked against other writers; on success it is
        marked as anomaseg's (OUTPUT_MARKER) and replaces the output; on failure it is removed."""
        with atomic_dir(self.path) as tmp:
            yield tmp
            (tmp / OUTPUT_MARKER).touch()
