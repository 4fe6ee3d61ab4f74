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
