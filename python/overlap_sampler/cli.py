"""`overlap-sampler` command line: `train`, `eval`, `predict`, `export`, `analyze`, `ablate`, `demo`, `info`.

    overlap-sampler train [--config FILE.toml|FILE.json] [--flag value ...]
    overlap-sampler eval --checkpoint PATH [--dataset synthetic | --val-images D --val-annotations F]
    overlap-sampler predict --checkpoint PATH IMAGE_OR_FOLDER ... [--score-thresh 0.5]
    overlap-sampler export --checkpoint PATH --output FILE.pt
    overlap-sampler ablate --grid neg_strategy=uniform,soft num_bins=2,3 [--seeds 0 1 2] [--train-args FLAGS]
    overlap-sampler analyze upper-bound --checkpoint PATH [data flags as eval] [--nms-thresh T]
    overlap-sampler analyze iou-hist --checkpoint PATH | --untrained [--samplers random overlap ...] [--images N]
    torchrun --nproc_per_node 2 -m overlap_sampler.cli train ...      (DDP: NCCL on CUDA, Gloo on CPU)

`train` with no arguments trains the small Faster R-CNN on the built-in synthetic dataset and evaluates it.
Settings come from the TrainConfig defaults, then the config file, then the flags (highest).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from .io_safety import OutputError

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _arg_type(type_str: str):
    """(argparse kwargs) for a dataclass field annotation string such as ``"int | None"``."""
    base = type_str.replace(" | None", "").replace("Optional[", "").rstrip("]").strip()
    if base == "bool":
        return {"action": argparse.BooleanOptionalAction}
    if base.startswith("list[int"):
        return {"type": int, "nargs": "*", "metavar": "N"}
    return {"type": {"int": int, "float": float, "str": str}.get(base, str)}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (help from its metadata) and per sampler setting; every default is
    ``argparse.SUPPRESS`` so that only the flags actually given override the config file."""
    from .detection import BACKBONES
    from .engine.config import ARCHS, DATASETS, TrainConfig, default_sampler
    from .sampling import SAMPLERS, SamplerConfig

    parser.add_argument("--config", help="TOML or JSON config file (keys = the flags below with underscores; "
                                         "sampler settings in a [sampler] table); flags override it")
    choices = {"arch": ARCHS, "dataset": DATASETS, "backbone": BACKBONES}
    group = parser.add_argument_group("training settings (defaults in brackets)")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "sampler":
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs = _arg_type(str(f.type))
        if f.name in choices:
            kwargs["choices"] = choices[f.name]
        group.add_argument(_flag(f.name), dest=f.name, default=argparse.SUPPRESS,
                           help=f"{f.metadata['help']} [{default}]", **kwargs)
    sampler = parser.add_argument_group("RoI sampler settings (the [sampler] table)")
    sampler.add_argument("--sampler", dest="sampler__preset", choices=SAMPLERS, default=argparse.SUPPRESS,
                         help="the sampler, with its preset: overlap (the paper's best: soft K=2 for both, "
                              "epsilon 2), iou_balanced (the op with Libra's IoU-balanced negatives), random "
                              "(torchvision's), libra (Libra R-CNN as mmdetection), ohem (online hard example "
                              "mining) or isr (PISA). It replaces the method settings of the config file's "
                              "[sampler] table but keeps its RoI budget and IoU thresholds; the flags below "
                              "refine it [overlap]")
    defaults = default_sampler()
    for f in dataclasses.fields(SamplerConfig):
        if f.name == "sampler":
            continue
        kwargs = _arg_type(str(f.type))
        if f.metadata["choices"]:
            kwargs["choices"] = tuple(f.metadata["choices"])
        elif "action" not in kwargs:
            kwargs.setdefault("metavar", f.name.upper())
        used_by = f.metadata["used_by"]
        reader = "" if used_by == SAMPLERS else f" (read by {', '.join(used_by)})"
        sampler.add_argument(_flag(f.name), dest="sampler__" + f.name, default=argparse.SUPPRESS,
                             help=f"{f.metadata['help']}{reader} [{getattr(defaults, f.name)}]", **kwargs)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig keys given on the command line (``sampler`` as a dict, with ``preset`` if given)."""
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    out: dict[str, Any] = {}
    sampler: dict[str, Any] = {}
    for key, value in given.items():
        if key.startswith("sampler__"):
            sampler[key[len("sampler__"):]] = value
        else:
            out[key] = value
    if sampler:
        out["sampler"] = sampler
    # Paths to your own data imply dataset = coco unless the dataset was named explicitly.
    if "dataset" not in out and any(k in out for k in ("train_images", "train_annotations")):
        out["dataset"] = "coco"
    return out


def config_from_args(args: argparse.Namespace):
    """TrainConfig = defaults < ``--config`` file < flags."""
    from .engine.config import TrainConfig, merge

    overrides = overrides_from_args(args)
    if args.config:
        return TrainConfig.from_file(args.config, overrides)
    return TrainConfig.from_dict(merge({}, overrides))


def add_eval_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The validation data of `eval` and `analyze`: the checkpoint's own, the synthetic split, or given."""
    parser.add_argument("--dataset", choices=("synthetic",), default=None,
                        help="use the built-in synthetic validation split [without this and the --val-* flags: "
                             "the validation set the checkpoint was trained with]")
    parser.add_argument("--val-images", help="directory of the validation images (COCO format)")
    parser.add_argument("--val-annotations", help="COCO instances json of the validation images")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Where and how a checkpoint runs over a dataset (`eval`, `analyze`)."""
    parser.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:N' [auto]")
    parser.add_argument("--batch-size", type=int, default=2, help="images per forward pass [2]")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def eval_data_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """The data keywords of evaluate_checkpoint and upper_bound_checkpoint; usage errors for bad pairs."""
    if args.dataset and (args.val_images or args.val_annotations):
        parser.error("give either --dataset synthetic or --val-images/--val-annotations, not both")
    if bool(args.val_images) != bool(args.val_annotations):
        parser.error("--val-images and --val-annotations go together")
    return dict(dataset=None if args.val_images else args.dataset or "checkpoint", val_images=args.val_images,
                val_annotations=args.val_annotations)


def add_iou_hist_parser(analyses) -> None:
    """`analyze iou-hist` (the paper's Figure 4 on a checkpoint's proposals) and its flags."""
    from .sampling import SAMPLERS

    ih = analyses.add_parser(
        "iou-hist", help="what each sampler picks from a checkpoint's RPN proposals: IoU_p,n of the negatives "
                         "(Figure 4)",
        description="The paper's Figure 4 on real proposals: run the checkpoint's backbone and RPN (training-mode "
                    "proposals, no state changed) over its first N training images, label the proposals against "
                    "the GT as the RoI head does, let every sampler pick from the same proposals with the "
                    "checkpoint's RoI budget, and bin the picked negatives by IoU_p,n (their max IoU with the "
                    "positives) and the positives by their key. Writes iou_hist.csv, iou_hist.png and iou_hist.md.")
    ih.add_argument("--checkpoint", help="a checkpoint written by `train` (its weights, architecture, RoI budget "
                                         "and training data); may be left out with --untrained")
    ih.add_argument("--untrained", action="store_true",
                    help="fresh weights drawn from --seed instead of the checkpoint's (its architecture, budget and "
                         "data kept); without --checkpoint: the default small Faster R-CNN on the built-in "
                         "synthetic training set (or --train-images/--train-annotations)")
    ih.add_argument("--dataset", choices=("synthetic",), default=None,
                    help="the built-in synthetic training split [without this and the --train-* flags: the "
                         "training set the checkpoint was trained with]")
    ih.add_argument("--train-images", help="directory of the training images (COCO format)")
    ih.add_argument("--train-annotations", help="COCO instances json of the training images")
    ih.add_argument("--samplers", nargs="+", choices=SAMPLERS, default=list(SAMPLERS), metavar="SAMPLER",
                    help=f"the sampler presets to compare, each with the checkpoint's RoI budget: "
                         f"{', '.join(SAMPLERS)} [all]")
    ih.add_argument("--images", type=int, default=200, help="training images analysed, the first in dataset "
                                                            "order [200]")
    ih.add_argument("--seed", type=int, default=0, help="seed of the samplers (and of --untrained weights) [0]")
    ih.add_argument("--output-dir", help="where iou_hist.csv, iou_hist.png and iou_hist.md go [analysis/ beside "
                                         "the checkpoint; output/analysis without one]")
    add_run_arguments(ih)


def iou_hist_data_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """The model and data keywords of iou_hist_checkpoint; usage errors for bad combinations."""
    if args.checkpoint is None and not args.untrained:
        parser.error("analyze iou-hist needs --checkpoint (or --untrained for fresh weights of the default model)")
    if args.dataset and (args.train_images or args.train_annotations):
        parser.error("give either --dataset synthetic or --train-images/--train-annotations, not both")
    if bool(args.train_images) != bool(args.train_annotations):
        parser.error("--train-images and --train-annotations go together")
    return dict(untrained=args.untrained, dataset=None if args.train_images else args.dataset or "checkpoint",
                train_images=args.train_images, train_annotations=args.train_annotations)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="overlap-sampler", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a detector (Faster/Mask R-CNN) with the Overlap Sampler",
                                description="Train a detector. Without arguments: the small Faster R-CNN on "
                                            "the built-in synthetic dataset, then its COCO evaluation.")
    add_train_arguments(train)

    ev = commands.add_parser("eval", help="COCO box (and mask) AP of a training checkpoint",
                             description="Evaluate a checkpoint; prints the AP table and writes "
                                         "eval_<checkpoint name>.json beside the checkpoint.")
    ev.add_argument("--checkpoint", required=True, help="a checkpoint written by `train` (e.g. "
                                                        "output/train/last_checkpoint.pth), or a TorchScript "
                                                        "file written by `export` (give the data then)")
    add_eval_data_arguments(ev)
    ev.add_argument("--output-dir", help="where eval_<checkpoint name>.json goes [the checkpoint's directory]")
    ev.add_argument("--box-nms-thresh", type=float,
                    help="the RoI head's test NMS IoU threshold instead of the checkpoint's (the JSON is then "
                         "eval_<checkpoint name>_nms<T>.json) [the checkpoint's]")
    add_run_arguments(ev)

    ex = commands.add_parser("export", help="export a checkpoint to TorchScript (checked against eager)",
                             description="Script the detector of a checkpoint with torch.jit.script, save it "
                                         "and check that the reloaded file gives the eager detections.")
    ex.add_argument("--checkpoint", required=True, help="a checkpoint written by `train`")
    ex.add_argument("--output", required=True, help="the TorchScript file to write (.pt)")
    ex.add_argument("--backbone-output", help="also torch.export the backbone + FPN to this .pt2 file")
    ex.add_argument("--image-size", type=int, default=256,
                    help="side of the synthetic images the export is verified on [256]")
    ex.add_argument("--device", default="cpu", help="where the verification runs [cpu]")

    pr = commands.add_parser("predict", help="detect objects in image files with a checkpoint",
                             description="Run a checkpoint's detector on image files and folders (searched "
                                         "recursively); writes predictions.json and each image drawn with its "
                                         "detections (in drawn/).")
    pr.add_argument("images", nargs="+", help="image files and/or folders of images")
    pr.add_argument("--checkpoint", required=True, help="a checkpoint written by `train`, or a TorchScript "
                                                        "file written by `export`")
    pr.add_argument("--output-dir", help="where predictions.json and the drawn images go "
                                         "[predictions/ beside the checkpoint]")
    pr.add_argument("--score-thresh", type=float, default=0.5,
                    help="keep detections scoring at least this; the model itself keeps at most 100 an image, "
                         "scoring at least 0.05 [0.5]")
    pr.add_argument("--no-draw", action="store_true", help="write predictions.json only")
    pr.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:N' [auto]")
    pr.add_argument("--batch-size", type=int, default=1, help="images per forward pass (of one size) [1]")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")

    analyze = commands.add_parser("analyze", help="analyses of a trained checkpoint (the paper's Table 1, "
                                                  "Figure 4)",
                                  description="Analyses of a trained checkpoint.")
    analyses = analyze.add_subparsers(dest="analysis", required=True, help="the analysis to run")
    ub = analyses.add_parser("upper-bound", help="box AP if the scores before NMS met each sampling heuristic's "
                                                 "ideal (Table 1)",
                             description="The paper's Table 1 for a checkpoint: box AP, AP50, AP75 of the model "
                                         "and with its candidates' scores replaced before NMS by the oracle of "
                                         "IoU-balanced sampling (negatives 0), ISR (positives: their IoU with "
                                         "the GT) and the overlap sampler (candidates overlapping another of "
                                         "their class above the NMS threshold: their IoU with the GT; a second "
                                         "row scores the overlapped negatives 0). Writes upper_bound.json and "
                                         "upper_bound.md.")
    ub.add_argument("--checkpoint", required=True, help="a checkpoint written by `train`")
    add_eval_data_arguments(ub)
    ub.add_argument("--output-dir", help="where upper_bound.json and upper_bound.md go [analysis/ beside the "
                                         "checkpoint]")
    ub.add_argument("--nms-thresh", type=float, default=None,
                    help="test NMS IoU threshold of every row, also what 'overlapped' means [the model's own]")
    add_run_arguments(ub)
    add_iou_hist_parser(analyses)

    from .analysis import ablate

    ab = commands.add_parser("ablate", help=ablate.HELP, description=ablate.__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    ablate.add_arguments(ab)

    demo = commands.add_parser("demo", help="sample a crowded synthetic batch with every negative strategy")
    demo.add_argument("--images", type=int, default=8, help="images in the batch [8]")
    demo.add_argument("--proposals", type=int, default=2000, help="proposals per image [2000]")
    demo.add_argument("--gt", type=int, default=20, help="ground-truth boxes per image [20]")
    demo.add_argument("--seed", type=int, default=0, help="random seed [0]")
    commands.add_parser("info", help="how the native library was built")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(parser, args)
    except (FileNotFoundError, ValueError, OutputError) as e:
        # User errors (missing files, bad settings, bad data, outputs that cannot be written) read
        # better without a traceback.
        print(f"overlap-sampler {args.command}: error: {e}", file=sys.stderr)
        return 2


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command == "info":
        from . import build_info

        print(json.dumps(build_info, indent=2))
    elif args.command == "demo":
        from .demo import run_demo

        print(run_demo(args.images, args.proposals, args.gt, args.seed))
    elif args.command == "train":
        config = config_from_args(args)
        from .engine.train import train

        metrics = train(config)
        if metrics.get("output_dir"):
            print(f"outputs in {metrics['output_dir']}")
    elif args.command == "eval":
        data = eval_data_from_args(parser, args)
        from .engine.evaluate import evaluate_checkpoint

        evaluate_checkpoint(args.checkpoint, **data, output_dir=args.output_dir, device=args.device,
                            batch_size=args.batch_size, progress=not args.no_progress,
                            box_nms_thresh=args.box_nms_thresh)
    elif args.command == "predict":
        from .engine.predict import predict_checkpoint

        predict_checkpoint(args.checkpoint, args.images, output_dir=args.output_dir, score_thresh=args.score_thresh,
                           draw=not args.no_draw, device=args.device, batch_size=args.batch_size,
                           progress=not args.no_progress)
    elif args.command == "analyze" and args.analysis == "iou-hist":
        data = iou_hist_data_from_args(parser, args)
        from .analysis.iou_hist import iou_hist_checkpoint

        iou_hist_checkpoint(args.checkpoint, **data, samplers=args.samplers, images=args.images, seed=args.seed,
                            output_dir=args.output_dir, device=args.device, batch_size=args.batch_size,
                            progress=not args.no_progress)
    elif args.command == "analyze":
        data = eval_data_from_args(parser, args)
        from .analysis.upper_bound import upper_bound_checkpoint

        upper_bound_checkpoint(args.checkpoint, **data, output_dir=args.output_dir, nms_thresh=args.nms_thresh,
                               device=args.device, batch_size=args.batch_size, progress=not args.no_progress)
    elif args.command == "ablate":
        from .analysis.ablate import AblationError, TrainCommandLine, ablate

        try:
            ablate(args, TrainCommandLine(add_train_arguments, config_from_args))
        except AblationError as e:  # a run failed: its log says why
            print(f"overlap-sampler ablate: error: {e}", file=sys.stderr)
            return 1
    elif args.command == "export":
        from .engine.export import export_checkpoint

        export_checkpoint(args.checkpoint, args.output, example_image_size=args.image_size,
                          backbone_output=args.backbone_output, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
