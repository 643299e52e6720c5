"""The base-policy bootstrap: what trains, what stays frozen, and a checkpoint that load_family loads."""

from __future__ import annotations

import json
import math

import pytest
import torch

from muffin.world.bootstrap import BootstrapConfig, bootstrap, lr_at, sft_train
from muffin.world.build import build_world
from muffin.world.scenes import Scene, WorldObject
from muffin.world.shapes import CLASSES, COLOURS
from muffin.world.vision import cell_labels

TINY = {
    "vision_hidden": 32,
    "text_hidden": 64,
    "text_layers": 2,
    "batch_size": 4,
    "vision_steps": 2,
    "align_steps": 2,
    "steps": 2,
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    path = tmp_path_factory.mktemp("world")
    # 24 SFT scenes: their descriptions name every place word often enough to be one token (projector alignment)
    build_world(path, splits={"sft": 24, "feedback": 3, "val": 3, "test": 3}, progress=False)
    return path


def test_cell_labels_by_hand():
    sc = Scene(
        "test", 0, 1, 64, [WorldObject("star", "red", 2, [0, 0, 1, 1]), WorldObject("tree", "blue", 4, [0, 0, 1, 1])]
    )
    cls, col = cell_labels(sc)
    assert cls == [0, 0, 1 + CLASSES.index("star"), 0, 1 + CLASSES.index("tree"), 0, 0, 0, 0]
    assert col == [0, 0, 1 + list(COLOURS).index("red"), 0, 1 + list(COLOURS).index("blue"), 0, 0, 0, 0]


def test_lr_schedule():
    """Warm-up reaches lr at the end of warm-up; cosine ends at 10% of lr (derived from the formula by hand)."""
    cfg = BootstrapConfig(steps=100, warmup_steps=10, lr=1e-3)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(100, cfg) == pytest.approx(1e-4)


def test_bootstrap_saves_a_loadable_checkpoint_and_trains_the_right_weights(world, tmp_path):
    from muffin.decoding import GREEDY
    from muffin.family import Sample, load_family
    from muffin.inference import generate
    from muffin.world.bootstrap import load_images
    from utils.io import read_jsonl

    out = bootstrap(world, tmp_path / "base", BootstrapConfig(**TINY), progress=False)
    fam = load_family(out, device="cpu")
    assert fam.model.config.vision_config.image_size == 48 and fam.num_image_tokens == 9
    assert (out / "manifest.json").is_file() and (out / "bootstrap_log.json").is_file()
    # the tower's accuracy on the training scenes and on the held-out val scenes, in the log and the manifest
    vision_acc = json.loads((out / "bootstrap_log.json").read_text())["vision_accuracy"]
    assert {"train_class", "eval_class", "eval_colour"} <= set(vision_acc)
    assert json.loads((out / "manifest.json").read_text())["vision_accuracy"] == vision_acc
    records = read_jsonl(world / "sft" / "sft.jsonl")
    images = load_images(world, [r["image_path"] for r in records])
    # tokenizer trained on the world: its words are single tokens
    assert len(fam.tokenizer.tokenize(" triangle")) == 1
    before = {n: p.detach().clone() for n, p in fam.model.named_parameters()}
    cfg = BootstrapConfig(**{**TINY, "steps": 2, "lr": 1e-2, "warmup_steps": 1})
    losses = sft_train(fam, records, images, cfg, progress=False)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    for n, p in fam.model.named_parameters():
        changed = not torch.equal(before[n], p)
        if n.startswith("model.vision_tower."):
            assert not changed, f"{n} changed although the vision tower is frozen"
        elif "embed_tokens" not in n and "lm_head" not in n:  # rows of unused tokens legitimately stay put
            assert changed, f"{n} did not change"
    text = generate(
        fam, [Sample(images[records[0]["image_path"]], records[0]["question"])], GREEDY.replace(max_new_tokens=8)
    )
    assert isinstance(text[0], str)


def test_align_projector_trains_only_the_projector_towards_the_words(world, tmp_path):
    """Stage-1 alignment: the loss (class word + colour word cross-entropy over the world's words, ln 12 + ln 6 for
    an uninformed token) falls well below chance, and nothing but the projector moves."""
    from muffin.family import load_family
    from muffin.world.bootstrap import load_images
    from muffin.world.scenes import load_scenes
    from muffin.world.vision import align_projector, cell_data

    out = bootstrap(world, tmp_path / "base", BootstrapConfig(**{**TINY, "align_steps": 0}), progress=False)
    fam = load_family(out, device="cpu")
    scenes = load_scenes(world, "sft")
    images = load_images(world, [f"sft/images/{s.file_name}" for s in scenes])
    before = {n: p.detach().clone() for n, p in fam.model.named_parameters()}
    cells = cell_data(scenes, list(images.values()), fam.image_processor)
    losses = align_projector(fam, cells, steps=150, batch_size=8, lr=1e-2, progress=False)
    chance = math.log(len(CLASSES)) + math.log(len(COLOURS))
    assert sum(losses[-10:]) / 10 < 0.5 * chance < losses[0] * 1.5
    for n, p in fam.model.named_parameters():
        assert torch.equal(before[n], p) != n.startswith("model.multi_modal_projector."), n


def test_align_projector_with_places_maps_tokens_to_their_cells_place_words(world, tmp_path, caplog):
    """With ``places`` (the tower also learns each token's cell), each occupied cell's image token scores its cell's
    place words ("top", "left" for the top-left cell) above zero and the other place words below."""
    from muffin.family import load_family
    from muffin.world.bootstrap import load_images
    from muffin.world.scenes import load_scenes
    from muffin.world.vision import EMPTY, _place_targets, align_projector, cell_data, image_tokens, pretrain_vision

    out = bootstrap(world, tmp_path / "base", BootstrapConfig(**{**TINY, "align_steps": 0}), progress=False)
    fam = load_family(out, device="cpu")
    scenes = load_scenes(world, "sft")[:12]  # the step budgets below are sized for 12 scenes' cells
    images = load_images(world, [f"sft/images/{s.file_name}" for s in scenes])
    cells = cell_data(scenes, list(images.values()), fam.image_processor)
    ids, target = _place_targets(fam.tokenizer, 9)
    embed = fam.model.get_input_embeddings().weight.detach()

    def place_accuracy() -> float:
        with torch.no_grad():
            x = fam.model.model.multi_modal_projector(image_tokens(fam.model, cells.pixels))  # (N, 9, H)
        occupied = cells.y_cls > EMPTY
        got = (x @ embed[ids].T > 0).float()
        return (got == target[None].expand_as(got)).all(-1)[occupied].float().mean().item()

    before = place_accuracy()
    with caplog.at_level("INFO", logger="muffin.world.vision"):
        _, acc = pretrain_vision(
            fam, cells, steps=150, batch_size=8, lr=3e-3, places=True, progress=False, eval_cells=cells
        )
    # occupied cells read apart (the accuracy over all cells is mostly empty cells), on the training and eval cells
    assert set(acc) == {f"{s}_{k}" for s in ("train", "eval") for k in ("cells", "class", "colour")}
    assert all(0 <= v <= 1 for v in acc.values()) and "'train_class'" in caplog.text
    assert acc == {**acc, **{k.replace("train", "eval"): v for k, v in acc.items() if k.startswith("train")}}, (
        "the same cells (fewer than 512 scenes) give the same accuracies"
    )
    align_projector(fam, cells, steps=200, batch_size=8, lr=1e-2, places=True, progress=False)
    after = place_accuracy()
    assert after >= 0.8 and after > before + 0.3, (before, after)
    with pytest.raises(ValueError, match="one image token per grid cell"):
        _place_targets(fam.tokenizer, 4)


def test_bootstrap_refuses_a_missing_world(tmp_path):
    with pytest.raises(FileNotFoundError, match="build the world first"):
        bootstrap(tmp_path / "nowhere", tmp_path / "out", BootstrapConfig(**TINY), progress=False)


class _UniformFamily:
    """A mock family whose logits are all zero: every token has log-probability -log(V)."""

    vocab = 4

    def encode(self, samples):
        # sample i: 3 prompt tokens, then an answer of len(answer) tokens; right padding to the longest
        lengths = [3 + len(s.answer) for s in samples]
        T = max(lengths)
        ids = torch.zeros(len(samples), T, dtype=torch.long)
        mask = torch.zeros(len(samples), T, dtype=torch.bool)
        for i, n in enumerate(lengths):
            mask[i, 3:n] = True
        return {"input_ids": ids, "answer_mask": mask}

    def forward(self, batch):
        B, T = batch["input_ids"].shape
        return torch.zeros(B, T, self.vocab, requires_grad=True)


def test_sft_loss_per_sample_vs_per_token_by_hand():
    """With uniform logits every answer token costs log V = log 4, so both averages are log 4 whatever the lengths
    (answers of 1 and 3 tokens)."""
    from muffin.family import Sample
    from muffin.world.bootstrap import sft_loss

    fam = _UniformFamily()
    samples = [Sample(None, "q", "a"), Sample(None, "q", "abc")]
    assert sft_loss(fam, samples).item() == pytest.approx(math.log(4))
    assert sft_loss(fam, samples, per_sample=True).item() == pytest.approx(math.log(4))


def test_sft_loss_per_sample_weighs_answers_equally():
    """Token costs c1 = log 4 (1-token answer) and c2 = 0 on 3 tokens (the long answer is certain): per token the
    mean is (c1 + 0) / 4 = log(4) / 4; per sample it is (c1 + 0) / 2 = log(4) / 2."""
    from muffin.family import Sample
    from muffin.world.bootstrap import sft_loss

    class Confident(_UniformFamily):
        def forward(self, batch):
            B, T = batch["input_ids"].shape
            logits = torch.zeros(B, T, self.vocab)
            logits[1, :, 0] = 1e4  # sample 1 predicts token 0 (every input id is 0) with certainty
            return logits.requires_grad_()

    samples = [Sample(None, "q", "a"), Sample(None, "q", "abc")]
    assert sft_loss(Confident(), samples).item() == pytest.approx(math.log(4) / 4)
    assert sft_loss(Confident(), samples, per_sample=True).item() == pytest.approx(math.log(4) / 2)


@pytest.mark.gpu
def test_bootstrap_and_labeler_train_on_the_gpu(world, tmp_path):
    """--device cuda: the vision stages (with places), the supervised stage and the labeler run on the GPU in float32
    and save checkpoints that load on the CPU; the manifests say where they trained."""
    import json

    from muffin.family import load_family
    from muffin.world.labeler import LabelerConfig, train_labeler

    if not torch.cuda.is_available():
        pytest.fail("--run-gpu was given but torch sees no GPU")
    cfg = BootstrapConfig(**{**TINY, "steps": 4, "align_places": True})
    out = bootstrap(world, tmp_path / "base", cfg, progress=False, device="cuda")
    assert json.loads((out / "manifest.json").read_text())["device"] == "cuda"
    log = json.loads((out / "bootstrap_log.json").read_text())
    assert len(log["vision_loss"]) == 2 and len(log["align_loss"]) == 2 and len(log["loss"]) == 4
    assert all(math.isfinite(x) for k in ("vision_loss", "align_loss", "loss") for x in log[k])
    lab = train_labeler(
        world,
        out,
        tmp_path / "labeler",
        LabelerConfig(easy_steps=2, steps=2, own_steps=2, own_scenes=4, own_samples=1, batch_size=4),
        eval_scenes=2,
        progress=False,
        device="cuda",
    )
    assert json.loads((lab / "manifest.json").read_text())["device"] == "cuda"
    fam = load_family(lab, device="cpu")
    assert next(fam.model.parameters()).dtype == torch.float32


def test_resolve_device():
    from utils.cuda import resolve_device

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("") == resolve_device("auto")
    assert resolve_device("cpu") == "cpu" and resolve_device("cuda:1") == "cuda:1"


def test_vision_probe_prints_the_towers_accuracy_on_val_cells_per_step_count(world, capsys):
    """`python -m muffin.world.vision_probe --world W --steps ...`: one fresh tower per step count, read on the val cells;
    more steps read at least as many occupied val cells on this tiny world (2 -> 150 steps)."""
    from muffin.world.vision_probe import main, probe

    main(["--world", str(world), "--steps", "2", "150"])
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("|")]  # (libraries may print too)
    assert lines[0].startswith("| steps | class, occupied val cells %") and len(lines) == 4
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["2", "150"]
    short, long = probe(str(world), [2, 150])
    assert long["eval_class"] > short["eval_class"] and long["train_class"] > short["train_class"]
    again = probe(str(world), [2])[0]
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in short.items() if k != "seconds"}
