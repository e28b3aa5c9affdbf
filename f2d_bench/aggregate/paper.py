"""The published numbers of Face2Diffusion (Shiohara & Yamasaki, CVPR 2024), Tables 1 and 2, as data.

Values are copied exactly from the paper (PROTOCOL.md section 3). Methods are indexed by
the paper's names; ``PAPER_METHOD_KEYS`` maps this harness's method names to them where one exists.

Table 1's hMean and gMean are means of per-image harmonic / geometric means of the six metrics (after
clamping at 0), not the means of the column averages: for Face2Diffusion the harmonic mean of the six
column values is 0.316 and the geometric mean 0.333, while the paper reports 0.1749 and 0.2252. So the
hmean and gmean columns cannot be recomputed from the other columns of this table.
"""

from __future__ import annotations

import pandas as pd


__all__ = ["PAPER_COLUMNS", "PAPER_METHOD_KEYS", "PAPER_SOURCE", "PAPER_TABLE1", "PAPER_TABLE2"]

PAPER_SOURCE = "Shiohara & Yamasaki, CVPR 2024, Tables 1 and 2"

#: Table 1's columns as the paper prints them, under the names of this harness's metrics.
PAPER_COLUMNS = ("adaface", "sphereface", "facenet", "clip", "dclip", "siglip", "hmean", "gmean")
PAPER_IDENTITY = PAPER_COLUMNS[:3]
PAPER_TEXT = PAPER_COLUMNS[3:6]

# method: AdaFace, SphereFace, FaceNet, CLIP, dCLIP, SigLIP, hMean, gMean (the order of PAPER_COLUMNS)
_TABLE1 = {
    "TextualInversion": (0.1654, 0.2518, 0.3197, 0.1877, 0.1075, 0.1283, 0.0320, 0.0575),
    "DreamBooth": (0.3482, 0.4084, 0.4774, 0.2351, 0.1480, 0.3452, 0.0689, 0.1116),
    "CustomDiffusion": (0.4537, 0.5624, 0.6458, 0.2023, 0.1490, 0.2182, 0.1078, 0.1700),
    "Perfusion": (0.0925, 0.1478, 0.1887, 0.2490, 0.1686, 0.3433, 0.0342, 0.0575),
    "E4T": (0.0433, 0.1190, 0.1725, 0.2510, 0.1784, 0.2671, 0.0370, 0.0589),
    "CelebBasis": (0.1601, 0.2724, 0.3762, 0.2563, 0.1847, 0.3624, 0.1138, 0.1542),
    "FastComposer": (0.1736, 0.3271, 0.4725, 0.2495, 0.2149, 0.3168, 0.1655, 0.2120),
    "ELITE": (0.0924, 0.1925, 0.3232, 0.1755, 0.1250, 0.0671, 0.0308, 0.0624),
    "DreamIdentity": (0.2847, 0.4252, 0.5523, 0.1924, 0.1463, 0.1539, 0.0849, 0.1326),
    "Face2Diffusion": (0.3143, 0.4215, 0.5313, 0.2486, 0.2020, 0.3856, 0.1749, 0.2252),
}

#: Table 1 of the paper: 10 methods (paper order) x PAPER_COLUMNS.
PAPER_TABLE1 = pd.DataFrame.from_dict(_TABLE1, orient="index", columns=list(PAPER_COLUMNS))
PAPER_TABLE1.index.name = "method"

#: Table 2 of the paper: FID against human-centric CC12M images, trained parameters and encoding time per
#: face on one NVIDIA A100 (seconds).
PAPER_TABLE2 = pd.DataFrame.from_dict(
    {
        "CustomDiffusion": (86.18, 5.71e7, 140.0),
        "CelebBasis": (69.87, 1024, 220.0),
        "FastComposer": (77.62, 8.88e8, 0.026),
        "Face2Diffusion": (69.33, 1.20e7, 0.006),
    },
    orient="index",
    columns=["fid", "trained_params", "encode_seconds"],
)
PAPER_TABLE2.index.name = "method"

#: This harness's method names -> the paper's method names (methods the harness runs itself).
PAPER_METHOD_KEYS = {"f2d": "Face2Diffusion"}
