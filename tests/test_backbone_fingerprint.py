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
    c = load_backbone("tiny-random:bert", 3, seed=0).model
    assert weights_digest(c.double()) == a.digest  # another float dtype, the same values
    c.config.layer_norm_eps = 1e-5
    assert weights_digest(c) != a.digest  # the same weights, another config
    d = load_backbone("tiny-random:bert", 3, seed=0).model
    with torch.no_grad():
        d.classifier.weight.add_(1.0)
    head = ("classifier.weight", "classifier.bias")
    assert weights_digest(d, head) == weights_digest(load_backbone("tiny-random:bert", 3, seed=0).model, head)
    assert weights_digest(d) != a.digest  # drawn from the seed: left out only when named fresh


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
    targets = [{**fp("a", "w1"), "targets": t} for t in (["query", "value"], ["q_lin", "v_lin"])]
    assert differences(*comparable(*targets)) == ["targets: ['query', 'value'] in the checkpoint, ['q_lin', 'v_lin'] now"]
    assert differences(*comparable(fp("a", "w1"), targets[1])) == []  # made before targets were recorded
    saved = fp("a", "w1")
    comparable(saved, fp("b", "w1"))
    assert saved == fp("a", "w1")  # the caller's dicts are left alone


def other_weights(monkeypatch):
    real = backbone_module.weights_digest
    monkeypatch.setattr(backbone_module, "weights_digest", lambda *a: "0" * 8 + real(*a)[8:])


def test_resume_export_and_predict_refuse_another_backbone(tmp_path, capsys, monkeypatch):
    out, exported = tmp_path / "run", tmp_path / "exp"
    args = ["run", "--method", "fedavg", "--quiet", "--out", str(out), *sets(["train.rounds=1"])]
    assert main(args) == 0
    saved = copy.deepcopy((out / "rounds.csv").read_bytes())
    assert main([*args, "--resume"]) == 0  # the same weights: resumes (nothing left to train)
    assert main(["export", str(out), "--global", "--out", str(exported)]) == 0
    assert main(["predict", str(exported), "--text", "kaba zuto"]) == 0
    capsys.readouterr()
    other_weights(monkeypatch)
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("belongs to another run: backbone: 'tiny-random:bert' is not the model the run trained "
                        "on (other weights or config)")
    assert (out / "rounds.csv").read_bytes() == saved
    assert main(["export", str(out), "--global", "--out", str(tmp_path / "exp2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not the model the run trained on (other weights or config)" in err[0]
    assert not (tmp_path / "exp2").exists()
    assert main(["predict", str(exported), "--text", "kaba zuto"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"is not the model {exported} was exported from" in err[0]


def test_a_default_mapping_that_moved_refuses_resume_and_export_keeps_the_runs_layers(tmp_path, capsys,
                                                                                        monkeypatch):
    import json

    out = tmp_path / "run"
    args = ["run", "--method", "fedavg", "--quiet", "--out", str(out), *sets(["train.rounds=1"])]
    assert main(args) == 0
    monkeypatch.setitem(backbone_module.EXTRA_TARGETS, "bert", ["key"])  # a newer mapping for BERT
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    assert "targets: ['query', 'value'] in the checkpoint, ['key'] now" in capsys.readouterr().err
    assert main(["export", str(out), "--global", "--out", str(tmp_path / "exp")]) == 0
    config = json.loads((tmp_path / "exp" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["query", "value"]  # the layers the run trained


def test_another_library_version_says_how_to_resume(tmp_path, capsys, monkeypatch):
    from fedslip.federation import checkpoint

    out = tmp_path / "run"
    args = ["run", "--method", "fedavg", "--quiet", "--out", str(out), *sets(["train.rounds=1"])]
    assert main(args) == 0
    capsys.readouterr()
    real = checkpoint.fingerprint
    monkeypatch.setattr(checkpoint, "fingerprint", lambda *a: {**real(*a), "transformers": "99.0"})  # an upgrade
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("'99.0' now; to resume it, install the versions the checkpoint names")
