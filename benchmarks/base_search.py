"""Pre-training experiment used to choose the base presets (docs/base_models.md): trains a tiny
Qwen2.5-VL on the held-out skills and prints first-answer-token accuracy per skill every N steps.

    [WEIGHTS=position:2,presence:2] python benchmarks/base_search.py STEPS HIDDEN LAYERS VIS_HIDDEN VIS_LAYERS LR BATCH N_PER_SKILL [INTER] [EVERY]
"""
import sys, time, json, torch, random
from lmm_ray import models, data, skills
from lmm_ray.families import TinySize
from lmm_ray.optim import train_stage
torch.set_num_threads(int(__import__("os").environ.get("THREADS","2")))
steps = int(sys.argv[1]); hidden=int(sys.argv[2]); layers=int(sys.argv[3]); vh=int(sys.argv[4]); vl=int(sys.argv[5]); lr=float(sys.argv[6]); bs=int(sys.argv[7]); npool=int(sys.argv[8]); inter=int(sys.argv[9]) if len(sys.argv)>9 else hidden*3; every=int(sys.argv[10]) if len(sys.argv)>10 else 250
size = TinySize(hidden=hidden, layers=layers, intermediate=inter, vision_hidden=vh, vision_layers=vl)
L = models.build_tiny("qwen2_5_vl", size, seed=0)
print("params", sum(p.numel() for p in L.model.parameters()), flush=True)
H = skills.heldout_skills(); T = skills.target_skills()
t=time.time()
pool = []
import os
W = dict(kv.split(":") for kv in os.environ.get("WEIGHTS", "").split(",") if kv)
for s in H: pool += skills.generate(s, int(npool * float(W.get(s, 1))), seed=1)
encs = data.encode_train(L.processor, pool)
print(f"encoded {len(encs)} in {time.time()-t:.1f}s", flush=True)
ev = {s: (skills.generate(s, 100, seed=99)) for s in H + T}
eve = {s: data.encode_train(L.processor, v) for s, v in ev.items()}
pad = L.tokenizer.pad_token_id
@torch.no_grad()
def evaluate():
    L.model.eval(); r = {}
    for s, e in eve.items():
        b = data.collate(e, pad)
        lg = L.model(**b).logits
        lab = b["labels"]
        # first answer token: first non -100 label position, logits at pos-1
        pos = (lab != -100).float().argmax(1)
        pred = lg[torch.arange(len(pos)), pos - 1].argmax(-1)
        gold = lab[torch.arange(len(pos)), pos]
        r[s] = round((pred == gold).float().mean().item() * 100, 1)
    L.model.train(); return r
t=time.time()
def cb(step, loss):
    if (step+1) % every == 0 or step+1 == steps:
        r = evaluate(); h = sum(r[s] for s in H)/len(H)
        print(json.dumps({"step": step+1, "t": round(time.time()-t), "loss": round(loss,3), "heldout": round(h,1), **r}), flush=True)
train_stage(L.model, encs, steps=steps, lr=lr, batch_size=bs, pad_id=pad, seed=0, stage=0, warmup_ratio=0.05, weight_decay=0.01, on_step=cb)
print("total", time.time()-t)
