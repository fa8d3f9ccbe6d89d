"""Set-up of the rehearsal: IU X-Ray at real scale with nothing downloaded (``--profile rehearsal``).

    python -m medcap_helpers.rehearsal                 # writes data/rehearsal/ (about 1 minute on 16 cores)
    medcap run --profile rehearsal --vram-budget-gb 4  # the full pipeline at real scale on random BLIP-large

Writes an Open-i-layout folder: ``NLMCXR_reports.tgz`` (the 3,955 real report XMLs that torchxrayvision
ships) and ``NLMCXR_png/`` with one placeholder radiograph per ``parentImage`` id (7,470 grayscale PNGs,
512 px on the long side like Open-i's, drawn from each report's findings as the smoke sample's are).
The profile reads it through the same ``openi`` source as a real download. Making the images is set-up,
not part of the timed pipeline (a real user downloads real images instead).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

from medcap_helpers.atomic import atomic_file
from medcap_helpers.config import REHEARSAL_DATA
from medcap_helpers.reports import bundled_reports, xrv_reports_archive
from medcap_helpers.smoke_sample import findings_labels, render_radiograph

LONG_SIDE = 512
SHORT_SIDES = (420, 512)  # Open-i's PNGs are portrait or square, 512 px on the long side


def _render(job: tuple[str, str, str, Path]) -> None:
    image_id, findings, view, target = job
    if target.is_file():
        return
    seed = zlib.crc32(image_id.encode())
    picture = render_radiograph(findings_labels(findings), view, LONG_SIDE, seed)
    width = SHORT_SIDES[seed % len(SHORT_SIDES)]
    with atomic_file(target) as tmp:
        picture.resize((width, LONG_SIDE)).save(tmp, format="PNG")


def make_rehearsal_data(out_dir: str | Path = REHEARSAL_DATA, workers: int | None = None,
                        limit: int | None = None) -> Path:
    """Write the rehearsal data under ``out_dir`` (images already there are kept); return ``out_dir``.

    ``limit`` keeps only the first reports (tests). Views alternate frontal/lateral by image id order.
    """
    out_dir = Path(out_dir)
    images = out_dir / "NLMCXR_png"
    images.mkdir(parents=True, exist_ok=True)
    with atomic_file(out_dir / "NLMCXR_reports.tgz") as tmp:
        shutil.copyfile(xrv_reports_archive(), tmp)
    reports = bundled_reports().reports[:limit]
    jobs = [(image_id, report.findings, ("frontal", "lateral")[i % 2], images / f"{image_id}.png")
            for report in reports for i, image_id in enumerate(sorted(report.image_ids))]
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        for _ in tqdm(pool.map(_render, jobs, chunksize=32), total=len(jobs), desc="Placeholder radiographs",
                      unit="img"):
            pass
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", default=REHEARSAL_DATA)
    parser.add_argument("--workers", type=int)
    args = parser.parse_args(argv)
    folder = make_rehearsal_data(args.out_dir, args.workers)
    print(f"Rehearsal data in {folder}: {sum(1 for _ in (folder / 'NLMCXR_png').glob('*.png'))} images.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
