"""Blinded reader studies (Visual Turing Test): design, sessions, statistics, reports.

``study`` needs neither napari nor Qt; the reading widget lives in ``difftumor_napari._qt.reading_widget``.
"""
