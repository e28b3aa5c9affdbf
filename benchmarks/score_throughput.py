#!/usr/bin/env python
"""Images/s of each scoring stage: MTCNN faces, every scorer, FID features, and of the whole set.

The images are the shipped real test photos (``builtin:test-faces``, prepared 512x512 crops), reused
cyclically with a little seeded pixel noise (so no two images have the same hash) and resized to
``--size``: faces are found and the identity models do real work. They are laid out as a small grid
(faces vary fastest, then prompts with the reference prompt first, then seeds) so CLIP's dCLIP has
reference images to read, as in a run. Each scorer is driven through its plugin class
(``SCORERS.load(name)(settings, ScoringContext(...))``) with ScoreItems built here; input faces are the
same crops. Per stage: the model is loaded (time shown, not counted), one warm-up batch runs (not
counted), the scorer's caches (input-face, prompt and reference-image embeddings) are emptied, then
every image is scored in batches of ``--batch-size``. The score command's own parquet/caching I/O is
not timed. Absolute numbers on a shared CPU mean little; read the shares.

    python benchmarks/score_throughput.py --n 16 --size 256 --device cpu      # smoke settings, CPU
    python3 benchmarks/score_throughput.py --device cuda --full-size           # real architectures

``--command`` measures the real ``score`` command instead (``f2d_bench.api.score``): the same images
are written as PNG files into an ``external`` run in a temporary directory, and each variant
(``--precision``, ``--workers``) scores a fresh copy of it from nothing, decoding the PNGs from disk.
Per stage, the wall time of the scoring thread (exclusive: decoding waited for inside the face stage
counts as decoding), images/s, the estimated wall time of one method's full protocol (16,400 images:
the fixed cost, i.e. setup and each stage's first batch with its model load, plus the rest at the
measured rate) and, per precision, the max/mean |delta| of every metric against fp32:

    python benchmarks/score_throughput.py --command --n 48 --size 512 --device cpu --precision fp32 bf16
"""

from __future__ import annotations

import argparse
import importlib.util
import hashlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

# Never contact the Hub (the GPU machines have no network): fail fast and say so instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from f2d_bench.config import ScoringConfig  # noqa: E402
from f2d_bench.devices import resolve_device  # noqa: E402
from f2d_bench.errors import ConfigError, ModelUnavailableError  # noqa: E402
from f2d_bench.faces.source import resolve_face_set  # noqa: E402
from f2d_bench.grid import ItemKey  # noqa: E402
from f2d_bench.prompts import load_prompt_set  # noqa: E402
from f2d_bench.scorers import DEFAULT_SCORERS, SCORERS  # noqa: E402
from f2d_bench.scorers.base import ScoreItem, ScoringContext  # noqa: E402
from f2d_bench.scoring.faces import choose_face  # noqa: E402

#: The smoke preset's scoring settings (f2d_bench/presets/smoke.yaml).
SMOKE_SETTINGS = {
    "adaface": {"weights": "random"},
    "sphereface": {"weights": "random"},
    "facenet": {"weights": "random"},
    "dlib": {},
    "clip": {"model": "ViT-B-32-quickgelu", "weights": "random"},
    "siglip": {"model": "tiny"},
}
#: The paper's architectures with seeded random weights.
FULL_SETTINGS = {
    "adaface": {"weights": "random"},
    "sphereface": {"weights": "random"},
    "facenet": {"weights": "random"},
    "dlib": {},
    "clip": {"model": "ViT-L-14-quickgelu", "weights": "random"},
    "siglip": {"model": "ViT-SO400M-14-SigLIP-384", "weights": "random"},
}


# -- images -------------------------------------------------------------------------------------------


def make_images(faces, n: int, size: int) -> list[Image.Image]:
    """``n`` RGB images: the face crops cyclically, resized to ``size``, plus seeded +-2 noise."""
    from f2d_bench.faces.imageio import read_image

    bases = [read_image(f.path).convert("RGB") for f in faces]
    images = []
    for i in range(n):
        base = bases[i % len(bases)]
        if base.size != (size, size):
            base = base.resize((size, size), Image.Resampling.BICUBIC)
        noise = np.random.default_rng(i).integers(-2, 3, size=(size, size, 3), dtype=np.int16)
        pixels = np.clip(np.asarray(base, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels, "RGB"))
    return images


def build_items(images, faces, prompt_set, detections, ref_dir: Path) -> list[ScoreItem]:
    """A grid in run order: faces fastest, then prompts (reference first), then seeds."""
    prompts = (prompt_set.reference,) + tuple(prompt_set.prompts)
    keys = []
    for i in range(len(images)):
        block = i // len(faces)
        keys.append(ItemKey("bench", faces[i % len(faces)].face_id, prompts[block % len(prompts)].id,
                            block // len(prompts)))
    ref_paths = {}
    for key, image in zip(keys, images):  # reference images are read from disk by dCLIP, as in a run
        if key.prompt_id == prompt_set.reference.id:
            path = ref_dir / f"{key.face_id}-{key.seed}.png"
            image.save(path)
            ref_paths[(key.face_id, key.seed)] = path
    items = []
    for key, image, det in zip(keys, images, detections):
        is_ref = key.prompt_id == prompt_set.reference.id
        items.append(ScoreItem(
            key=key, image=image, prompt=prompt_set.by_id(key.prompt_id),
            face=next(f for f in faces if f.face_id == key.face_id),
            reference_path=None if is_ref else ref_paths[(key.face_id, key.seed)], detection=det,
        ))
    return items


# -- SigLIP's tokenizer ---------------------------------------------------------------------------------

NOTES: list[str] = []


def allow_standin_siglip_tokenizer() -> None:
    """When a SigLIP model's real tokenizer (a Hub download) is not in the local cache, give load_clip
    f2d-bench's tiny sentencepiece tokenizer padded to the model's real context length instead.

    The text tower then runs the same computation (same architecture, same number of positions, since
    every text is padded to the context length); only the token ids differ, so the embeddings are not
    those of the real prompts, which random weights make meaningless anyway. Text embeddings are computed
    once per distinct prompt, so their share of a run's time is small; it is printed separately.
    """
    from open_clip.tokenizer import HFTokenizer

    from f2d_bench.scorers.text import clip_models, tiny

    original = clip_models._load_tokenizer

    def load_tokenizer(model_name, model_cfg, cache_dir):
        try:
            return original(model_name, model_cfg, cache_dir)
        except ModelUnavailableError:
            text_cfg = model_cfg.get("text_cfg", {})
            _, checkpoint = tiny.tiny_siglip_checkpoint()
            context = int(text_cfg.get("context_length", 64))
            NOTES.append(
                f"siglip: the real tokenizer of {model_name} ({text_cfg.get('hf_tokenizer_name')!r}) is a "
                "Hugging Face download and is not in the local cache; its text tower is timed with f2d-bench's "
                f"tiny sentencepiece tokenizer padded to the real context length {context}: the same text-tower "
                "compute, other token ids. The image tower is the real architecture either way."
            )
            return HFTokenizer(str(checkpoint.parent / tiny.TOKENIZER_DIR), context_length=context,
                               **text_cfg.get("tokenizer_kwargs", {}))

    clip_models._load_tokenizer = load_tokenizer


# -- timing ---------------------------------------------------------------------------------------------


class Timer:
    """``with timer() as t: ...`` then ``t.seconds``; synchronises CUDA at both ends."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self) -> "_Span":
        return _Span(self)


class _Span:
    def __init__(self, timer: Timer):
        self.timer = timer
        self.seconds = 0.0

    def __enter__(self):
        self.timer.sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.timer.sync()
        self.seconds = time.perf_counter() - self.start


def batches(seq, size):
    return [seq[i:i + size] for i in range(0, len(seq), size)]


def clear_caches(scorer) -> None:
    """Empty what a scorer remembers across batches, so the timed pass pays for it once, as a run does."""
    for attr in ("_input", "_text", "_ref_images"):
        cache = getattr(scorer, attr, None)
        if isinstance(cache, dict):
            cache.clear()


def count_text_time(scorer, timer: Timer) -> dict:
    """Wrap a text scorer's text_embeddings to add up its time and the prompts it encodes."""
    stats = {"seconds": 0.0, "encoded": 0}
    inner = scorer.text_embeddings

    def text_embeddings(texts):
        stats["encoded"] += len(set(texts) - set(scorer._text))
        timer.sync()
        t0 = time.perf_counter()
        out = inner(texts)
        timer.sync()
        stats["seconds"] += time.perf_counter() - t0
        return out

    scorer.text_embeddings = text_embeddings
    return stats


def load_model(scorer):
    return scorer.bundle() if hasattr(scorer, "bundle") else scorer.model()


def describe_model(name: str, scorer) -> str:
    if name == "dlib":
        import dlib

        return f"dlib {dlib.__version__}, CUDA {'on' if getattr(dlib, 'DLIB_USE_CUDA', False) else 'off: runs on the CPU'}"
    if hasattr(scorer, "bundle"):
        b = scorer.bundle()
        params = sum(p.numel() for p in b.model.parameters())
        pp = b.preprocess_cfg
        return f"{b.model_name}, {params / 1e6:.3g}M params, image {pp.get('size')}, context {b.context_length}"
    model = scorer.model()
    params = sum(p.numel() for p in model.parameters())
    extra = f", variant {scorer.settings['variant']}" if name == "sphereface" else ""
    return f"{type(model).__name__}{extra}, {params / 1e6:.1f}M params"


# -- the real score command -------------------------------------------------------------------------------

#: Images of one method's full protocol: 41 prompts (40 + the reference) x 100 faces x 4 seeds.
PROTOCOL_IMAGES = 16_400


class StageClock:
    """Exclusive wall time per stage of the scoring thread: a stage's time excludes the stages it calls
    (decoding waited for inside the face stage counts as decoding). A scorer's first batch (model load
    and warm-up) is kept apart, in ``first``, with its image count in ``first_images``."""

    def __init__(self, timer: Timer):
        self.timer = timer
        self.seconds: dict[str, float] = {}
        self.first: dict[str, float] = {}
        self.first_images: dict[str, int] = {}
        self.images: dict[str, int] = {}  # images of the batches in ``seconds`` (scorers only)
        self._stack: list[float] = []

    def wrap(self, owner, attr: str, name) -> None:
        """Time ``owner.attr`` as stage ``name`` (a string, or a function of the call's self giving
        (stage, images in this call))."""
        inner = getattr(owner, attr)
        clock = self

        def timed(*args, **kwargs):
            stage, n = (name, 0) if isinstance(name, str) else name(args[0])
            clock.timer.sync()
            start, clock._stack = time.perf_counter(), clock._stack + [0.0]
            try:
                return inner(*args, **kwargs)
            finally:
                clock.timer.sync()
                elapsed = time.perf_counter() - start
                children = clock._stack.pop()
                if clock._stack:
                    clock._stack[-1] += elapsed
                own = elapsed - children
                if n and stage not in clock.first:
                    clock.first[stage], clock.first_images[stage] = own, n
                else:
                    clock.seconds[stage] = clock.seconds.get(stage, 0.0) + own
                    clock.images[stage] = clock.images.get(stage, 0) + n

        setattr(owner, attr, timed)

    def fixed_seconds(self) -> float:
        """Setup, plus each scorer's first batch beyond what its images cost at the stage's later rate."""
        extra = 0.0
        for stage, sec in self.first.items():
            later = self.seconds.get(stage, 0.0) / self.images[stage] if self.images.get(stage) else 0.0
            extra += max(0.0, sec - later * self.first_images[stage])
        return self.seconds.get(SETUP, 0.0) + extra


SETUP = "setup (input faces, scorer objects)"


def instrument(timer: Timer) -> StageClock:
    from f2d_bench.scoring import score as score_module
    from f2d_bench.scoring.cached_scorer import ScoreBatcher
    from f2d_bench.scoring.decode import ImageDecoder
    from f2d_bench.scoring.faces import FaceStage

    clock = StageClock(timer)
    clock.wrap(score_module.ScoreSession, "__init__", SETUP)
    clock.wrap(FaceStage, "add", "faces (MTCNN)")
    clock.wrap(ScoreBatcher, "flush", lambda b: (f"scorer {b.cached.scorer.name}", len(b._queue)))
    clock.wrap(ImageDecoder, "load", "decode (scoring thread's share)")
    clock.wrap(ImageDecoder, "get", "decode (scoring thread's share)")
    return clock


def write_external_run(root: Path, images, faces, prompt_set, settings_table, args, device) -> Path:
    """An ``external`` run of ``images`` laid out like build_items' grid, imported with `generate`."""
    import yaml

    from f2d_bench.api import generate

    prompts = (prompt_set.reference,) + tuple(prompt_set.prompts)
    per_seed = len(faces) * len(prompts)
    source = root / "source"
    for i, image in enumerate(images):
        block = i % per_seed
        face, prompt, seed = faces[block % len(faces)], prompts[block // len(faces)], i // per_seed
        folder = source / face.face_id / prompt.id
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{seed}.png")
    n_seeds = -(-len(images) // per_seed)
    config = {"name": "score-bench", "faces": "builtin:test-faces", "prompts": args.prompts,
              "seeds": list(range(n_seeds)), "methods": [{"name": "external", "params": {"source": str(source)}}],
              "scoring": {"scorers": list(args.scorers), "device": str(device), "batch_size": args.batch_size,
                          "settings": {k: settings_table[k] for k in args.scorers}}}
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    generate(path, out=root / "run", progress=False)
    return root / "run"


def command_main(args, images, faces, prompt_set, settings_table, timer, device) -> int:
    import shutil

    import pandas as pd
    import yaml

    from f2d_bench.api import score
    from f2d_bench.scoring.decode import default_workers

    clock = instrument(timer)
    workers = args.workers if args.workers is not None else [default_workers()]
    variants = [(p, w) for p in args.precision for w in workers]
    if ("fp32", workers[0]) not in variants:
        variants.insert(0, ("fp32", workers[0]))  # the deltas' baseline
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = write_external_run(tmp, images, faces, prompt_set, settings_table, args, device)
        base_config = yaml.safe_load((tmp / "run.yaml").read_text(encoding="utf-8"))
        results = {}
        for precision, w in variants:
            copy = tmp / f"run-{precision}-{w}"
            shutil.copytree(run, copy, ignore=shutil.ignore_patterns("scores", "records.parquet", "table1.csv"))
            cfg = dict(base_config, scoring=dict(base_config["scoring"], precision=precision, workers=w,
                                                 block_size=args.block_size))
            cfg_path = tmp / f"score-{precision}-{w}.yaml"
            cfg_path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
            clock.__init__(timer)
            start = time.perf_counter()
            score(copy, config=cfg_path, progress=False)
            wall = time.perf_counter() - start
            records = pd.read_parquet(copy / "records.parquet")
            results[(precision, w)] = (wall, dict(clock.seconds), dict(clock.first), records, clock.fixed_seconds(),
                                       dict(clock.images))
        n = len(results[variants[0]][3])
        print(f"\nthe score command on {n} PNG files on disk ({args.size}x{args.size}), block {args.block_size}, "
              f"batch {args.batch_size}; each variant scores a fresh copy from nothing (models load each time)")
        base = results[("fp32", workers[0])]
        for (precision, w), (wall, seconds, first, records, fixed, images_done) in results.items():
            rate = n / max(wall - fixed, 1e-9)
            estimate = fixed + PROTOCOL_IMAGES / rate
            print(f"\n[precision {precision}, workers {w}] wall {wall:.2f} s, {n / wall:.2f} images/s "
                  f"({wall / base[0]:.2f}x the fp32 wall); fixed cost (setup, model loads) {fixed:.1f} s, "
                  f"the rest at {rate:.2f} images/s")
            print(f"  estimated wall time of one method's full protocol ({PROTOCOL_IMAGES} images) here: "
                  f"{estimate / 60:.1f} min ({estimate / 3600:.2f} h)")
            accounted = sum(seconds.values()) + sum(first.values())
            width = 40
            print(f"  {'stage':<{width}}{'seconds':>9}{'share':>8}{'images/s':>10}{'first batch s':>15}"
                  "   (images/s: of the later batches)")
            for stage in sorted(set(seconds) | set(first), key=lambda k: -(seconds.get(k, 0) + first.get(k, 0))):
                sec = seconds.get(stage, 0.0)
                share = 100 * (sec + first.get(stage, 0.0)) / wall
                imgs = images_done.get(stage) if stage in first else (0 if stage == SETUP else n)
                ips = f"{imgs / sec:>10.2f}" if sec > 0 and imgs else f"{'':>10}"
                fb = f"{first[stage]:>15.2f}" if stage in first else ""
                print(f"  {stage:<{width}}{sec:>9.2f}{share:>7.1f}%{ips}{fb}")
            other = wall - accounted
            print(f"  {'other (hashing, caches, records, table)':<{width}}{other:>9.2f}{100 * other / wall:>7.1f}%")
            if (precision, w) != ("fp32", workers[0]):
                metrics = [c for c in records.columns if c in base[3].columns and records[c].dtype.kind == "f"
                           and c not in ("face_prob",)]
                deltas = []
                for m in metrics:
                    d = (records[m] - base[3][m]).abs()
                    if d.notna().any():
                        deltas.append(f"{m} max {d.max():.3g} mean {d.mean():.3g}")
                print(f"  |{precision} - fp32| per metric: " + ("; ".join(deltas) or "no metric"))
                same = all(np.array_equal(records[m].to_numpy(), base[3][m].to_numpy(), equal_nan=True)
                           for m in metrics)
                print(f"  records bit-identical to [fp32, workers {workers[0]}]: {same}")
    return 0


# -- main -----------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--n", type=int, default=64, help="images to score")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--prompts", default="human40", help="prompt set the grid's prompts come from")
    ap.add_argument("--full-size", action="store_true",
                    help="the paper's architectures with random weights (CLIP ViT-L/14, SigLIP SO400M/14-384); "
                         "default: the smoke preset's settings (CLIP ViT-B/32 random, tiny SigLIP)")
    ap.add_argument("--clip-model", help="override CLIP's open_clip model (random weights; 'tiny': the tiny model)")
    ap.add_argument("--siglip-model", help="override SigLIP's open_clip model (random weights; 'tiny': the tiny model)")
    # dlib is a pip build some GPU machines lack: by default it is left out there, as generate_throughput does
    installed = [n for n in DEFAULT_SCORERS if n != "dlib" or importlib.util.find_spec("dlib") is not None]
    ap.add_argument("--scorers", nargs="+", default=installed, choices=list(DEFAULT_SCORERS),
                    help="default: every default scorer installed here")
    ap.add_argument("--command", action="store_true",
                    help="measure the real score command on PNG files on disk (see the module docstring)")
    ap.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "tf32", "bf16"],
                    help="--command: scoring.precision variants (deltas printed against fp32)")
    ap.add_argument("--workers", nargs="+", type=int, default=None,
                    help="--command: scoring.workers variants (default: the machine's default)")
    ap.add_argument("--block-size", type=int, default=256, help="--command: scoring.block_size")
    args = ap.parse_args()
    if args.n < 1 or args.batch_size < 1 or args.size < 32:
        ap.error("--n and --batch-size must be >= 1, --size >= 32")

    try:
        device = resolve_device(args.device)
    except ConfigError as exc:
        ap.error(str(exc))
    timer = Timer(device)
    settings_table = {k: dict(v) for k, v in (FULL_SETTINGS if args.full_size else SMOKE_SETTINGS).items()}
    for name, model in (("clip", args.clip_model), ("siglip", args.siglip_model)):
        if model:
            settings_table[name] = {"model": model} if model == "tiny" else {"model": model, "weights": "random"}
    allow_standin_siglip_tokenizer()

    if device.type == "cuda":
        dev_name = torch.cuda.get_device_name(device)
        dev_line = (f"{device} ({dev_name}), fp32 models, float32 matmul precision "
                    f"{torch.get_float32_matmul_precision()!r} (as the score command leaves it)")
    else:
        dev_line = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads), fp32"
    print(f"device {dev_line}; torch {torch.__version__}, python {platform.python_version()}")

    scoring = ScoringConfig()
    faces = resolve_face_set("builtin:test-faces")
    prompt_set = load_prompt_set(args.prompts)
    images = make_images(faces, args.n, args.size)
    distinct = len({hashlib.sha256(im.tobytes()).hexdigest() for im in images})
    n_prompts = min(-(-args.n // len(faces)), len(prompt_set.prompts) + 1)
    print(f"images: {args.n} ({distinct} distinct sha256) from the {len(faces)} shipped test faces, "
          f"{args.size}x{args.size}; grid: {len(faces)} faces x {n_prompts} prompts of {prompt_set.name!r} "
          f"(reference first) x seeds; batch {args.batch_size}"
          + ("" if args.command else ", 1 warm-up batch per stage not counted"))
    print(f"settings: {'--full-size (real architectures, random weights)' if args.full_size else 'smoke preset'}: "
          + ", ".join(f"{k} {settings_table[k]}" for k in args.scorers))

    if args.command:
        return command_main(args, images, faces, prompt_set, settings_table, timer, device)

    rows: list[tuple[str, float | None, float | None, str]] = []  # stage, seconds, load seconds, note
    failed = []

    # -- stage 1: faces -----------------------------------------------------------------------------
    from f2d_bench.faces.detect import DETECTOR_NAME, FaceDetector

    detector = FaceDetector(device=str(device))
    with timer() as t_load:
        detector._model()
    for image in images[:args.batch_size]:  # warm-up
        detector.detect(image)
    detections = []
    with timer() as t:
        for image in images:
            pick, _ = choose_face(detector.detect(image), scoring.face_policy, scoring.min_face_prob)
            detections.append(pick)
    found = sum(d is not None for d in detections)
    rows.append((f"faces ({DETECTOR_NAME})", t.seconds, t_load.seconds,
                 f"{found}/{args.n} faces, policy {scoring.face_policy}, per image as the score command"))
    from f2d_bench.faces.imageio import read_image

    input_detections = {f.face_id: choose_face(detector.detect(read_image(f.path)), "largest", 0.0)[0]
                        for f in faces}
    missing = [fid for fid, d in input_detections.items() if d is None]
    if missing:
        print(f"warning: no face in input faces {missing}; identity scorers will fail on them")

    context = ScoringContext(prompt_set=prompt_set, device=str(device), input_detections=input_detections)
    with tempfile.TemporaryDirectory() as tmp:
        items = build_items(images, faces, prompt_set, detections, Path(tmp))
        warm = items[:args.batch_size]

        # -- stage 2: scorers -------------------------------------------------------------------------
        for name in args.scorers:
            settings = dict(settings_table[name])
            try:
                scorer = SCORERS.load(name)(settings, context)
                with timer() as t_load:
                    load_model(scorer)
                desc = describe_model(name, scorer)
                scorer.score(warm)
                clear_caches(scorer)
                text_stats = count_text_time(scorer, timer) if hasattr(scorer, "bundle") else None
                with timer() as t:
                    for batch in batches(items, args.batch_size):
                        values = scorer.score(batch)
                        assert len(values) == len(batch)
            except Exception as exc:  # one stage's failure should not cost the other stages' figures
                failed.append(name)
                print(f"  {name}: FAILED ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})")
                rows.append((name, None, None, "failed"))
                continue
            note = f"{desc}; settings {settings}"
            if text_stats is not None:
                note += (f"; text tower {text_stats['seconds']:.2f} s for {text_stats['encoded']} distinct "
                         "prompts (once per prompt in a run)")
            rows.append((name, t.seconds, t_load.seconds, note))
            del scorer
            if device.type == "cuda":
                torch.cuda.empty_cache()

    # -- FID features ---------------------------------------------------------------------------------
    from f2d_bench.scorers.fid.backends import CLEAN_FID_TORCHSCRIPT, make_backend

    try:
        backend = make_backend(CLEAN_FID_TORCHSCRIPT, device=str(device), batch_size=args.batch_size)
        with timer() as t_load:
            backend.model()
        backend.features(images[:args.batch_size])
        with timer() as t:
            for batch in batches(images, args.batch_size):
                backend.features(batch)
        rows.append((f"FID features ({CLEAN_FID_TORCHSCRIPT})", t.seconds, t_load.seconds,
                     f"Inception pool3, weights {backend.describe()['weights']} (offline), clean resize on the CPU"))
    except Exception as exc:
        failed.append("fid")
        print(f"  FID: FAILED ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})")
        rows.append((f"FID features ({CLEAN_FID_TORCHSCRIPT})", None, None, "failed"))

    # -- table ----------------------------------------------------------------------------------------
    total = sum(s for _, s, _, _ in rows if s is not None)
    if total <= 0:
        print("every stage failed; nothing to report")
        return 1
    width = max(len(r[0]) for r in rows) + 2
    print()
    print(f"{'stage':<{width}}{'images/s':>10}{'seconds':>10}{'share':>8}{'load s':>9}   (load and warm-up not counted)")
    for stage, seconds, load, _ in rows:
        if seconds is None:
            print(f"{stage:<{width}}{'failed':>10}")
            continue
        print(f"{stage:<{width}}{args.n / seconds:>10.2f}{seconds:>10.2f}{100 * seconds / total:>7.1f}%{load:>9.2f}")
    label = "whole set" + (f" (without {', '.join(failed)})" if failed else "")
    print(f"{label:<{width}}{args.n / total:>10.2f}{total:>10.2f}{100.0:>7.1f}%")
    print()
    print("stages:")
    for stage, seconds, _, note in rows:
        print(f"  {stage}: {note}")
    notes = list(dict.fromkeys(NOTES))
    notes.append("identity scorers: images with no face get 0.0 without any work (see the faces row)")
    if "dlib" in args.scorers and device.type == "cuda":
        import dlib

        if not getattr(dlib, "DLIB_USE_CUDA", False):
            notes.append("dlib: this dlib build has no CUDA, so the dlib row is CPU time whatever --device says")
    notes.append("random weights everywhere except MTCNN, dlib and the FID Inception: timings only, "
                 "the scores are meaningless")
    print("notes:")
    for note in notes:
        print(f"  - {note}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
