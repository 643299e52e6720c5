"""Scratch experiment (to be deleted): SFT learnability of the world model across sizes."""
import json, sys, time, os
import torch
from muffin.world.bootstrap import BootstrapConfig, sft_train, load_images, world_corpus
from muffin.world.evaluate import evaluate_model
from muffin.world.shapes import PARTNER
from utils.io import read_jsonl
from llava.family import LlavaFamily
from llava.tiny import build_tiny_llava_hf, tiny_llava_tokenizer
world, out, name = sys.argv[1], sys.argv[2], sys.argv[3]
kw = json.loads(sys.argv[4])
evals = [int(x) for x in sys.argv[5].split(",")]
cfg = BootstrapConfig(**kw)
recs = read_jsonl(f"{world}/sft/sft.jsonl")
tok = tiny_llava_tokenizer(world_corpus(world), vocab_size=cfg.vocab_size)
build_tiny_llava_hf(f"{out}/{name}", seed=0, tokenizer=tok, **cfg.model_sizes())
fam = LlavaFamily.from_pretrained(f"{out}/{name}")
imgs = load_images(world, [r["image_path"] for r in recs])
t0 = time.time(); log = open(os.path.join(os.environ.get("OUT", out), f"{name}.log"), "w")
def cb(step):
    if step in evals:
        el = time.time() - t0
        fam.model.eval()
        res = evaluate_model(fam, world, "val", labeler=True, progress=False)
        fam.model.train()
        print(json.dumps({"name": name, "step": step, "train_s": round(el, 1), "chair": res["chair"], "lab": res["labeler"]}), file=log, flush=True)
sft_train(fam, recs, imgs, cfg, progress=False, on_step=cb)
fam.save_pretrained(f"{out}/{name}")
