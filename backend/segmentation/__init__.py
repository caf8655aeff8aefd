"""Stage 3: segmentation trained with tumours synthesized on the fly, and the paper's evaluation.

* :mod:`.metrics`: per-case DSC, NSD (surface Dice at a tolerance in mm), tumour-wise detection.
* :mod:`.evaluate`: score prediction files against labels -> ``cases.csv``, summary tables, figure.
* :mod:`.networks`: U-Net / nnU-Net (DynUNet) / SwinUNETR by name.
* :mod:`.transforms`: ``RandTumorSynthesisd``, the on-the-fly synthesis map transform.
"""
