"""``difftumor study {create,read,report,export}``: blinded reader studies (Visual Turing Test).

The CLI layer of the study: argument parsing and thin handlers. The library (:mod:`study`) holds
design, sessions, statistics and reports and imports neither napari nor this module; the reading
GUI (:mod:`difftumor_napari._qt.reading_widget`) is imported inside :func:`read_handler` only, so
``difftumor --help`` loads neither Qt nor napari.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from backend.errors import DiffTumorError

log = logging.getLogger(__name__)


def _floats(n: int, flag: str):
    def parse(text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            values = ()
        if len(values) == 1 and n == 3:
            values = values * 3
        if len(values) != n:
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: expected {n} comma-separated numbers")
        return values

    return parse


def register(sub) -> None:
    parser = sub.add_parser(
        "study",
        help="blinded reader studies: create, read, report, export",
        description="Visual Turing Test: readers tell real from synthetic tumors; Table-1 statistics.",
    )
    group = parser.add_subparsers(dest="study_command", metavar="ACTION", required=True)
    add_commands(group)


def add_commands(group) -> None:
    """Add create/read/report/export to the ``study`` sub-parsers ``group``."""
    p = group.add_parser("create", help="create one blinded reader package per reader and a separate answer key",
                         description="Re-writes every case through identical preprocessing (LPS, common spacing, fixed "
                                     "ROI around the tumor placed alike for every case, int16, stripped headers) under "
                                     "random case ids, into one package per reader (STUDY/<reader>/: give each reader "
                                     "only their own folder). Warns about confounds between the classes (source "
                                     "spacing, dtype, padding, noise, intensity range, file size, and a classifier on "
                                     "those statistics); the warnings are also written to the key folder.")
    p.add_argument("--real", required=True, metavar="DIR_OR_CSV", help="real-tumor CTs: a folder of images or a CSV "
                   "with columns image[,mask][,organ] (mask = tumor mask, used only to centre the view)")
    p.add_argument("--synthetic", required=True, metavar="DIR_OR_CSV", help="synthetic-tumor CTs, same forms as --real")
    p.add_argument("--out", required=True, type=Path, metavar="STUDY",
                   help="study folder to create (must not exist): one reader package per reader in it")
    p.add_argument("--key-out", type=Path, metavar="DIR", help="answer key folder (default: STUDY.key beside STUDY); "
                   "keep it away from the readers")
    p.add_argument("--readers", default="R1", help="comma-separated reader names (default: R1)")
    p.add_argument("--seed", type=int, help="seed for each reader's reading order only (default: random; recorded in "
                   "the key). Case ids and which case gets which id never come from it: they are drawn fresh from the "
                   "operating system's randomness every time")
    p.add_argument("--organ", default="all", help="organ of cases whose list gives none (default: all)")
    p.add_argument("--spacing", type=_floats(3, "--spacing"), default=(1.0, 1.0, 1.0), metavar="MM[,MM,MM]",
                   help="common voxel spacing x,y,z in mm (default: 1)")
    p.add_argument("--roi-size", type=_floats(3, "--roi-size"), default=(160.0, 160.0, 96.0), metavar="X,Y,Z",
                   help="size in mm of the box kept around the tumor (default: 160,160,96)")
    p.add_argument("--window", type=_floats(2, "--window"), default=(-160.0, 240.0), metavar="LOW,HIGH",
                   help="display window in HU shown to readers (default: -160,240 = W400/L40)")
    p.add_argument("--unsure", action="store_true", help="offer an Unsure answer (counted, excluded from the rates)")
    p.add_argument("--confidence", action="store_true", help="ask a 1-5 confidence with each answer (enables ROC AUC)")
    p.add_argument("--revisit", action="store_true", help="let readers go back and change earlier answers")
    p.add_argument("--compress", action="store_true",
                   help="write .nii.gz: smaller, but a compressed file's size follows the image content and can hint "
                        "at the class (real vs synthetic); the uncompressed default gives every case file the same size")
    p.add_argument("--strict", action="store_true",
                   help="refuse to create the study (write nothing) when there is any confound between the classes")
    p.set_defaults(func=create_handler)

    p = group.add_parser("read", help="open napari for one reader's blinded reading session")
    p.add_argument("study", type=Path, metavar="PACKAGE", help="the reader's package folder (STUDY/<reader>), or the "
                   "study folder with --reader")
    p.add_argument("--reader", help="reader name, as given at creation (default: the package's one reader)")
    p.set_defaults(func=read_handler)

    p = group.add_parser("report", help="sensitivity/specificity/accuracy per reader and organ (Table 1), kappa, AUC, iMRMC")
    p.add_argument("--answers", required=True, nargs="+", type=Path, metavar="ANSWERS",
                   help="answers CSV(s), session database(s) (*.sqlite) sent back by readers, reader package(s) "
                        "or the study folder (collects every reader package's answers)")
    p.add_argument("--key", required=True, type=Path, metavar="KEY", help="key.csv (case_id,truth,organ) or its folder")
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="output folder: new, empty or a previous report's (its files are replaced); never inside a study")
    p.add_argument("--force", action="store_true", help="write into a folder that also holds other files")
    p.set_defaults(func=report_handler)

    p = group.add_parser("export", help="write one reader's answers as CSV (reader,case_id,answer,confidence,seconds,answered_at)")
    p.add_argument("study", type=Path, metavar="STUDY", help="the reader's package folder, or the study folder")
    p.add_argument("--reader", required=True, help="reader name")
    p.add_argument("--out", required=True, type=Path, metavar="FILE",
                   help="CSV to write; must not exist (unless --force) and must lie outside the study folder")
    p.add_argument("--force", action="store_true", help="replace an existing FILE")
    p.set_defaults(func=export_handler)


def create_handler(args) -> int:
    from study.design import StudyOptions, StudySettings, create_study, list_cases

    settings = StudySettings(
        readers=tuple(r.strip() for r in args.readers.split(",") if r.strip()),
        seed=args.seed, spacing=args.spacing, roi_size_mm=args.roi_size, window=args.window,
        compress=args.compress, organ=args.organ, strict=args.strict,
        options=StudyOptions(unsure=args.unsure, confidence=args.confidence, revisit=args.revisit),
    )
    real = list_cases(args.real, "real", args.organ)
    synthetic = list_cases(args.synthetic, "synthetic", args.organ)
    key_out = Path(args.key_out or args.out.parent / f"{args.out.name}.key")
    for source, flag in ((Path(args.real), "--real"), (Path(args.synthetic), "--synthetic")):
        for target, name in ((args.out, "--out"), (key_out, "--key-out")):
            if source.is_dir() and target.resolve().is_relative_to(source.resolve()):  # blinded package (or key)
                raise DiffTumorError(f"{name} {target}: is inside the {flag} folder {source}; put the study and its "
                                     "key outside the folders of source cases")

    def progress(message: str, done: int, total: int) -> None:
        log.info("preprocessing %s", message)

    study = create_study(real, synthetic, args.out, settings=settings, key_out=args.key_out, progress=progress)
    key = Path(args.key_out or args.out.parent / f"{args.out.name}.key")
    seed = json.loads((key / "key.json").read_text(encoding="utf-8"))["seed"]
    n_warnings = len(json.loads((key / "confounds.json").read_text(encoding="utf-8"))["warnings"])
    print(f"study: {args.out} ({len(study.case_ids)} cases); one package per reader, give each reader only their own:")
    for reader in settings.readers:
        print(f"  {reader}: {args.out / reader}")
    print(f"answer key (keep it from the readers; it records the order seed {seed}): {key}")
    if n_warnings:
        print(f"{n_warnings} confound warning(s) above, also in {key / 'confounds.txt'}")
    return 0


def read_handler(args) -> int:
    from study.design import load_study
    from study.session import ReadingSession

    study = load_study(args.study, args.reader)
    if args.reader is None and len(study.readers) != 1:
        raise DiffTumorError(f"{args.study}: --reader is needed (readers: {', '.join(study.readers)})")
    # errors (damaged case files, bad reader, bad database) come before Qt starts
    session = ReadingSession(study, args.reader or study.readers[0])
    from backend.cli.qt_setup import prefer_qt6, quiet_qt_binding_notice

    prefer_qt6()  # before anything imports qtpy
    try:
        from difftumor_napari._qt.reading_widget import run_reading_app
    except ImportError as exc:  # napari / Qt missing
        raise DiffTumorError(f"study read: needs napari and a Qt binding (pip install 'difftumor[gui]'): {exc}") from None
    quiet_qt_binding_notice()
    run_reading_app(session)
    print(f"{session.reader}: {session.n_answered} of {session.n_cases} cases answered "
          f"(saved in {session.store.path})")
    return 0


def report_handler(args) -> int:
    from study.report import write_report

    paths = write_report(args.answers, args.key, args.out, force=args.force)
    sys.stdout.write(Path(paths["table.md"]).read_text(encoding="utf-8"))
    print(f"wrote {', '.join(p.name for p in paths.values())} to {args.out}")
    return 0


def export_handler(args) -> int:
    from study.report import export_answers

    path = export_answers(args.study, args.reader, args.out, force=args.force)
    print(f"wrote {path}")
    return 0
