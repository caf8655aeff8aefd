"""Render docs/img/study_reading.png: the reading view of ``difftumor study read`` on a two-case study.

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/img/study_reading_shot.py SYNTHETIC_CT SYNTHETIC_LABEL

The study is made from the shared 3 mm CT (a "real" case centred in the liver) and a synthetic CT with its
label (e.g. what docs/img/napari_walkthrough.py saved); the window shows the first case as a reader sees
it, with the PyQt6 binding (no deprecation pop-up over the canvas).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("DIFFTUMOR_SHARED", "/work/shared")) / "data" / "totalseg_abdomen_3mm"


def main(synthetic_ct: str, synthetic_label: str, out: Path = ROOT / "docs" / "img" / "study_reading.png") -> None:
    os.environ.setdefault("QT_API", "pyqt6")
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import SimpleITK as sitk

    from backend.cli import demo
    from study.design import CaseSource, StudySettings, create_study
    from study.session import ReadingSession

    work = Path(tempfile.mkdtemp(prefix="difftumor_study_shot_"))
    seg = sitk.ReadImage(str(SHARED / "example_seg.nii.gz"))
    liver = sitk.GetArrayFromImage(seg) == 5
    from scipy import ndimage

    z, y, x = np.unravel_index(int(np.argmax(ndimage.distance_transform_edt(liver))), liver.shape)
    roi = np.zeros(liver.shape, np.uint8)
    roi[z - 2:z + 3, y - 3:y + 4, x - 3:x + 4] = 1  # where the "real" case is centred
    mask = sitk.GetImageFromArray(roi)
    mask.CopyInformation(seg)
    sitk.WriteImage(mask, str(work / "real_roi.nii.gz"))
    label = sitk.ReadImage(synthetic_label)
    tumour = sitk.GetImageFromArray((sitk.GetArrayFromImage(label) == 2).astype(np.uint8))
    tumour.CopyInformation(label)
    sitk.WriteImage(tumour, str(work / "synthetic_tumour.nii.gz"))
    real = [CaseSource(SHARED / "example_ct_sm.nii.gz", "real", "liver", work / "real_roi.nii.gz")]
    syn = [CaseSource(Path(synthetic_ct), "synthetic", "liver", work / "synthetic_tumour.nii.gz")]
    study = create_study(real, syn, work / "study", settings=StudySettings(readers=("R1",), seed=1))
    session = ReadingSession(study, "R1")

    demo.quiet_qt_binding_notice()
    import napari
    from qtpy.QtWidgets import QApplication

    from difftumor_napari._qt.reading_widget import open_reading

    viewer = napari.Viewer(title="DiffTumor reading session: reader R1", show=True)
    viewer.window.resize(*demo.WINDOW_SIZE)
    viewer, widget = open_reading(session, viewer)
    for _ in range(20):
        QApplication.processEvents()
    viewer.screenshot(str(out), canvas_only=False, flash=False)
    print(f"wrote {out}")
    viewer.close()


if __name__ == "__main__":
    main(*sys.argv[1:3])
