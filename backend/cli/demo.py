"""``difftumor demo``: napari with the CT phantom (or your files) and every DiffTumor widget docked.

``--screenshot out.png`` renders the same window, saves it (atomically) and exits - for the docs and
the tests. napari is imported inside the handler: ``backend`` never imports it at module level.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from backend.cli.qt_setup import prefer_qt6, quiet_qt_binding_notice
from backend.errors import DiffTumorError

log = logging.getLogger(__name__)

PLUGIN = "difftumor"
WINDOW_SIZE = (1600, 1000)  # width, height of the demo window (and screenshot)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="open napari with the CT phantom (or your CT + organ labels) and the DiffTumor widgets",
        description="Open napari with the procedural abdominal CT phantom, or --ct/--organs files, and "
        "every DiffTumor widget docked. --screenshot saves the window as PNG and exits.",
    )
    p.add_argument("--ct", type=Path, metavar="FILE", help="CT volume (NIfTI, NRRD, MHA/MHD or a DICOM folder)")
    p.add_argument("--organs", type=Path, metavar="FILE", help="organ label map on the CT's grid (needs --ct)")
    p.add_argument("--seed", type=int, default=0, help="phantom seed when no --ct is given (default 0)")
    p.add_argument("--screenshot", type=Path, metavar="PNG", help="save the window as PNG and exit")
    p.add_argument("--three-views", action=argparse.BooleanOptionalAction, default=True,
                   help="show coronal and sagittal views below the axial one (default: on)")
    p.set_defaults(func=handler)


def _check_display() -> None:
    if not sys.platform.startswith("linux") or os.environ.get("QT_QPA_PLATFORM"):
        return
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise DiffTumorError(
            "no display: napari needs a screen (DISPLAY is not set); on a headless machine run "
            "'xvfb-run -a -s \"-screen 0 1600x1000x24\" difftumor demo --screenshot out.png'"
        )


def _load_layers(args) -> list[tuple]:
    """Layer data for the demo; every input problem raises before any window opens."""
    from backend.io import check_same_grid, read_image
    from difftumor_napari._reader import layer_name, volume_to_layer_data

    if args.ct is None:
        from difftumor_napari._sample_data import make_phantom_sample

        return make_phantom_sample(args.seed)
    ct = read_image(args.ct)
    layers = [volume_to_layer_data(ct, kind="ct", name=layer_name(args.ct))]
    if args.organs is not None:
        organs = read_image(args.organs)
        check_same_grid(ct.geometry, organs.geometry, names=(str(args.ct), str(args.organs)))
        layers.append(volume_to_layer_data(organs, kind="labels", name=layer_name(args.organs)))
    return layers


def plugin_widget_names() -> list[str]:
    """Display names of every widget contribution in the installed DiffTumor manifest."""
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution(PLUGIN)
    return [w.display_name for w in manifest.contributions.widgets or ()]


LAYER_LIST_ROWS = 8  # rows of the layer list visible without scrolling (CT, organs, tumour, result, ...)


def arrange_window(viewer, docks: list) -> None:
    """Readable tabs and a usable layer list: each DiffTumor tab shows its whole name (the dock's title
    without the "(difftumor)" suffix, never elided, the right dock widened to fit every tab), and the layer
    list gets room for :data:`LAYER_LIST_ROWS` layers instead of two rows under the layer controls."""
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QApplication, QTabBar

    main_window = viewer.window._qt_window
    for dock in docks:
        title = dock.windowTitle()
        if title.endswith(f" ({PLUGIN})"):
            dock.setWindowTitle(title[: -len(f" ({PLUGIN})")])
    QApplication.processEvents()
    titles = {d.windowTitle() for d in docks}
    for bar in main_window.findChildren(QTabBar):
        if titles & {bar.tabText(i) for i in range(bar.count())}:
            bar.setElideMode(Qt.TextElideMode.ElideNone)
            bar.setExpanding(False)
            bar.setUsesScrollButtons(False)
            if docks:
                needed = bar.sizeHint().width() + 8
                if docks[0].width() < needed:
                    main_window.resizeDocks([docks[0]], [needed], Qt.Orientation.Horizontal)
    qt_viewer = viewer.window._qt_viewer
    controls, layer_list = qt_viewer.dockLayerControls, qt_viewer.dockLayerList
    view = qt_viewer.layers
    row = max(view.sizeHintForRow(0), 28) if view.model().rowCount() else 32
    wanted = LAYER_LIST_ROWS * row + 80  # + the buttons above and below the list
    total = controls.height() + layer_list.height()
    if layer_list.height() < wanted and total > wanted:
        main_window.resizeDocks([controls, layer_list], [total - wanted, wanted], Qt.Orientation.Vertical)


FRONT_WIDGET = "Tumor placement"  # the first step of the demo


def dock_plugin_widgets(viewer) -> tuple[dict, list[str]]:
    """Dock every DiffTumor widget as tabs of one dock on the right, so the window fits a screen however
    many widgets the manifest has. "Tumor placement" (where a new user starts) is the tab in front.
    Returns ({display name: widget}, [names that failed to dock])."""
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QApplication

    main_window = viewer.window._qt_window
    # the right dock area runs the full height; bottom docks (three views) sit under the canvas
    main_window.setCorner(Qt.Corner.BottomRightCorner, Qt.DockWidgetArea.RightDockWidgetArea)
    main_window.setCorner(Qt.Corner.TopRightCorner, Qt.DockWidgetArea.RightDockWidgetArea)
    widgets: dict = {}
    docks = []
    failed: list[str] = []
    for name in plugin_widget_names():
        try:
            dock, widgets[name] = viewer.window.add_plugin_dock_widget(PLUGIN, name, tabify=bool(docks))
            docks.append(dock)
        except Exception as exc:  # a broken widget must not hide the others
            log.error("could not dock the '%s' widget: %s: %s", name, type(exc).__name__, exc)
            failed.append(name)
    QApplication.processEvents()
    if docks:
        docked = [n for n in plugin_widget_names() if n in widgets]
        front = docks[docked.index(FRONT_WIDGET)] if FRONT_WIDGET in docked else docks[0]
        front.raise_()
        arrange_window(viewer, docks)
    return widgets, failed


def handler(args) -> int:
    if args.organs is not None and args.ct is None:
        raise DiffTumorError(f"--organs {args.organs}: needs --ct (the CT the labels belong to)")
    for opt, path in (("--ct", args.ct), ("--organs", args.organs)):
        if path is not None and not path.exists():
            raise DiffTumorError(f"{opt} {path}: no such file or folder")
    if args.screenshot is not None:
        if args.screenshot.suffix.lower() != ".png":
            raise DiffTumorError(f"--screenshot {args.screenshot}: must end in .png")
        if not args.screenshot.resolve().parent.is_dir():
            raise DiffTumorError(f"--screenshot {args.screenshot}: folder {args.screenshot.parent} does not exist")
    _check_display()
    prefer_qt6()  # before anything imports qtpy
    layers = _load_layers(args)

    import napari

    quiet_qt_binding_notice()

    viewer = napari.Viewer(title="DiffTumor Studio", show=True)
    viewer.window.resize(*WINDOW_SIZE)
    for data, kwargs, layer_type in layers:
        getattr(viewer, f"add_{layer_type}")(data, **kwargs)
    widgets, failed = dock_plugin_widgets(viewer)
    ct_layer = viewer.layers[0]
    viewer.layers.selection.active = ct_layer
    if args.three_views and "Window / level" in widgets:
        widgets["Window / level"].toggle_three_views()
    viewer.window.resize(*WINDOW_SIZE)  # docking may have grown the window
    viewer.reset_view()

    if args.screenshot is None:
        napari.run()
        return 1 if failed else 0
    _save_screenshot(viewer, args.screenshot)
    viewer.close()
    print(f"wrote {args.screenshot}")
    return 1 if failed else 0


def _save_screenshot(viewer, path: Path) -> None:
    """Render the whole window (canvas + docked widgets) and write the PNG atomically."""
    import imageio.v3 as iio
    from qtpy.QtWidgets import QApplication

    from backend.io import atomic_write

    for _ in range(5):  # let the docks lay out and the canvas draw
        QApplication.processEvents()
    viewer.reset_view()
    QApplication.processEvents()
    image = viewer.screenshot(canvas_only=False, flash=False)
    with atomic_write(path, suffix=".png") as tmp:
        iio.imwrite(tmp, image)
