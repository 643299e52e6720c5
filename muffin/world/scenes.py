"""Deterministic scenes of coloured shapes, drawn with PIL, with exact COCO-instances ground truth.

A scene is 1-5 objects on a 3 x 3 grid (one object per cell). ``make_scene(seed, split, index)`` depends only on
its three arguments, so scene 17 of split "test" is the same image and annotation whatever else is generated.
``write_world`` writes the images, ``instances.json`` per split (loadable with pycocotools and scored unchanged
by the Object HalBench code) and the world's synonym table.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from muffin.world.shapes import CELL_NAMES, CLASSES, COLOURS, PARTNER, RING_HOLE, SHAPES, synonym_table_lines
from utils.io import atomic_write_json, atomic_write_text, read_jsonl

logger = logging.getLogger(__name__)

SUPERSAMPLE = 4  # draw at 4x and downsample, so edges are anti-aliased (and still deterministic)
BACKGROUND = (245, 245, 240)


@dataclass(frozen=True)
class WorldConfig:
    """How scenes are sampled; stored in the world's manifest so a world can be rebuilt exactly."""

    seed: int = 0
    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 5
    p_partner: float = 0.6  # P(next object is the usual partner of one already present, when one is missing)
    p_repeat: float = 0.15  # P(next object copies the class and colour of one already present: counting)
    min_scale: float = 0.6  # object size as a fraction of its grid cell
    max_scale: float = 0.95

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects <= 9:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects <= 9 (one object per grid cell), got "
                f"{self.min_objects}..{self.max_objects}"
            )
        if self.image_size < 24:
            raise ValueError(f"image_size {self.image_size} is too small to draw shapes; use >= 24")
        for name in ("p_partner", "p_repeat"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if not 0.2 <= self.min_scale <= self.max_scale <= 1:
            raise ValueError(f"need 0.2 <= min_scale <= max_scale <= 1, got {self.min_scale}..{self.max_scale}")


@dataclass
class WorldObject:
    """One drawn object: class, colour, grid cell and its box ``[x, y, w, h]`` in pixels (COCO convention)."""

    cls: str
    colour: str
    cell: int
    bbox: list[float]
    polygons: list[list[float]] = field(default_factory=list)  # COCO segmentation: flat [x1, y1, x2, y2, ...]

    @property
    def position(self) -> str:
        return CELL_NAMES[self.cell]


@dataclass
class Scene:
    """A scene's ground truth; ``objects`` are sorted in reading order (by grid cell)."""

    split: str
    index: int
    image_id: int
    size: int
    objects: list[WorldObject]

    @property
    def file_name(self) -> str:
        return f"{self.split}_{self.index:06d}.png"

    def classes(self) -> set[str]:
        return {o.cls for o in self.objects}

    def to_record(self) -> dict[str, Any]:
        return {
            "image_id": self.image_id,
            "split": self.split,
            "index": self.index,
            "file_name": self.file_name,
            "size": self.size,
            "objects": [asdict(o) for o in self.objects],
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Scene:
        return cls(
            rec["split"], rec["index"], rec["image_id"], rec["size"], [WorldObject(**o) for o in rec["objects"]]
        )


# sft: the base policy's supervised data; feedback: prompts of the alignment loop; val: checkpoint selection;
# test: the held-out benchmark. Image ids are unique across splits.
SPLIT_OFFSETS = {"sft": 1_000_000, "feedback": 2_000_000, "val": 3_000_000, "test": 4_000_000}


def image_id_of(split: str, index: int) -> int:
    """COCO image id: ``SPLIT_OFFSETS[split] + index`` (unique across splits)."""
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"unknown split '{split}'. Available: {', '.join(SPLIT_OFFSETS)}.")
    return SPLIT_OFFSETS[split] + index


def _sample_classes(rng: random.Random, n: int, cfg: WorldConfig) -> list[tuple[str, str]]:
    picked: list[tuple[str, str]] = []
    while len(picked) < n:
        present = {c for c, _ in picked}
        missing_partners = sorted({PARTNER[c] for c in present} - present)
        u_partner, u_repeat = rng.random(), rng.random()
        if picked and missing_partners and u_partner < cfg.p_partner:
            picked.append((rng.choice(missing_partners), rng.choice(list(COLOURS))))
        elif picked and u_repeat < cfg.p_repeat:
            picked.append(rng.choice(picked))
        else:
            picked.append((rng.choice(CLASSES), rng.choice(list(COLOURS))))
    return picked


def make_scene(cfg: WorldConfig, split: str, index: int) -> Scene:
    """Sample scene ``index`` of ``split``; a pure function of (cfg, split, index)."""
    rng = random.Random(f"rlaifv-world:{cfg.seed}:{split}:{index}")  # str seeds hash with sha512: stable
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    cells = sorted(rng.sample(range(9), n))
    picked = _sample_classes(rng, n, cfg)
    rng.shuffle(picked)
    cell_px = cfg.image_size / 3
    objects = []
    for cell, (cls, colour) in zip(cells, picked):
        side = rng.uniform(cfg.min_scale, cfg.max_scale) * cell_px
        row, col = divmod(cell, 3)
        x0 = col * cell_px + rng.uniform(0, cell_px - side)
        y0 = row * cell_px + rng.uniform(0, cell_px - side)
        polys = [
            [round(v, 2) for x, y in poly for v in (x0 + (x + 1) / 2 * side, y0 + (y + 1) / 2 * side)]
            for poly in SHAPES[cls]
        ]
        xs = [v for p in polys for v in p[0::2]]
        ys = [v for p in polys for v in p[1::2]]
        bbox = [round(min(xs), 2), round(min(ys), 2), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)]
        objects.append(WorldObject(cls, colour, cell, bbox, polys))
    return Scene(split, index, image_id_of(split, index), cfg.image_size, objects)


def render(scene: Scene) -> Image.Image:
    """Draw a scene: each object's polygons filled in its colour on a plain background."""
    s = SUPERSAMPLE
    img = Image.new("RGB", (scene.size * s, scene.size * s), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        for poly in obj.polygons:
            draw.polygon([(poly[i] * s, poly[i + 1] * s) for i in range(0, len(poly), 2)], fill=COLOURS[obj.colour])
        if obj.cls == "ring":
            x, y, w, h = obj.bbox
            cx, cy, r = (x + w / 2) * s, (y + h / 2) * s, RING_HOLE * w / 2 * s
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=BACKGROUND)
    return img.resize((scene.size, scene.size), Image.Resampling.LANCZOS)


def polygon_area(flat: list[float]) -> float:
    """Shoelace area of a flat ``[x1, y1, x2, y2, ...]`` polygon."""
    xs, ys = flat[0::2], flat[1::2]
    n = len(xs)
    return abs(sum(xs[i] * ys[(i + 1) % n] - xs[(i + 1) % n] * ys[i] for i in range(n))) / 2


def coco_instances(scenes: list[Scene]) -> dict[str, Any]:
    """COCO instances dict for ``scenes`` (category ids 1..K in ``CLASSES`` order)."""
    cat_id = {c: i + 1 for i, c in enumerate(CLASSES)}
    images, anns = [], []
    for sc in scenes:
        images.append({"id": sc.image_id, "file_name": sc.file_name, "width": sc.size, "height": sc.size})
        for obj in sc.objects:
            area = sum(polygon_area(p) for p in obj.polygons)
            if obj.cls == "ring":
                area *= 1 - RING_HOLE**2
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": sc.image_id,
                    "category_id": cat_id[obj.cls],
                    "bbox": obj.bbox,
                    "area": round(area, 2),
                    "iscrowd": 0,
                    "segmentation": obj.polygons,
                    "attributes": {"colour": obj.colour, "position": obj.position},
                }
            )
    return {
        "info": {"description": "RLAIF-V synthetic shape world", "version": "1"},
        "licenses": [],
        "images": images,
        "annotations": anns,
        "categories": [{"id": cat_id[c], "name": c, "supercategory": "shape"} for c in CLASSES],
    }


def write_world(out_dir: str | Path, cfg: WorldConfig, splits: dict[str, int], *, progress: bool = True) -> Path:
    """Write ``{split}/images/*.png``, ``{split}/instances.json``, ``{split}/scenes.jsonl`` and ``synonyms.txt``.

    Images already on disk are kept (they are a pure function of the config), so a rerun after a crash only draws
    what is missing; the JSON files are rewritten atomically.
    """
    out = Path(out_dir)
    atomic_write_text(out / "synonyms.txt", "\n".join(synonym_table_lines()) + "\n")
    for split, n in splits.items():
        scenes = [make_scene(cfg, split, i) for i in range(n)]
        img_dir = out / split / "images"
        img_dir.mkdir(parents=True, exist_ok=True)
        for sc in tqdm(scenes, desc=f"draw {split}", disable=not progress):
            path = img_dir / sc.file_name
            if not path.exists():
                tmp = path.with_suffix(".tmp.png")
                render(sc).save(tmp)
                tmp.replace(path)
        atomic_write_json(out / split / "instances.json", coco_instances(scenes))
        atomic_write_text(out / split / "scenes.jsonl", "".join(json.dumps(sc.to_record()) + "\n" for sc in scenes))
        logger.info(
            "world split '%s': %d scenes, %d objects -> %s", split, n, sum(len(s.objects) for s in scenes), out / split
        )
    return out


def load_scenes(world_dir: str | Path, split: str) -> list[Scene]:
    """Read back the scenes of a split written by ``write_world``."""
    path = Path(world_dir) / split / "scenes.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; build the world first (python -m muffin.world.build --out {world_dir})"
        )
    return [Scene.from_record(r) for r in read_jsonl(path)]
