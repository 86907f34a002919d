"""The network: the interface the training core calls (``interface.BevModel``), BEVFormer
(backbone + FPN, encoder, deformable attention) and the geometry it differentiates through
(BEV warp, reprojection into the cameras). Imports only the top of ``model`` (configs, presets,
geometry, names) and itself."""
