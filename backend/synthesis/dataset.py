"""Running a synthesis request on one CT or on a whole dataset folder, resumably.

    from backend.synthesis import dataset

    settings = dataset.run_settings(request, engine, ct="ct.nii.gz", organs="seg.nii.gz")
    result = dataset.synthesize_case(engine, request, "ct.nii.gz", "seg.nii.gz", Path("out"), settings=settings)

    plan = dataset.plan_dataset(Path("cts"), Path("labels"), Path("aug"), settings, n=3, shard="0/4")
    for output, result, error in dataset.iter_dataset(engine, request, plan, settings=settings):
        ...                                    # one (Output, result or None, DiffTumorError or None) per output

A dataset is a folder of CT files, or of case folders each holding ``ct.<ext>``
(:func:`is_dataset_folder`); :func:`dataset_cases` pairs each case with its labels. Output ``k`` of case
``c`` is the folder ``<out>/<c>_s<k>/`` with its own seed (:func:`output_seed`). A shard ``i/n`` takes every
n-th case starting at i (under ``torchrun``: RANK / WORLD_SIZE, :func:`parse_shard`; GPU LOCAL_RANK,
:func:`rank_device`). The settings that define the outputs (:func:`run_settings`) are recorded in
``<out>/difftumor_synthesize.json`` (:data:`backend.synthesis.outputs.RUN_FILE`) and each provenance; a
re-run with the same settings skips the finished outputs (:func:`backend.synthesis.outputs.output_done`).

Used by ``difftumor synthesize``, which parses the options and prints. Errors are
:class:`~backend.synthesis.request.OptionError` naming the option in plain words (``CT /data/x: ...``); a
front end with its own names passes ``names`` (labels inside a message) and renames the option of the
error it catches with :meth:`~backend.synthesis.request.OptionError.renamed`, as for the request's errors.
This module imports numpy, torch and the engine only where they are used.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from backend.errors import DiffTumorError
from backend.synthesis.request import OPTION_NAMES, OptionError

__all__ = ["InputError", "Output", "DatasetPlan", "output_seed", "parse_shard", "rank_device", "is_dataset_folder",
           "dataset_cases", "check_inputs_exist", "check_single_ct", "run_settings", "read_input",
           "synthesize_case", "plan_dataset", "iter_dataset"]


def _plain(option: str) -> str:
    return OPTION_NAMES.get(option, option)


class InputError(OptionError):
    """An input could not be read: the reader's own message (which names the file), said with the option that
    gave the file (``CT /data/x.nii.gz: not an image``; renamed: ``--ct /data/x.nii.gz: not an image``)."""

    def __init__(self, option: str, message: str):
        DiffTumorError.__init__(self, f"{_plain(option)} {message}")
        self.option, self.value, self.what = option, None, message

    def renamed(self, label: str, value=None) -> DiffTumorError:
        return DiffTumorError(f"{label} {self.what}")


# --------------------------------------------------------------------------------------------
# seeds, shards, devices
# --------------------------------------------------------------------------------------------
def output_seed(seed: int, case: str, k: int) -> int:
    """The seed of output ``k`` of ``case``, from the run's seed, the case's name and k (numpy's
    SeedSequence), so it does not change when other cases are added to or removed from the folder, and
    distinct outputs never share a seed the way ``seed + 1000 * case index + k`` did for k >= 1000."""
    import zlib

    import numpy as np

    return int(np.random.SeedSequence([seed, zlib.crc32(case.encode("utf-8")), k]).generate_state(1)[0])


def parse_shard(text: str | None, env: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """``"i/n"`` -> (i, n); None: this process's place under ``torchrun`` (RANK / WORLD_SIZE, default 0/1)."""
    if text is None:
        return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        i, n = -1, 0
    if not (n >= 1 and 0 <= i < n):
        raise OptionError("shard", text, "expected i/n with 0 <= i < n")
    return i, n


def rank_device(device: str, *, sharded_by_flag: bool, env: Mapping[str, str] = os.environ) -> str:
    """Under ``torchrun`` on a machine with several GPUs, rank r uses GPU ``LOCAL_RANK`` (modulo the GPUs
    present) when ``device`` is auto or cuda; otherwise (or when the shard was given explicitly) ``device``."""
    world = int(env.get("WORLD_SIZE", 1))
    local = env.get("LOCAL_RANK")
    if sharded_by_flag or world < 2 or local is None or str(device).lower() not in ("auto", "cuda"):
        return device
    import torch

    if not torch.cuda.is_available():
        return device
    return f"cuda:{int(local) % torch.cuda.device_count()}"


# --------------------------------------------------------------------------------------------
# inputs: one CT or a dataset folder
# --------------------------------------------------------------------------------------------
def is_dataset_folder(folder: Path) -> bool:
    """A folder of CT files, or of case folders each holding ``ct.<ext>`` (any other folder is one DICOM CT)."""
    from backend.data import case_ct_file
    from backend.io import image_suffix

    folder = Path(folder)
    return folder.is_dir() and any((p.is_file() and image_suffix(p)) or (p.is_dir() and case_ct_file(p))
                                   for p in folder.iterdir() if not p.name.startswith("."))


def dataset_cases(ct_dir: Path, organs_dir: Path) -> list[tuple[str, Path, Path]]:
    """(case, CT, labels) for every case :func:`backend.data.list_cases` finds in ``ct_dir`` with ``labels=
    organs_dir``; labels: the file ``organs_dir/<case>.<ext>`` or the case folder ``organs_dir/<case>/``."""
    from backend.data import list_cases

    organs_dir = Path(organs_dir).expanduser()
    try:
        cases = list_cases(ct_dir, labels=organs_dir)
    except DiffTumorError as exc:  # the lister names the folder; say which input it was
        raise InputError("organs" if str(exc).startswith(str(organs_dir)) else "ct", str(exc)) from None
    from_file = lambda c: c.segmentations is None and c.label is not None and c.label.parent == organs_dir  # noqa: E731
    return [(c.name, c.image, c.label if from_file(c) else organs_dir / c.name) for c in cases]


def check_inputs_exist(inputs: Mapping[str, object]) -> None:
    """Every given input (option name -> path or None) exists."""
    for option, value in inputs.items():
        if value and not Path(value).exists():
            raise OptionError(option, value, "no such file or folder")


def _accepted() -> str:
    from backend.io import IMAGE_SUFFIXES

    return ", ".join(IMAGE_SUFFIXES)


def check_single_ct(ct: Path, dataset_options: Mapping[str, object], names=_plain) -> None:
    """``ct`` is not a dataset folder: refuse a folder holding no files (or any folder, when dataset options
    are given: it holds no CT files), and dataset options (option name -> value, the given ones) for one CT."""
    ct = Path(ct)
    given = {k: v for k, v in dataset_options.items() if v is not None}
    if ct.is_dir() and (given or not any(files for _, _, files in os.walk(ct))):
        raise OptionError("ct", ct, f"no CT files found in this folder (accepted: {_accepted()}, or a folder of "
                          "DICOM slices for one CT)")
    if given:
        option, value = next(iter(given.items()))
        raise OptionError(option, value, f"only for dataset mode ({names('ct')} a folder of CT files); "
                          f"{names('ct')} {ct} is a single CT")


def run_settings(request, engine, *, ct, organs, organ_label: int | None = None, n: int | None = None) -> dict:
    """What defines the outputs (recorded in the run file and each provenance; a resume must match it)."""

    def absolute(p):
        return os.path.abspath(p) if p else None

    return {"ct": absolute(ct), "organs": absolute(organs), "organ_label": organ_label,
            **request.settings(), "weights": str(engine.weights.root) if engine.weights.root is not None else None,
            "n": n or 1}


# --------------------------------------------------------------------------------------------
# one output
# --------------------------------------------------------------------------------------------
def read_input(path: Path, option: str):
    """Read an image given as ``option``; a bad file is an :class:`InputError` naming the file."""
    from backend.io import read_image

    path = Path(path)
    try:
        return read_image(path)
    except DiffTumorError as exc:
        text = str(exc)
        raise InputError(option, text if text.startswith(str(path)) else f"{path}: {text}") from None


def synthesize_case(engine, request, ct_path, organs_path, out_dir: Path, *, settings: dict,
                    organ_label: int | None = None, tumor_mask=None, names=_plain):
    """Read the CT, the organ (and existing tumours) from ``organs_path`` and the ``tumor_mask`` file (for a
    :class:`~backend.synthesis.request.UserMask` request), run ``request`` and write the output folder
    ``out_dir`` (nothing is left behind when anything fails); returns the engine's result, its provenance
    the one written."""
    from backend.organs import load_organ_and_tumors
    from backend.synthesis import outputs

    ct = read_input(Path(ct_path), "ct")
    try:
        organ, existing = load_organ_and_tumors(organs_path, request.organ, label_id=organ_label, reference=ct)
    except DiffTumorError as exc:  # the organs module names the file; say which input gave it
        raise InputError("organs", str(exc)) from None
    if tumor_mask:
        request = dataclasses.replace(request, tumor=dataclasses.replace(
            request.tumor, mask=read_input(Path(tumor_mask), "tumor_mask")))
    # an MSD/LiTS/KiTS map's tumours (existing) stay tumour, never painted over
    result = engine.run(request, ct, organ, existing_tumor=existing, organ_name=str(organs_path))
    prov = outputs.provenance(
        result.provenance, settings=settings, organ_label=organ_label,
        inputs={"ct": os.path.abspath(ct_path), "organs": os.path.abspath(organs_path),
                "tumor_mask": os.path.abspath(tumor_mask) if tumor_mask else None},
        intermediates=list(result.intermediates) if request.keep_intermediates else None)
    outputs.write_output(out_dir, outputs.result_images(result), prov, names=names)
    result.provenance = prov
    return result


# --------------------------------------------------------------------------------------------
# dataset mode
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Output:
    """Output ``k`` of one case: its CT and labels, and the folder it is written to."""

    case_index: int
    case: str
    ct: Path
    labels: Path
    k: int
    folder: Path


@dataclass
class DatasetPlan:
    """The outputs of this shard (``rank`` of ``world``) and those of them still to make (``todo``)."""

    rank: int
    world: int
    n_cases: int
    n: int
    outputs: list[Output]
    todo: list[Output]

    @property
    def skipped(self) -> int:
        return len(self.outputs) - len(self.todo)


def plan_dataset(ct_dir: Path, organs_dir: Path, out: Path, settings: dict, *, n: int | None = None,
                 shard: str | None = None, overwrite: bool = False, names=_plain,
                 env: Mapping[str, str] = os.environ) -> DatasetPlan:
    """List the cases, start (or resume) the run in ``out`` (refused when it holds other settings' results
    unless ``overwrite``; see :func:`backend.synthesis.outputs.start_dataset_run`) and return this shard's
    outputs, the finished ones left out of ``todo``."""
    from backend.synthesis import outputs

    rank, world = parse_shard(shard, env)
    cases = dataset_cases(Path(ct_dir), Path(organs_dir))
    out = Path(out)
    outputs.start_dataset_run(out, settings, overwrite, names=names)
    n = n or 1
    jobs = [Output(ci, case, c, o, k, out / f"{case}_s{k}") for ci, (case, c, o) in enumerate(cases)
            for k in range(n) if ci % world == rank]
    todo = [j for j in jobs if not outputs.output_done(j.folder, settings)]
    return DatasetPlan(rank, world, len(cases), n, jobs, todo)


def iter_dataset(engine, request, plan: DatasetPlan, *, settings: dict, organ_label: int | None = None,
                 tumor_mask=None, names=_plain, todo=None) -> Iterator[tuple[Output, object, DiffTumorError | None]]:
    """Synthesize the outputs still to do (``todo``, default ``plan.todo``), each with its own seed
    (:func:`output_seed` of the request's seed); yields ``(output, result, None)`` or, when the output failed
    in the user's terms, ``(output, None, error)`` and carries on with the next."""
    for job in plan.todo if todo is None else todo:
        try:
            case_request = dataclasses.replace(request, seed=output_seed(request.seed, job.case, job.k))
            result = synthesize_case(engine, case_request, job.ct, job.labels, job.folder, settings=settings,
                                     organ_label=organ_label, tumor_mask=tumor_mask, names=names)
        except DiffTumorError as exc:
            yield job, None, exc
        else:
            yield job, result, None
