"""`overlap-sampler ablate`: the paper's Table 2 as a command. Variants of the `train` settings ×
seeds, one `train` run each in its own folder, then box (and mask) AP per variant: mean ± std over
seeds and the paired difference with a baseline (same seed: same initial weights and data order,
only the settings change). One seed is an anecdote; the spread across seeds says how much of a gap
is noise.

    overlap-sampler ablate --grid neg_strategy=uniform,hard,soft,linear num_bins=2,3 --seeds 0 1 2
    overlap-sampler ablate --variants table2.toml --baseline uniform --jobs 2
    overlap-sampler ablate --variant random --variant overlap --train-args "--dataset coco
        --train-images D --train-annotations F.json --val-images D2 --val-annotations F2.json"

Variants, in this order (the first is the baseline unless --baseline names another):
  --variant NAME=FLAGS   `train` flags under a name; a sampler's name alone (random, overlap...) is
                         its preset, `--sampler NAME`. Without any variant: the six samplers.
  --variants FILE.toml   [[variant]] tables: name = "..." (optional with settings), flags = "--x 1"
                         (or a list), settings = {neg_strategy = "soft", num_bins = 2} (train setting
                         names, as in a --config file, sampler settings included).
  --grid KEY=V1,V2 ...   the cartesian product; KEY is a train setting name (num_bins for --num-bins,
                         sampler for --sampler); a variant is named key=value,key=value.

Every run (but the evaluations below) is `overlap-sampler train <variant's flags> <--train-args>
--seed N --threads 1 --no-progress --resume auto --output-dir <runs-dir>/<name>-seed<N>`, `--jobs`
at a time. Its
folder records the settings (ab_settings.json): a run whose eval.json exists is read, not
repeated, so an interrupted ablation continues; a folder left by other settings is refused. Every
variant's command line is parsed and its TrainConfig built before any run starts, so an unknown
key or a bad value fails at once. The first failed run stops the ablation (runs not started are
cancelled) and names its log. Writes <out>/<name>.md and <out>/<name>.json.

A variant whose TrainConfig differs from an earlier variant's only in settings that training never
reads (EVAL_SETTINGS: the RoI head's test NMS threshold) is not trained again: once the trainings
are done, `overlap-sampler eval --box-nms-thresh T` scores the earlier variant's checkpoint of each
seed into the variant's own folder, as training's final evaluation runs (batch size, device, one
thread); its record names what it evaluated, and a base trained again is evaluated again. The
paper's Table 2c varies the test NMS of one model this way.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import itertools
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

from ..io_safety import prepare_output_dir, write_json, write_text
from ..sampling import SAMPLERS

HELP = "train variants of the settings x seeds and tabulate their AP (the paper's Table 2)"
# Every sampler the head offers: the baseline (torchvision's random sampler) first, ours last.
PRESETS = {name: ("--sampler", name)
           for name in ("random", *(s for s in SAMPLERS if s not in ("random", "overlap")), "overlap")}
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
KINDS = ("bbox", "segm")
SETTINGS_FILE = "ab_settings.json"  # the name benchmarks/sampler_ab.py gave it: its runs are reused
CHECKPOINT = "last_checkpoint.pth"  # what a finished `train` run leaves
# What ablate itself sets for every run: a variant may not.
RUN_SETTINGS = {"seed": "--seeds", "threads": "one thread a run", "progress": "--no-progress",
                "resume": "--resume auto", "output_dir": "--runs-dir"}
#: TrainConfig fields that only the final evaluation reads, with the `eval` flag that sets each.
EVAL_SETTINGS = {"box_nms_thresh": "--box-nms-thresh"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+-]")
_MAX_NAME = 200  # bytes; the folder adds -seed<N> within the usual 255


class AblationError(RuntimeError):
    """A training run of the ablation failed; the message names its log."""


@dataclasses.dataclass(frozen=True)
class Variant:
    """A name (its run folders are ``<name>-seed<N>``) and its `train` flags."""

    name: str
    flags: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """How a variant that trains as an earlier one is scored instead: ``base``'s checkpoints, with
    ``eval_flags``; `eval` names its output ``metrics_file``."""

    base: str
    eval_flags: tuple[str, ...]
    metrics_file: str


@dataclasses.dataclass(frozen=True)
class Run:
    """One (variant, seed) run and its folder: a training run, or (``base`` given) the evaluation
    of ``base``'s checkpoint, when training would repeat ``base``'s."""

    variant: Variant
    seed: int
    run_dir: Path
    train_flags: tuple[str, ...]  # the variant's flags, then the flags common to every run
    base: Optional["Run"] = None
    evaluation: Optional[Evaluation] = None

    @property
    def settings(self) -> dict[str, Any]:
        """What ``ab_settings.json`` records; an evaluation also records what it evaluated and how, so
        that its folder and a training's are never taken for each other."""
        record: dict[str, Any] = {"train_flags": list(self.train_flags), "seed": self.seed}
        if self.base is not None:
            record.update(evaluates=self.base.run_dir.name, eval_flags=list(self.evaluation.eval_flags))
        return record

    def command(self) -> list[str]:
        if self.base is not None:
            return [sys.executable, "-m", "overlap_sampler.cli", "eval", "--checkpoint",
                    str(self.base.run_dir / CHECKPOINT), *self.evaluation.eval_flags, "--output-dir",
                    str(self.run_dir), "--no-progress"]
        run = run_flags(self.seed, self.run_dir)
        return [sys.executable, "-m", "overlap_sampler.cli", "train", *self.train_flags, *run]

    def finished(self) -> bool:
        """eval.json is there (for an evaluation: written after its base's checkpoint, so a base trained
        again is evaluated again)."""
        done = self.run_dir / "eval.json"
        if self.base is None or not done.exists():
            return done.exists()
        checkpoint = self.base.run_dir / CHECKPOINT
        return checkpoint.exists() and done.stat().st_mtime >= checkpoint.stat().st_mtime


def run_flags(seed: int, run_dir: Path | str) -> list[str]:
    """What every run adds (as benchmarks/sampler_ab.py did): deterministic, one thread, resumable."""
    return ["--seed", str(seed), "--threads", "1", "--no-progress", "--resume", "auto", "--output-dir", str(run_dir)]


# ---------------------------------------------------------------------- the train command line
class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ValueError(message)


class TrainCommandLine:
    """`overlap-sampler train`'s flags, to map setting names to flags and check variants up front.

    ``add_arguments`` adds the train flags to a parser and ``build_config`` turns the parsed
    namespace into a TrainConfig (raising ``ValueError`` on a bad value): the CLI passes its own
    (``add_train_arguments``, ``config_from_args``), so that this module needs nothing above it.
    """

    def __init__(self, add_arguments: Callable[[argparse.ArgumentParser], None],
                 build_config: Callable[[argparse.Namespace], Any]):
        self.parser = _RaisingParser(prog="overlap-sampler train", add_help=False)
        add_arguments(self.parser)
        self.build_config = build_config
        self._actions = {opt: a for a in self.parser._actions for opt in a.option_strings}
        self._flag = {a.dest: a.option_strings[0] for a in self.parser._actions if a.option_strings}

    def _given(self, flags: Sequence[str]) -> set[str]:
        """The settings (argparse dests) that ``flags`` set."""
        return {k for k, v in vars(self.parser.parse_args(list(flags))).items() if k != "config" or v is not None}

    def keys(self) -> list[str]:
        """Every setting name a variant may set."""
        keys = {opt[2:].replace("-", "_") for opt in self._actions if opt.startswith("--")
                and not (opt.startswith("--no-") and opt.replace("--no-", "--", 1) in self._actions)}
        return sorted(keys - set(RUN_SETTINGS))

    def action(self, key: str) -> argparse.Action:
        """The flag of the setting ``key`` (``num_bins`` → ``--num-bins``); ``ValueError`` naming an unknown
        key or one that ablate sets itself."""
        if key in RUN_SETTINGS:
            raise ValueError(f"{key!r} is set by ablate for every run ({RUN_SETTINGS[key]}): not a variant setting")
        action = self._actions.get("--" + key.replace("_", "-"))
        if action is None or key.startswith("no_"):
            close = difflib.get_close_matches(key, self.keys(), n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else f" (known: {', '.join(self.keys())})"
            raise ValueError(f"unknown setting {key!r}: `overlap-sampler train` has no flag "
                             f"--{key.replace('_', '-')}{hint}")
        return action

    def flags(self, settings: Mapping[str, Any]) -> list[str]:
        """The flags of ``{setting name: value}`` (values as strings or TOML values): ``--key value``,
        ``--key``/``--no-key`` for true/false, ``--key v1 v2`` for a list or a space-separated string."""
        out: list[str] = []
        for key, value in settings.items():
            action = self.action(key)
            flag = "--" + key.replace("_", "-")
            if isinstance(action, argparse.BooleanOptionalAction):
                text = str(value).lower()
                if text not in ("true", "false"):
                    raise ValueError(f"setting {key!r} is true or false, got {value!r}")
                out.append(flag if text == "true" else "--no-" + key.replace("_", "-"))
            elif action.nargs == "*":
                out += [flag, *(map(str, value) if isinstance(value, list) else str(value).split())]
            elif isinstance(value, (dict, list)):
                raise ValueError(f"setting {key!r} takes one value, got {value!r}")
            else:
                out += [flag, str(value)]
        return out

    def check(self, variant: Variant, common: Sequence[str], seed: int) -> Any:
        """Parse a run's whole command line and build its TrainConfig; ``ValueError`` naming the variant
        if a flag is unknown, a value bad, or a setting one that ablate owns or needs."""
        flags = [*variant.flags, *common]
        try:
            given = vars(self.parser.parse_args(flags))
            twice = self._given(variant.flags) & self._given(common)
            if twice:  # the later, --train-args, would win silently
                raise ValueError(f"{', '.join(sorted(self._flag[d] for d in twice))} given both by the variant "
                                 "and by --train-args: set each setting in one place")
            owned = [k for k in RUN_SETTINGS if k in given]
            if owned:
                raise ValueError(f"--{owned[0].replace('_', '-')} is set by ablate for every run "
                                 f"({RUN_SETTINGS[owned[0]]})")
            config = self.build_config(self.parser.parse_args([*flags, *run_flags(seed, "ablate-check")]))
            if not config.eval_at_end or (config.stop_after or config.iterations) < config.iterations:
                raise ValueError("each run must train to the end and evaluate (drop --no-eval-at-end and "
                                 "--stop-after)")
        except ValueError as e:
            raise ValueError(f"variant {variant.name!r} (train flags: {shlex.join(flags)}): {e}") from e
        except FileNotFoundError as e:  # a --config file
            raise FileNotFoundError(f"variant {variant.name!r}: {e}") from e
        return config


# ---------------------------------------------------------------------- variants
def safe_name(text: str) -> str:
    """``text`` with every character but letters, digits and ``. _ , = + -`` made ``_``."""
    return _UNSAFE.sub("_", text)


def _check_name(name: str, origin: str) -> str:
    if not name or safe_name(name) != name or name[0] in ".-" or len(name.encode()) > _MAX_NAME:
        raise ValueError(f"{origin}: variant name {name!r} must be 1 to {_MAX_NAME} letters, digits and . _ , = + - "
                         "not starting with . or - (it names the run folders)")
    return name


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return " ".join(map(str, value))
    return str(value)


def settings_name(settings: Mapping[str, Any]) -> str:
    """``key=value,key=value``, made safe for a folder name."""
    return safe_name(",".join(f"{k}={_value_text(v)}" for k, v in settings.items()))


def parse_variant(text: str) -> Variant:
    """``NAME=FLAGS`` (`train` flags under a name), or a sampler's name: its preset."""
    name, sep, flags = text.partition("=")
    if not sep:
        if name not in PRESETS:
            raise ValueError(f"--variant {name!r} is not a sampler ({', '.join(PRESETS)}); "
                             "use NAME=\"--flag value ...\"")
        return Variant(name, PRESETS[name])
    return Variant(_check_name(name, f"--variant {text!r}"), tuple(shlex.split(flags)))


def grid_variants(specs: Sequence[str], train: TrainCommandLine) -> list[Variant]:
    """The cartesian product of ``KEY=V1,V2,...`` specs, the last key varying fastest."""
    axes: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key or not values:
            raise ValueError(f"--grid {spec!r}: expected KEY=VALUE[,VALUE...], e.g. neg_strategy=soft,linear")
        if key in axes:
            raise ValueError(f"--grid: the setting {key!r} is given twice")
        train.action(key)  # an unknown key fails here, before any value is looked at
        axes[key] = values.split(",")
        if "" in axes[key] or len(set(axes[key])) != len(axes[key]):
            raise ValueError(f"--grid {spec!r}: the values must be non-empty and differ")
    variants = []
    for values in itertools.product(*axes.values()):
        settings = dict(zip(axes, values))
        variants.append(Variant(_check_name(settings_name(settings), "--grid"), tuple(train.flags(settings))))
    return variants


def toml_variants(path: str, train: TrainCommandLine) -> list[Variant]:
    """The ``[[variant]]`` tables of a TOML file: ``name`` (optional when ``settings`` is given: then
    ``key=value,...``), ``flags`` (a string of flags or a list of them) and ``settings`` (a table of
    train setting names); the settings' flags come first."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    if not os.path.isfile(path):
        raise FileNotFoundError(f"variants file not found: {path}")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"variants file {path} could not be parsed: {e}") from e
    entries = data.get("variant")
    if set(data) != {"variant"} or not isinstance(entries, list) or not entries:
        raise ValueError(f"variants file {path}: expected [[variant]] tables and nothing else "
                         f"(found {', '.join(data) or 'nothing'})")
    variants = []
    for i, entry in enumerate(entries, 1):
        where = f"variants file {path}, variant {i}"
        unknown = sorted(set(entry) - {"name", "flags", "settings"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)} (known: name, flags, settings)")
        settings, flags = entry.get("settings", {}), entry.get("flags", [])
        if not isinstance(settings, dict):
            raise ValueError(f"{where}: settings must be a table, got {settings!r}")
        if isinstance(flags, str):
            flags = shlex.split(flags)
        if not (isinstance(flags, list) and all(isinstance(f, str) for f in flags)):
            raise ValueError(f"{where}: flags must be a string or a list of strings, got {flags!r}")
        if "name" not in entry and not settings:
            raise ValueError(f"{where}: give it a name (or settings, which name it)")
        name = entry["name"] if "name" in entry else settings_name(settings)
        if not isinstance(name, str):
            raise ValueError(f"{where}: name must be a string, got {name!r}")
        try:
            settings_flags = train.flags(settings)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
        variants.append(Variant(_check_name(name, where), (*settings_flags, *flags)))
    return variants


# ---------------------------------------------------------------------- runs
def evaluation_variants(variants: Sequence[Variant], configs: Sequence[Any]) -> dict[str, Evaluation]:
    """``{variant name: Evaluation}`` for every variant whose TrainConfig (``configs``, one per variant, at
    one seed) equals an earlier trained variant's but for :data:`EVAL_SETTINGS`: its training would be
    the base's, so the base's checkpoints are evaluated with its own values, as training's final
    evaluation runs (its evaluation batch size and device; one thread, see :func:`train_run`)."""
    from ..engine.evaluate import metrics_file_name

    out: dict[str, Evaluation] = {}
    trained: list[tuple[Variant, Any]] = []
    for variant, config in zip(variants, configs):
        for base, base_config in trained:
            if dataclasses.replace(config, **{k: getattr(base_config, k) for k in EVAL_SETTINGS}) == base_config:
                flags = tuple(x for k, flag in EVAL_SETTINGS.items() for x in (flag, str(getattr(config, k))))
                flags += ("--batch-size", str(config.eval_batch_size), "--device", config.device)
                out[variant.name] = Evaluation(base.name, flags, metrics_file_name(CHECKPOINT, config.box_nms_thresh))
                break
        else:
            trained.append((variant, config))
    return out


def plan(variants: Sequence[Variant], seeds: Sequence[int], common: Sequence[str], runs_dir: Path,
         evaluations: Optional[Mapping[str, Evaluation]] = None) -> list[Run]:
    """Every (seed, variant) run, seed by seed (``evaluations``: see :func:`evaluation_variants`);
    ``ValueError`` naming each folder that holds a run of other settings (or an unrecorded one): its
    results would be reported under this command line."""
    evaluations = evaluations or {}
    runs = []
    for s in seeds:
        trained = {}
        for v in variants:
            evaluation = evaluations.get(v.name)
            run = Run(v, s, Path(runs_dir) / f"{v.name}-seed{s}", (*v.flags, *common),
                      trained[evaluation.base] if evaluation else None, evaluation)
            trained[v.name] = run
            runs.append(run)
    refused = []
    for run in runs:
        if run.run_dir.exists() and not run.run_dir.is_dir():
            refused.append(f"{run.run_dir} is a file, not a run folder")
        elif run.run_dir.exists() and any(run.run_dir.iterdir()):
            record = run.run_dir / SETTINGS_FILE
            try:
                recorded = json.loads(record.read_text()) if record.exists() else None
            except ValueError:
                recorded = "unreadable"
            if recorded != run.settings:
                refused.append(f"{run.run_dir} holds a run of other settings ({recorded or 'unrecorded'}, "
                               f"not {run.settings})")
    if refused:
        raise ValueError("; ".join(refused) + ": remove " + ("it" if len(refused) == 1 else "them")
                         + " or choose another --runs-dir")
    return runs


def train_run(run: Run) -> float:
    """Train one run, or evaluate its base's checkpoint (the output in ``<run_dir>/stdout.log``); returns
    the wall seconds. Raises AblationError naming the log if it fails."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    write_json(str(run.run_dir / SETTINGS_FILE), run.settings)
    start = time.perf_counter()
    log = run.run_dir / "stdout.log"
    # An evaluation runs on one thread, as training's final evaluation did (--threads 1): the same
    # arithmetic, and no oversubscription beside the other jobs.
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if run.base is not None else None
    with open(log, "w") as out:
        proc = subprocess.run(run.command(), stdout=out, stderr=subprocess.STDOUT, env=env)
    if run.base is not None and proc.returncode == 0:
        written = run.run_dir / run.evaluation.metrics_file
        if not written.exists():
            raise AblationError(f"{run.variant.name} seed {run.seed}: `eval` wrote no {written.name}: see {log}")
        os.replace(written, run.run_dir / "eval.json")  # what read_run and finished() look for
    if proc.returncode != 0 or not run.finished():
        raise AblationError(f"{run.variant.name} seed {run.seed} failed (exit {proc.returncode}): see {log}\n"
                            f"command: {shlex.join(run.command())}")
    return time.perf_counter() - start


def read_run(run: Run) -> dict[str, Any]:
    """A finished run's AP in percent (None where COCO reports -1: no objects of that size) per kind
    (bbox, segm), and its training seconds per iteration (evaluation excluded)."""
    evaluation = json.loads((run.run_dir / "eval.json").read_text())
    trained = run.base or run  # an evaluation's training is its base's
    last = json.loads((trained.run_dir / "metrics.json").read_text())["history"][-1]
    kinds = {k: {m: (100 * v[m] if v.get(m, -1) >= 0 else None) for m in METRICS}
             for k, v in evaluation.items() if k in KINDS}
    return {"variant": run.variant.name, "seed": run.seed, "run_dir": str(run.run_dir),
            "seconds_per_iter": last["time"] / last["iteration"], **kinds}


def run_all(runs: Sequence[Run], jobs: int, progress: bool = True,
            prepare: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Train the unfinished runs, ``jobs`` at a time (``prepare()`` first, if any is unfinished), then
    evaluate the unfinished evaluations (their checkpoints are then all there), then read every run.
    The first failure starts no further run, waits for those in progress (they resume later) and
    raises AblationError."""
    todo = [run for run in runs if not run.finished()]
    if todo and prepare is not None:
        prepare()
    with tqdm(total=len(runs), initial=len(runs) - len(todo), desc="ablation runs", unit="run", disable=not progress,
              file=sys.stderr) as bar, ThreadPoolExecutor(jobs) as pool:
        _run_queue([r for r in todo if r.base is None], jobs, pool, bar)
        _run_queue([r for r in todo if r.base is not None], jobs, pool, bar)
    return [read_run(run) for run in runs]


def _run_queue(runs: Sequence[Run], jobs: int, pool: ThreadPoolExecutor, bar: tqdm) -> None:
    """``train_run`` of every run, ``jobs`` at a time; the first failure as in :func:`run_all`."""
    queue = iter(runs)
    # A run is handed to the pool only when a worker is free, so after a failure none is left
    # queued that a worker could pick up before the pool is shut.
    busy = {pool.submit(train_run, run): run for run in itertools.islice(queue, jobs)}
    while busy:
        done, _ = wait(busy, return_when=FIRST_COMPLETED)
        for future in done:
            run = busy.pop(future)
            try:
                seconds = future.result()
            except AblationError as e:
                if busy:
                    bar.write(f"{e}\nwaiting for the {len(busy)} run(s) in progress to finish...",
                              file=sys.stderr)
                raise
            what = "evaluated" if run.base is not None else "trained"
            bar.write(f"{run.variant.name} seed {run.seed}: {what} in {seconds:.0f} s", file=sys.stderr)
            bar.update()
            busy.update({pool.submit(train_run, nxt): nxt for nxt in itertools.islice(queue, 1)})


# ---------------------------------------------------------------------- report
def _stats(values: Sequence[float | None]) -> dict[str, Any] | None:
    if any(v is None for v in values):
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "values": list(values)}


def summarize(results: Sequence[dict], variants: Sequence[Variant], seeds: Sequence[int],
              baseline: str) -> dict[str, dict[str, dict[str, Any]]]:
    """Per kind (bbox, and segm when every run has it) and variant: each metric's mean, sample std and
    values over seeds (None where a metric is absent); ``delta_AP``, the paired AP difference with the
    baseline at the same seed, and ``wins``, the seeds at which the variant's AP is higher (None for
    the baseline); ``seconds_per_iter``, the mean over seeds."""
    by = {(r["variant"], r["seed"]): r for r in results}
    kinds = [k for k in KINDS if all(k in r for r in results)]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for kind in kinds:
        out[kind] = {}
        for v in variants:
            rows = [by[v.name, s] for s in seeds]
            entry: dict[str, Any] = {m: _stats([r[kind][m] for r in rows]) for m in METRICS}
            diffs = [r[kind]["AP"] - by[baseline, s][kind]["AP"] for r, s in zip(rows, seeds)]
            entry["delta_AP"] = None if v.name == baseline else _stats(diffs)
            entry["wins"] = None if v.name == baseline else sum(d > 0 for d in diffs)
            entry["seeds"] = len(seeds)
            entry["seconds_per_iter"] = statistics.fmean(r["seconds_per_iter"] for r in rows)
            out[kind][v.name] = entry
    return out


def _cell(stats: dict[str, Any] | None, sign: str = "") -> str:
    if stats is None:
        return "—"
    mean = f"{stats['mean']:{sign}.1f}"
    return mean if stats["std"] is None else f"{mean} ± {stats['std']:.1f}"


def report(summary: dict, variants: Sequence[Variant], seeds: Sequence[int], common: Sequence[str],
           baseline: str, title: str,
           evaluations: Optional[Mapping[str, Evaluation]] = None) -> str:
    """The markdown tables of ``summarize``'s numbers: per kind, one row per variant, then the AP of each run;
    which variants are evaluations of another's checkpoints (``evaluations``, see :func:`evaluation_variants`)."""
    lines = [f"# {title}: {len(variants)} variants × {len(seeds)} seeds (seeds {', '.join(map(str, seeds))})", "",
             f"`{shlex.join(['overlap-sampler', 'train', *common])}` + the variant's flags, `--seed N --threads 1`. "
             "AP in percent on the validation set; mean ± sample standard deviation over seeds (— where COCO "
             f"finds no objects of that size). Δ AP: the paired difference with `{baseline}` at the same seed "
             "(mean ± std); wins: in how many seeds the variant's AP is higher. s/iter: training seconds per "
             "iteration (evaluation excluded), mean over seeds, of runs side by side on one machine: compare "
             "them within one table only.", ""]
    for name, e in (evaluations or {}).items():
        lines += [f"`{name}` is not trained: its settings train as `{e.base}`'s, so `{e.base}`'s checkpoint of "
                  f"each seed is evaluated with `overlap-sampler eval {shlex.join(e.eval_flags)}` on one thread "
                  f"(its s/iter are `{e.base}`'s).", ""]
    for kind, table in summary.items():
        lines += [f"## {kind}", "", "| variant | flags | " + " | ".join(METRICS) + f" | Δ AP vs `{baseline}` | wins "
                  "| s/iter |", "|---|---|" + "---|" * len(METRICS) + "---|---|---|"]
        for v in variants:
            row = table[v.name]
            wins = "—" if row["wins"] is None else f"{row['wins']}/{row['seeds']}"
            lines.append(f"| `{v.name}` | `{shlex.join(v.flags)}` | " + " | ".join(_cell(row[m]) for m in METRICS)
                         + f" | {_cell(row['delta_AP'], '+')} | {wins} | {row['seconds_per_iter']:.3f} |")
        lines += ["", f"{kind} AP of each run:", "", "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " |",
                  "|---|" + "---|" * len(seeds)]
        for v in variants:
            lines.append(f"| `{v.name}` | " + " | ".join(f"{x:.1f}" for x in table[v.name]["AP"]["values"]) + " |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `overlap-sampler ablate`."""
    parser.add_argument("--variant", action="append", default=[], metavar="NAME[=FLAGS]",
                        help=f"a sampler ({', '.join(PRESETS)}: its preset) or NAME=\"train flags\"; repeatable")
    parser.add_argument("--variants", metavar="FILE.toml", help="[[variant]] tables: name, flags, settings")
    parser.add_argument("--grid", action="extend", nargs="+", default=[], metavar="KEY=V1,V2",
                        help="train settings (names as in a config file) and their values: every combination "
                             "is a variant")
    parser.add_argument("--baseline", help="the variant of the paired differences [the first]")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="[0 1 2]")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, one CPU thread each [1]")
    parser.add_argument("--train-args", default="", metavar="FLAGS",
                        help="train flags of every run: data (--dataset coco --train-images ...), model, "
                             "schedule, e.g. \"--arch maskrcnn --iterations 3000\"")
    parser.add_argument("--runs-dir", type=Path, default=Path("output/ablate/runs"),
                        help="one folder per run, <name>-seed<N> [output/ablate/runs]")
    parser.add_argument("--out", type=Path, default=Path("output/ablate"),
                        help="where NAME.md and NAME.json go [output/ablate]")
    parser.add_argument("--name", default="ablation", help="results file name [ablation]")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def variants_from_args(args: argparse.Namespace, train: TrainCommandLine) -> list[Variant]:
    """--variant, then --variants, then --grid; the six samplers when none is given."""
    variants = [parse_variant(text) for text in args.variant]
    if args.variants:
        variants += toml_variants(args.variants, train)
    if args.grid:
        variants += grid_variants(args.grid, train)
    variants = variants or [Variant(name, flags) for name, flags in PRESETS.items()]
    names = [v.name for v in variants]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"variant names must differ: {', '.join(twice)} given more than once")
    return variants


def _prepare_synthetic(configs: Sequence[Any]) -> Callable[[], None]:
    """Generate the built-in dataset once before runs start side by side (generation is locked anyway)."""
    roots = {c.data_root for c in configs if c.dataset == "synthetic"}

    def prepare() -> None:
        from ..data.synthetic import synthetic_dataset

        for root in roots:
            for split in ("train", "val"):
                synthetic_dataset(split, root=root)
    return prepare


def ablate(args: argparse.Namespace, train: TrainCommandLine) -> dict[str, Any]:
    """`overlap-sampler ablate`: check everything, train what is missing, write and print the tables.
    Returns the JSON written. ``ValueError`` for a bad command line, before any run starts."""
    variants = variants_from_args(args, train)
    baseline = args.baseline or variants[0].name
    if baseline not in {v.name for v in variants}:
        raise ValueError(f"--baseline {baseline!r} is not a variant ({', '.join(v.name for v in variants)})")
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds must differ, got {args.seeds}")
    if not args.name or safe_name(args.name) != args.name:
        raise ValueError(f"--name {args.name!r} must be letters, digits and . _ , = + - (it names the results files)")
    if args.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
    common = shlex.split(args.train_args)
    configs = [train.check(v, common, seed) for v in variants for seed in args.seeds]
    evaluations = evaluation_variants(variants, configs[::len(args.seeds)])  # each variant at the first seed
    prepare_output_dir(str(args.out), "results folder")  # before the hours of training
    prepare_output_dir(str(args.runs_dir), "runs folder")
    runs = plan(variants, args.seeds, common, args.runs_dir, evaluations)

    results = run_all(runs, args.jobs, progress=not args.no_progress, prepare=_prepare_synthetic(configs))
    summary = summarize(results, variants, args.seeds, baseline)
    table = report(summary, variants, args.seeds, common, baseline, f"Ablation `{args.name}`", evaluations)
    saved = {"name": args.name, "train_args": common, "seeds": args.seeds, "baseline": baseline,
             "variants": [{"name": v.name, "flags": list(v.flags)} for v in variants],
             "evaluations": {name: {"checkpoints_of": e.base, "eval_flags": list(e.eval_flags)}
                             for name, e in evaluations.items()},
             "runs": results, "summary": summary}
    write_text(str(args.out / f"{args.name}.md"), table)
    write_json(str(args.out / f"{args.name}.json"), saved, indent=1)
    print(table)
    return saved
