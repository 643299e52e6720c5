"""The synthetic world's scenes: determinism, drawing that matches the annotations, COCO files pycocotools loads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from muffin.world.scenes import (
    BACKGROUND,
    Scene,
    WorldConfig,
    WorldObject,
    coco_instances,
    image_id_of,
    load_scenes,
    make_scene,
    polygon_area,
    render,
    write_world,
)
from muffin.world.shapes import CLASSES, COLOURS, PARTNER, SHAPES, check_vocabulary, synonym_table_lines


def test_vocabulary_invariants():
    """At least 12 classes and 6 colours; every class has an outline and a partner; no surface form is shared."""
    check_vocabulary()
    assert len(CLASSES) >= 12 and len(COLOURS) == 6
    assert all(PARTNER[PARTNER[c]] == c and PARTNER[c] != c for c in CLASSES)


def test_same_seed_same_scene_and_pixels():
    cfg = WorldConfig(seed=3)
    a, b = make_scene(cfg, "test", 17), make_scene(cfg, "test", 17)
    assert a.to_record() == b.to_record()
    assert np.array_equal(np.asarray(render(a)), np.asarray(render(b)))
    # a scene depends on its own index only, and another seed gives another world
    assert make_scene(cfg, "test", 18).to_record() != a.to_record()
    assert make_scene(WorldConfig(seed=4), "test", 17).to_record() != a.to_record()


def test_scene_layout_respects_config():
    """1..5 objects, one per grid cell, each box inside its cell (cell side = size / 3)."""
    cfg = WorldConfig(image_size=60)
    for i in range(200):
        sc = make_scene(cfg, "sft", i)
        assert 1 <= len(sc.objects) <= 5
        cells = [o.cell for o in sc.objects]
        assert cells == sorted(set(cells))
        for o in sc.objects:
            row, col = divmod(o.cell, 3)
            x, y, w, h = o.bbox
            assert col * 20 - 0.01 <= x and x + w <= (col + 1) * 20 + 0.01
            assert row * 20 - 0.01 <= y and y + h <= (row + 1) * 20 + 0.01


def test_pixels_match_annotations():
    """A square's centre pixel has its colour, an empty cell's centre is background, and the coloured pixels of an
    object lie inside its annotated box (checked on a hand-made scene, not through the sampler)."""
    poly = [[x for px, py in SHAPES["square"][0] for x in (32 + px * 12, 32 + py * 12)]]
    xs, ys = poly[0][0::2], poly[0][1::2]
    bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
    sc = Scene("test", 0, 1, 64, [WorldObject("square", "blue", 4, bbox, poly)])
    img = np.asarray(render(sc)).astype(int)
    assert tuple(img[32, 32]) == COLOURS["blue"]
    assert tuple(img[8, 8]) == BACKGROUND
    mask = np.abs(img - np.array(BACKGROUND)).sum(-1) > 30
    rows, cols = np.nonzero(mask)
    assert bbox[0] - 1 <= cols.min() and cols.max() <= bbox[0] + bbox[2] + 1
    assert bbox[1] - 1 <= rows.min() and rows.max() <= bbox[1] + bbox[3] + 1
    # the square is 0.85 * 12 * 2 = 20.4 px wide: area 416.16 by hand
    assert polygon_area(poly[0]) == pytest.approx(20.4**2)


def test_coco_file_loads_with_pycocotools(tmp_path):
    pycocotools = pytest.importorskip("pycocotools.coco")
    cfg = WorldConfig()
    out = write_world(tmp_path / "w", cfg, {"test": 12}, progress=False)
    coco = pycocotools.COCO(str(out / "test" / "instances.json"))
    scenes = load_scenes(out, "test")
    assert sorted(coco.getImgIds()) == [image_id_of("test", i) for i in range(12)]
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == CLASSES
    for sc in scenes:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[sc.image_id]))
        names = sorted(coco.loadCats(a["category_id"])[0]["name"] for a in anns)
        assert names == sorted(o.cls for o in sc.objects)
        assert all(coco.annToMask(a).sum() > 0 for a in anns)  # polygons rasterise
        assert (out / "test" / "images" / sc.file_name).is_file()
    # the synonym table: one line per class, canonical first, plurals listed
    lines = (out / "synonyms.txt").read_text().splitlines()
    assert lines == synonym_table_lines() and [ln.split(", ")[0] for ln in lines] == CLASSES
    assert "crosses" in lines[CLASSES.index("cross")].split(", ")


def test_coco_instances_counts():
    scenes = [make_scene(WorldConfig(), "val", i) for i in range(5)]
    inst = coco_instances(scenes)
    assert len(inst["images"]) == 5
    assert len(inst["annotations"]) == sum(len(s.objects) for s in scenes)
    assert len({a["id"] for a in inst["annotations"]}) == len(inst["annotations"])
    json.dumps(inst)  # serialisable


def test_config_validation_names_the_fix():
    with pytest.raises(ValueError, match="max_objects"):
        WorldConfig(max_objects=10)
    with pytest.raises(ValueError, match="p_partner"):
        WorldConfig(p_partner=1.5)
    with pytest.raises(ValueError, match="unknown split"):
        image_id_of("holdout", 0)
