"""Input faces: detection (MTCNN), FFHQ and ArcFace alignment, face sets and their preparation.

Importing this package is cheap; torch and MTCNN load on the first detection.
"""

from f2d_bench.faces.faceset import Face, load_face_set, sanitize_face_id

__all__ = ["Face", "load_face_set", "sanitize_face_id"]
