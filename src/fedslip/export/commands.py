"""`fedslip export` and `fedslip predict`: the subcommands, their arguments and what they print."""

from __future__ import annotations

import sys
from pathlib import Path

from fedslip.errors import UserError


def add_commands(sub) -> None:
    exp = sub.add_parser("export", help="write a finished run's model as a plain PEFT LoRA folder")
    exp.add_argument("run_dir", metavar="RUN_DIR", help="a finished run's --out folder")
    who = exp.add_mutually_exclusive_group(required=True)
    who.add_argument("--client", type=int, metavar="K", help="client K's personal model (personal, synced)")
    who.add_argument("--global", dest="global_model", action="store_true", help="the global model")
    exp.add_argument("--method", help="which method's checkpoint (needed when RUN_DIR holds several)")
    exp.add_argument("--label-names", help="comma-separated class names in class order (default: the run's)")
    exp.add_argument("--data-dir", help="the run's AG News folder, where its checkpoint predates holding the "
                     "class names and the run's data folder has moved")
    exp.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    exp.set_defaults(export_handler=_export)
    pre = sub.add_parser("predict", help="classify text with an export folder")
    pre.add_argument("folder", metavar="DIR", help="a folder written by `fedslip export`")
    src = pre.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", action="append", help="a text to classify (repeatable)")
    src.add_argument("--file", help="a CSV file (one text per row) or a .jsonl file (one JSON object per line)")
    pre.add_argument("--text-columns", help="--file: comma-separated columns (JSON fields) joined into the text "
                     "(default: the run's data.text_columns)")
    pre.add_argument("--out", help="write the predictions to this CSV (or JSON Lines, for a .jsonl name)")
    pre.set_defaults(export_handler=_predict)


def _names(spec: str | None) -> list[str] | None:
    return [n.strip() for n in spec.split(",") if n.strip()] if spec else None


def _export(args) -> int:
    from fedslip.export.peft_folder import export
    from fedslip.export.trained_view import load_view

    view = load_view(Path(args.run_dir), None if args.global_model else args.client, args.method,
                     _names(args.label_names), args.data_dir)
    meta = export(view, Path(args.out))
    print(f"wrote {args.out}/: {view.method.name}, {view.who}, LoRA rank {meta['rank']} "
          f"({meta['check']['tensors']} tensors loaded back by PEFT unchanged; logits within "
          f"{meta['check']['max_abs_logit_diff']:.1e} of fedslip's)")
    return 0


def _predict(args) -> int:
    from fedslip.export import predict

    folder = Path(args.folder)
    meta = predict.export_meta(folder)
    if args.text_columns and not args.file:
        raise UserError("--text-columns goes with --file")
    out = Path(args.out) if args.out else None
    if out is not None and out.is_dir():
        raise UserError(f"--out {out}: is a folder; give a file name, e.g. preds.csv")
    texts = args.text or predict.read_texts(Path(args.file), _names(args.text_columns) or meta["text_columns"])
    clf = predict.load_classifier(folder, meta)
    probs = predict.probabilities(clf, texts)
    names = clf.label_names
    for text, p in zip(texts, probs):
        shown = " ".join(f"{n}={x:.3f}" for n, x in zip(names, p))
        print(f"{names[int(p.argmax())]}\t{shown}\t{text[:60]}")
    if out is not None:
        predict.write_predictions(out, texts, probs, names)
        print(f"wrote {out} ({len(texts)} rows)", file=sys.stderr)
    return 0
