"""What a dataset is made of, whatever its layout: cases, the image files they hold, modality names.

The layout readers (`data.layout`, `data.bids`) produce these and everything downstream consumes
them, so no reader depends on another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from anomaseg.errors import InputError

UNNAMED = "image"  # modality of an image whose file name carries none

# Names of the same MR contrast across datasets (BraTS 2023 uses t1n/t1c/t2w/t2f).
_ALIASES = {"t2f": "flair", "t1c": "t1ce", "t1gd": "t1ce", "t1n": "t1", "t2w": "t2", "t1w": "t1",
            "red": "r", "green": "g", "blue": "b", "grey": "gray"}


def canonical_modality(name: str) -> str:
    name = name.strip().lower()
    return _ALIASES.get(name, name)


@dataclass(frozen=True)
class ImageRef:
    path: Path
    channel: int | None = None  # volume index in a 4D file


@dataclass(frozen=True)
class Case:
    case_id: str
    images: dict[str, ImageRef] = field(hash=False)  # canonical modality -> file
    seg: Path | None = None
    mask: Path | None = None
    source: Path | None = None  # the case folder or datalist, for error messages
    normal: bool = False  # known to be anomaly-free without a segmentation file (MVTec "good" images)

    def image(self, modality: str) -> ImageRef:
        """The image of one modality; a case with a single unnamed image serves any modality."""
        key = canonical_modality(modality)
        if key in self.images:
            return self.images[key]
        if list(self.images) == [UNNAMED]:
            return self.images[UNNAMED]
        found = ", ".join(sorted(self.images)) or "none"
        raise InputError(self.source or self.case_id,
                         f"case {self.case_id!r} has no {modality!r} image (found: {found})")
