"""A checkpoint records the backbone's weights (a digest) and the transformers version: a resume or an export
on other weights is refused, the same weights under another folder name are not."""

from __future__ import annotations

import copy

import torch

from fedslip.cli import main
from fedslip.federation.checkpoint import comparable, differences
from fedslip.model import backbone as backbone_module
from fedslip.model.backbone import load_backbone, weights_digest

from test_cli import sets


def test_the_digest_follows_the_weights_not_the_object():
    a = load_backbone("tiny-random:bert", 3, seed=0)
    b = load_backbone("tiny-random:bert", 3, seed=0)
    assert a.digest == b.digest == weights_digest(b.model)
    assert load_backbone("tiny-random:bert", 3, seed=1).digest != a.digest  # another head (and body) init
    p = next(b.model.parameters())
    with torch.no_grad():
        p.view(-1)[0] = torch.nextafter(p.view(-1)[0], torch.tensor(float("inf")))  # one ulp, one weight
    assert weights_digest(b.model) != a.digest


def fp(backbone: str, digest: str | None, transformers: str | None = "5.0"):
    out = {"config": {"model": {"backbone": backbone}, "train": {}, "data": {}}, "backbone": digest,
           "transformers": transformers, "precision": "fp32", "device": "cpu"}
    return {k: v for k, v in out.items() if v is not None}


def test_comparing_fingerprints():
    same = differences(*comparable(fp("/x/minilm", "w1"), fp("/elsewhere/minilm", "w1")))
    assert same == []  # the same weights read from another folder
    assert differences(*comparable(fp("/x/minilm", "w1"), fp("/x/minilm", "w2"))) == \
        ["backbone: 'w1' in the checkpoint, 'w2' now"]
    old = fp("/x/minilm", None, None)  # made before either was recorded: the name is compared, not the rest
    assert differences(*comparable(old, fp("/x/minilm", "w2", "5.1"))) == []
    assert differences(*comparable(old, fp("/y/minilm", "w2")))[0].startswith("config.model.backbone:")
    assert differences(*comparable(fp("a", "w1", "4.57.0"), fp("a", "w1", "5.0"))) == \
        ["transformers: '4.57.0' in the checkpoint, '5.0' now"]
    saved = fp("a", "w1")
    comparable(saved, fp("b", "w1"))
    assert saved == fp("a", "w1")  # the caller's dicts are left alone


def other_weights(monkeypatch):
    real = backbone_module.weights_digest
    monkeypatch.setattr(backbone_module, "weights_digest", lambda model: "0" * 8 + real(model)[8:])


def test_resume_and_export_refuse_other_backbone_weights(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    args = ["run", "--method", "fedavg", "--quiet", "--out", str(out), *sets(["train.rounds=1"])]
    assert main(args) == 0
    saved = copy.deepcopy((out / "rounds.csv").read_bytes())
    assert main([*args, "--resume"]) == 0  # the same weights: resumes (nothing left to train)
    capsys.readouterr()
    other_weights(monkeypatch)
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("belongs to another run: backbone: 'tiny-random:bert' holds other weights than the run "
                        "trained on")
    assert (out / "rounds.csv").read_bytes() == saved
    assert main(["export", str(out), "--global", "--out", str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds other weights than the run trained on" in err[0]
    assert not (tmp_path / "exp").exists()
    monkeypatch.undo()
    assert main(["export", str(out), "--global", "--out", str(tmp_path / "exp")]) == 0
