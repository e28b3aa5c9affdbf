"""``external``: images that another tool made, imported into the run by key.

Expected layout: ``DIR/<face_id>/<prompt_id>/<seed>.<png|jpg|jpeg|webp>``, with the reference prompt's
images under its id (``ref``). Nothing is guessed: a missing image stays missing and is reported, an
unreadable one is reported, files that match no key of the grid are listed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from PIL import Image

from f2d_bench.errors import ConfigError, F2DBenchError
from f2d_bench.faces.imageio import read_image
from f2d_bench.methods.base import GenerationRequest, Method, MethodContext, Skipped

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


class ExternalMethod(Method):
    name = "external"
    summary = "imports images another tool made"
    defaults = {"source": None, "trained_params": None}
    uses_pipeline = False

    def __init__(self, params, context: MethodContext):
        super().__init__(params, context)
        if not self.params["source"]:
            raise ConfigError("method external: params.source (a directory of images) is required")
        self.source = Path(self.params["source"]).expanduser()
        if not self.source.is_dir():
            raise ConfigError(f"method external: params.source {self.source} is not a directory")

    def identity(self) -> dict:
        # The source directory's absolute path identifies the imported set.
        return {"method": self.name, "source": str(self.source.resolve())}

    def info(self) -> dict:
        return {"trained_params": self.params["trained_params"], "weights": "external", "source": str(self.source)}

    def _candidates(self, face_id: str, prompt_id: str, seed: int) -> list[Path]:
        folder = self.source / face_id / prompt_id
        return [p for ext in IMAGE_EXTENSIONS if (p := folder / f"{seed}{ext}").is_file()]

    def preflight(self, face_ids: Sequence[str], prompt_ids: Sequence[str], seeds: Sequence[int]) -> list[str]:
        problems = []
        faces, prompts = set(face_ids), set(prompt_ids)
        seed_names = {str(s) for s in seeds}
        for face_dir in sorted(p for p in self.source.iterdir() if not p.name.startswith(".")):
            if not face_dir.is_dir() or face_dir.name not in faces:
                problems.append(f"{face_dir}: not a face of this run; ignored")
                continue
            for prompt_dir in sorted(face_dir.iterdir()):
                if not prompt_dir.is_dir() or prompt_dir.name not in prompts:
                    problems.append(f"{prompt_dir}: not a prompt id of this run; ignored")
                    continue
                for f in sorted(prompt_dir.iterdir()):
                    if f.suffix.lower() not in IMAGE_EXTENSIONS or f.stem not in seed_names:
                        problems.append(f"{f}: expected <seed>{'|'.join(IMAGE_EXTENSIONS)} with seed in "
                                        f"{sorted(seeds)}; ignored")
        return problems

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Image.Image | Skipped]:
        out: list[Image.Image | Skipped] = []
        for r in requests:
            k = r.key
            found = self._candidates(k.face_id, k.prompt_id, k.seed)
            where = self.source / k.face_id / k.prompt_id / f"{k.seed}.*"
            if not found:
                out.append(Skipped(f"missing: no image at {where}"))
            elif len(found) > 1:
                out.append(Skipped(f"ambiguous: {', '.join(p.name for p in found)} in {found[0].parent}"))
            else:
                try:
                    out.append(read_image(found[0]))
                except F2DBenchError as exc:
                    out.append(Skipped(f"unreadable: {exc}"))
        return out
