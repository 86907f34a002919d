"""Interop with the OpenMMLab stack (the ``openmmlab`` extra): official BEVFormer checkpoints and
mmdet3d nuScenes info files. Neither module imports mmcv, mmdet or mmdet3d: the files they read
are plain pickles and state dicts, so the core keeps working without the extra.
"""
