"""One FedAvg round the way the seed notebooks ran it, against the engine, on the same clients and data.

    python benchmarks/seed_loop.py [--data-dir ../shared/data/ag_news] [--max-length 128]

Seed style: the stock transformers model, a PEFT LoRA model (r 8, α 16, q/v, the classifier in modules_to_save), a deep copy of the whole
model per client, fp32, a shuffling DataLoader padding each batch to its longest example, AdamW, then the
average of the PEFT state dicts. Engine: `fedslip`'s FedAvg round (one frozen backbone, tensors swapped
per client, length-bucketed batches, the precision `train.precision = auto` picks). Both: the quick
preset's 4 clients × 256 examples, one local epoch, batch 32, max length 128 (the reference's; the quick
preset's 64 cuts most AG News texts, so that padding hardly differs). Reports samples/s of each.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch

from fedslip.config import load_config
from fedslip.federation.inprocess import Simulation
from fedslip.methods import method_for
from fedslip.model.backbone import load_backbone
from fedslip.prepare import prepare


def seed_round(prep, cfg) -> float:
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    # the stock model, as the notebooks loaded it (the engine's own backbone has its dropout and attention
    # swapped for faster ones by now)
    base = load_backbone(cfg.model.backbone, prep.backbone.model.config.num_labels, cfg.train.seed, cfg.model.backbone_dropout).model
    for p in base.parameters():
        p.requires_grad_(True)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"],
                                            modules_to_save=["classifier"], task_type="SEQ_CLS"))
    glob = get_peft_model_state_dict(model)
    collate = DataCollatorWithPadding(prep.backbone.tokenizer)
    start, seen, states = time.perf_counter(), 0, []
    for k, idx in enumerate(prep.split.train):
        local = copy.deepcopy(model)
        set_peft_model_state_dict(local, glob)
        rows = [{"input_ids": prep.train.ids[i].tolist(), "labels": int(prep.train.labels[i])} for i in idx]
        loader = DataLoader(rows, batch_size=cfg.train.batch_size, shuffle=True, collate_fn=collate,
                            generator=torch.Generator().manual_seed(k))
        opt = torch.optim.AdamW([p for p in local.parameters() if p.requires_grad], lr=cfg.train.lr)
        local.train()
        for batch in loader:
            loss = local(**batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(batch["labels"])
        states.append(get_peft_model_state_dict(local))
    glob = {n: sum(s[n] for s in states) / len(states) for n in states[0]}
    return seen / (time.perf_counter() - start)


def engine_round(prep, cfg) -> float:
    sim = Simulation(prep, method_for(cfg))
    start = time.perf_counter()
    sim.run_round(1)
    return sum(len(i) for i in prep.split.train) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default=os.environ.get("FEDSLIP_DATA_DIR", "../shared/data/ag_news"))
    ap.add_argument("--max-length", type=int, default=128, help="tokens per example (the reference's 128)")
    args = ap.parse_args()
    # one epoch on both sides: the quick preset itself trains a fixed number of steps (train.local_steps)
    sets = [f'data.data_dir="{args.data_dir}"', "train.rounds=1", "method.kstep=false", "train.local_steps=none",
            "train.local_epochs=1", f"model.max_length={args.max_length}"]
    cfg = load_config(None, "quick", "fedavg", sets)
    prep = prepare(cfg)
    engine = engine_round(prep, cfg)
    fp32_cfg = load_config(None, "quick", "fedavg", [*sets, 'train.precision="fp32"'])
    fp32_prep = prepare(fp32_cfg)
    engine_fp32 = engine_round(fp32_prep, fp32_cfg)
    seed = seed_round(fp32_prep, fp32_cfg)
    print(f"FedAvg round, 4 clients x 256 examples, max length {args.max_length}, {torch.get_num_threads()} threads:")
    print(f"  seed style (PEFT, deep copy per client, fp32, DataLoader): {seed:.1f} samples/s")
    print(f"  engine, fp32: {engine_fp32:.1f} samples/s (x{engine_fp32 / seed:.2f})")
    print(f"  engine, precision auto ({prep.backbone.placement.info['precision']}): {engine:.1f} samples/s "
          f"(x{engine / seed:.2f})")


if __name__ == "__main__":
    main()
