"""A checkpoint written before a config key existed resumes when that key holds its default now."""

from __future__ import annotations

from fedslip.config import Config
from fedslip.federation.checkpoint import differences


def test_a_key_new_since_the_checkpoint_is_no_difference_at_its_default():
    now = {"config": Config().to_dict()}
    saved = {"config": Config().to_dict()}
    del saved["config"]["method"]["mask_ties"]
    defaults = {"config": Config().to_dict()}
    assert differences(saved, now, defaults=defaults) == []
    now["config"]["method"]["mask_ties"] = "keep"
    assert differences(saved, now, defaults=defaults) == ["config.method.mask_ties: None in the checkpoint, 'keep' now"]
    saved["config"]["method"]["mask_ties"] = "random"  # present in both: compared as always
    now["config"]["method"]["mask_ties"] = "random"
    saved["config"]["train"]["lr"] = 0.5
    assert differences(saved, now, defaults=defaults) == ["config.train.lr: 0.5 in the checkpoint, 0.0001 now"]


def test_resuming_on_other_hardware_or_threads_warns_once(tiny_prep, tmp_path, capsys, monkeypatch):
    import fedslip.federation.protocol as protocol
    from fedslip.federation.inprocess import Simulation
    from fedslip.methods import METHODS
    from fedslip.model.placement import compute_kind

    from conftest import tiny_config

    cfg = tiny_config("fedavg", train={"rounds": 2})
    whole, _ = Simulation(tiny_prep, METHODS["fedavg"](cfg)).run(tmp_path / "whole.safetensors")
    path = tmp_path / "fedavg.safetensors"
    real = protocol.RoundProtocol.run_round

    def power_cut_in_round_2(self, rnd):
        if rnd == 2:
            raise KeyboardInterrupt
        return real(self, rnd)

    monkeypatch.setattr(protocol.RoundProtocol, "run_round", power_cut_in_round_2)
    try:
        Simulation(tiny_prep, METHODS["fedavg"](cfg)).run(path)
    except KeyboardInterrupt:
        pass
    monkeypatch.setattr(protocol.RoundProtocol, "run_round", real)
    capsys.readouterr()
    here = compute_kind(tiny_prep.backbone.placement.device)
    monkeypatch.setattr(protocol, "compute_kind", lambda device: {**here, "threads": here["threads"] + 1})
    moved, _ = Simulation(tiny_prep, METHODS["fedavg"](cfg)).run(path, resume=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert moved.final == whole.final  # one thread count really: the same numbers
    assert len(err) == 1 and err[0].startswith("fedslip: warning: ") and "not be bit-identical" in err[0]
    assert f"threads {here['threads']} → {here['threads'] + 1}" in err[0]
    monkeypatch.setattr(protocol, "compute_kind", compute_kind)  # back on the machine it started on
    again, _ = Simulation(tiny_prep, METHODS["fedavg"](cfg)).run(path, resume=True)  # finished: trains nothing
    assert again.final == whole.final and "warning" not in capsys.readouterr().err
