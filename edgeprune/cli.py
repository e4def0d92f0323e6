"""The `edgeprune` command line: parse options, call the library, print results.

Every user-facing problem is an EdgepruneError, shown as one line and exit code 1.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import MISSING, fields, replace
from functools import reduce
from importlib import import_module
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from edgeprune.errors import EdgepruneError
from edgeprune.logs import notices_logged_in
from edgeprune.precisions import FITTED_PRECISIONS, PRECISIONS

console = Console(stderr=True)
out = Console()

MODEL_HELP = "hub id, local folder, pruned folder, or alias smollm2-135m (default) / minilm-l6"
TOKENIZER_OPTION = click.option(
    "--tokenizer",
    metavar="PATH_OR_ID",
    help="tokenizer folder or hub id, for a model saved without one (steps that read text need it)",
)


class FiniteRange(click.FloatRange):
    """A float range that also refuses nan and inf when the options are parsed (a NaN passes every comparison)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


POSITIVE = FiniteRange(min=0, min_open=True)


class EdgepruneGroup(click.Group):
    """Turns EdgepruneError into click's one-line `Error: ...` and exit status 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgepruneError as err:
            raise click.ClickException(str(err)) from None


@click.group(cls=EdgepruneGroup)
@click.version_option(package_name="edgeprune")
def main() -> None:
    """Prune transformer language models for edge devices, export them to ONNX, and profile them."""


def parse_targets(value: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in value.split(",") if t.strip())


class OwnedChoice(click.Choice):
    """A choice list read, when first needed, from the module that owns it (which imports torch, and the CLI
    must start without it): one definition of each list."""

    def __init__(self, owner: str):
        self.owner, self.case_sensitive = owner, True

    @property
    def choices(self) -> tuple[str, ...]:
        module, name = self.owner.split(":")
        return getattr(import_module(module), name)


class LazyHelp(click.Option):
    """An option whose help ends with text made when --help is printed, from the criteria registry or a config
    dataclass: their modules import torch, which the CLI must not need to start (`generate` runs without it)."""

    def __init__(self, *decls, more_help: Callable[[], str], **kwargs):
        super().__init__(*decls, **kwargs)
        self.more_help = more_help

    def get_help_record(self, ctx: click.Context):
        given = self.help
        self.help = f"{given}  [{self.more_help()}]"
        try:
            return super().get_help_record(ctx)
        finally:
            self.help = given


class ConfigDefault(LazyHelp):
    """An option left None unless given, so that the config dataclass's default applies (the CLI keeps none
    of its own); --help shows that default. `config` is "module:Class", `field` a dotted attribute path,
    `choices` more help to show before the default."""

    def __init__(self, *decls, config: str, field: str | None = None, choices: Callable[[], str] | None = None, **kw):
        super().__init__(*decls, more_help=self.shown_default, default=None, **kw)
        self.config, self.field, self.choices = config, field, choices

    def shown_default(self) -> str:
        module, name = self.config.split(":")
        first, *rest = (self.field or self.name).split(".")
        field = next(f for f in fields(getattr(import_module(module), name)) if f.name == first)
        value = reduce(getattr, rest, field.default_factory() if field.default is MISSING else field.default)
        shown = f"default: {','.join(value) if isinstance(value, tuple) else value}"
        return f"{self.choices()}; {shown}" if self.choices else shown


RUN = "edgeprune.run:RunConfig"
SPEC = "edgeprune.structure:PruneSpec"
RECOVERY = "edgeprune.recover.config:RecoveryConfig"
CALIBRATION = "edgeprune.calibration:CalibrationSettings"
TAYLOR = "edgeprune.criteria.taylor:TaylorOptions"
RUN_RECOVERY = ("recover_minutes", "recover_lr")  # run options that set fields of RunConfig.recovery
REFIT_TARGET_OPTION = click.option(  # prune's and run's
    "--refit-target",
    type=OwnedChoice("edgeprune.compensate:REFIT_TARGETS"),
    cls=ConfigDefault,
    config=RUN,
    help="layer: rebuild each cut projection's own output; stream: the dense model's residual stream, undoing the "
    "earlier cuts' drift (auto: once the text gives enough re-fit windows not to fit its noise)",
)


def given(options: dict) -> dict:
    """The options given on the command line: the rest keep their config dataclass's default."""
    return {key: value for key, value in options.items() if value is not None}


def recovery_methods() -> str:
    from edgeprune.recover.config import METHODS

    return "|".join(METHODS)


def recovery_schedules() -> str:
    from edgeprune.recover.config import SCHEDULES

    return "|".join(SCHEDULES)


def recovery_precisions() -> str:
    from edgeprune.recover.config import PRECISIONS as TRAINING_PRECISIONS

    return "|".join(TRAINING_PRECISIONS)


def default_steps() -> str:
    from edgeprune.recover.config import DEFAULT_STEPS

    return f"default: {DEFAULT_STEPS} when no budget is given"


def criterion_names() -> str:
    from edgeprune.criteria import CRITERIA

    return "one of " + ", ".join(sorted(CRITERIA))


def criterion_option_names() -> str:
    from edgeprune.criteria import options_help

    return options_help()


def criterion_windows() -> str:
    from edgeprune.criteria import CRITERIA

    counts = ", ".join(f"{name} {spec.windows}" for name, spec in sorted(CRITERIA.items()) if spec.needs_calibration)
    return f"default, by criterion: {counts}"


def taylor_choices(key: str) -> Callable[[], str]:
    """The values of one of taylor's options, which --taylor and --aggregation set."""

    def text() -> str:
        from edgeprune.criteria.taylor import AGGREGATIONS, ORDERS

        return "|".join({"taylor": ORDERS, "aggregation": tuple(AGGREGATIONS)}[key])

    return text


def calibration_options(command):
    """Options shared by `score` and `prune` for criteria that read calibration text."""
    options = [
        click.option(
            "--calibration",
            help="text file, `wikitext2`, a GLUE task's train sentences (sst2, ...; labelled for taylor on a "
            "classifier), or name:config:split (default: packaged text); its held-out tail is never sampled",
        ),
        click.option(
            "--calib-samples", type=int, cls=LazyHelp, more_help=criterion_windows, help="calibration windows"
        ),
        click.option(
            "--calib-seq-len",
            type=int,
            cls=ConfigDefault,
            config=CALIBRATION,
            field="seq_len",
            help="tokens per calibration window",
        ),
        click.option(
            "--taylor",
            cls=ConfigDefault,
            config=TAYLOR,
            choices=taylor_choices("taylor"),
            help="taylor: element-wise order, or vector-wise",
        ),
        click.option(
            "--aggregation",
            cls=ConfigDefault,
            config=TAYLOR,
            choices=taylor_choices("aggregation"),
            help="taylor: how a coupled group's per-projection scores combine",
        ),
        click.option(
            "--criterion-option",
            "criterion_options",
            multiple=True,
            metavar="KEY=VALUE",
            cls=LazyHelp,
            more_help=criterion_option_names,
            help="a criterion option, e.g. selection=entropy (repeatable); each criterion's options",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def read_text(loaded, calibration):
    """The calibration source tokenized once per command: scoring and re-fitting sample its head."""
    from edgeprune.calibration import read_calibration
    from edgeprune.loading import require_tokenizer

    tokenizer = require_tokenizer(loaded.tokenizer, loaded.source, "calibration")
    with console.status("reading calibration text"):
        return read_calibration(tokenizer, calibration.source)


def parse_criterion_options(pairs: tuple[str, ...]) -> dict:
    """KEY=VALUE pairs with numbers parsed as numbers: the criterion validates names and values."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise EdgepruneError(f"criterion option '{pair}' is not KEY=VALUE: write e.g. --criterion-option seeds=4")
        for parse in (int, float):
            try:
                options[key.strip()] = parse(value)
                break
            except ValueError:
                continue
        else:
            options[key.strip()] = value
    return options


def options_for(criterion: str, taylor: str | None, aggregation: str | None, pairs: tuple[str, ...]) -> dict:
    """--criterion-option pairs, plus --taylor/--aggregation for taylor (the flags are its options only)."""
    flags = {"taylor": taylor, "aggregation": aggregation} if criterion == "taylor" else {}
    return {key: value for key, value in flags.items() if value is not None} | parse_criterion_options(pairs)


def score_with_progress(loaded, adapter, criterion: str, calibration, options: dict, text=None):
    """Score every group, with a progress bar per step the criterion reports (e.g. one per layer)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from edgeprune.criteria import score_groups, scoring_inputs

    with console.status("preparing the criterion's inputs"):
        inputs = scoring_inputs(criterion, loaded, calibration, options, text)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        tasks: dict[str, int] = {}

        def report(step: str, done: int, total: int) -> None:
            if step not in tasks:
                tasks[step] = progress.add_task(f"{criterion}: {step}", total=total)
            progress.update(tasks[step], completed=done, total=total)

        return score_groups(criterion, loaded.model, adapter, replace(inputs, progress=report))


def prune_whole_layers(
    model: str | None,
    settings: tuple,
    calibration,
    output: Path,
    overwrite: bool,
    tokenizer: str | None = None,
) -> None:
    """`prune --targets layers`: remove the least important whole layers (sparsity x the unprotected layers)."""
    from edgeprune.checkpoint import save_pruned
    from edgeprune.layers import layer_importance, layers_to_remove, remove_layers
    from edgeprune.loading import load_model
    from edgeprune.models import adapter_for
    from edgeprune.outputs import check_output, local_inputs
    from edgeprune.structure import count_parameters

    sparsity, protect_first, protect_last, measure = settings
    if not 0.0 <= sparsity < 1.0:
        raise EdgepruneError(f"sparsity {sparsity} is outside [0, 1): give a fraction such as 0.2")
    output = check_output(output, overwrite, local_inputs(model, calibration.source))
    with console.status("loading model"):
        loaded = load_model(model, tokenizer)
    adapter = adapter_for(loaded.model.config)
    positions = getattr(loaded.model.config, "max_position_embeddings", calibration.seq_len)
    calibration = replace(calibration, seq_len=min(calibration.seq_len, positions))
    batch = read_text(loaded, calibration).sample(calibration)
    with console.status(f"measuring layer importance ({measure})"):
        importance = layer_importance(loaded.model, adapter, batch, measure)
    n_layers = len(importance)
    n_remove = round(sparsity * max(0, n_layers - protect_first - protect_last))
    removed = layers_to_remove(importance, n_remove, protect_first, protect_last)
    params_before = count_parameters(loaded.model)
    remove_layers(loaded.model, adapter, removed)
    provenance = {
        "source": loaded.source,
        "source_sha256": loaded.source_hash,
        "criterion": measure,
        "seed": calibration.seed,
        "layer_importance": importance.tolist(),
        "spec": {
            "targets": ["layers"],
            "sparsity": sparsity,
            "protect_first": protect_first,
            "protect_last": protect_last,
        },
        "params_before": params_before,
        "params_after": count_parameters(loaded.model),
        "total_removed": 1 - count_parameters(loaded.model) / params_before,
    }
    with console.status(f"saving to {output}"), notices_logged_in(output):
        save_pruned(loaded.model, loaded.tokenizer, output, provenance, overwrite=overwrite, protect=loaded.folder)
    out.print(f"removed layers {removed} of {n_layers} from {loaded.source} ({measure}) -> {output}")


@main.command()
@click.argument("model", required=False)
@click.option(
    "--criterion", default="fluctuation", show_default=True, cls=LazyHelp, more_help=criterion_names, help="criterion"
)
@click.option("--sparsity", type=float, required=True, help="fraction of prunable parameters to remove, in [0, 1)")
@click.option(
    "--targets", default="ffn,heads", show_default=True, help="groups to cut: ffn, heads or both; or whole layers"
)
@click.option(
    "--layer-measure",
    type=OwnedChoice("edgeprune.layers:LAYER_MEASURES"),
    default="block-influence",
    show_default=True,
    help="--targets layers: how a layer's importance is measured",
)
@click.option("--protect-first", type=int, cls=ConfigDefault, config=RUN, help="leave the first K layers whole")
@click.option("--protect-last", type=int, cls=ConfigDefault, config=RUN, help="leave the last K layers whole")
@click.option(
    "--round-to", type=int, cls=ConfigDefault, config=SPEC, help="round each layer's FFN width to a multiple of M"
)
@click.option("--prune-kv-heads", is_flag=True, help="allow removing whole KV groups (runtime needs per-layer caches)")
@click.option("--scores", "scores_path", type=click.Path(path_type=Path), help="reuse scores from `edgeprune score`")
@click.option("--seed", default=0, show_default=True, help="seed for criteria that sample")
@calibration_options
@click.option(
    "--allocation",
    type=OwnedChoice("edgeprune.compensate:CUT_ALLOCATIONS"),
    cls=ConfigDefault,
    config=SPEC,
    help="uniform: same sparsity per layer; global: rank groups across layers on normalized scores; "
    "errors: FFN widths where the re-fit error is smallest (needs compensation)",
)
@click.option(
    "--min-keep", type=float, cls=ConfigDefault, config=SPEC, help="global allocation keeps this fraction of each layer"
)
@click.option(
    "--compensate/--no-compensate",
    default=True,
    show_default=True,
    help="re-fit each cut output projection by least squares on the calibration text, layer by layer",
)
@click.option(
    "--selection",
    type=OwnedChoice("edgeprune.compensate:CUT_SELECTIONS"),
    default="scores",
    show_default=True,
    help="scores: keep the criterion's best groups; obs: remove the groups the re-fit rebuilds best",
)
@REFIT_TARGET_OPTION
@click.option(
    "--refit-windows",
    type=click.IntRange(min=1),
    cls=ConfigDefault,
    config=RUN,
    field="refit_samples",
    help="at most this many non-overlapping calibration windows feed the re-fit (more text, better re-fit, "
    "longer: 512 windows took SmolLM2-135M's 35%% cut from 2.01x to 1.90x dense perplexity in 14 CPU-minutes)",
)
@click.option(
    "--bias-compensation",
    is_flag=True,
    help="also fit a bias (adds one to Llama projections); with --no-compensate: FLAP's mean compensation",
)
@TOKENIZER_OPTION
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="folder for the pruned model")
@click.option("--overwrite", is_flag=True, help="replace an existing output folder")
def prune(
    model: str | None,
    criterion: str,
    sparsity: float,
    targets: str,
    protect_first: int | None,
    protect_last: int | None,
    round_to: int | None,
    prune_kv_heads: bool,
    scores_path: Path | None,
    seed: int,
    calibration: str | None,
    calib_samples: int | None,
    calib_seq_len: int | None,
    taylor: str | None,
    aggregation: str | None,
    criterion_options: tuple[str, ...],
    allocation: str | None,
    min_keep: float | None,
    layer_measure: str,
    compensate: bool,
    selection: str,
    refit_target: str | None,
    refit_windows: int | None,
    bias_compensation: bool,
    tokenizer: str | None,
    output: Path,
    overwrite: bool,
) -> None:
    """Score MODEL's groups, remove the lowest-scoring ones physically, and save the result."""
    from edgeprune.calibration import CalibrationSettings
    from edgeprune.checkpoint import save_pruned
    from edgeprune.compensate import ERRORS_ALLOCATION
    from edgeprune.criteria import GroupScores
    from edgeprune.criteria.base import criterion_spec
    from edgeprune.loading import load_model
    from edgeprune.models import adapter_for
    from edgeprune.outputs import check_output, local_inputs
    from edgeprune.run import RunConfig
    from edgeprune.structure import PruneSpec, prune_model

    calib = CalibrationSettings(calibration, calib_samples, seed=seed, **given({"seq_len": calib_seq_len}))
    protect_first = RunConfig.protect_first if protect_first is None else protect_first  # as safe as `run`
    protect_last = RunConfig.protect_last if protect_last is None else protect_last
    if parse_targets(targets) == ("layers",):
        layer_settings = (sparsity, protect_first, protect_last, layer_measure)
        return prune_whole_layers(model, layer_settings, calib, output, overwrite, tokenizer)
    if allocation == ERRORS_ALLOCATION and not compensate:
        raise EdgepruneError("--allocation errors ranks removals by their error after the re-fit: drop --no-compensate")
    planned = "uniform" if allocation == ERRORS_ALLOCATION else allocation  # the errors move the uniform plan's neurons
    spec = PruneSpec(
        sparsity,
        parse_targets(targets),
        protect_first,
        protect_last,
        **given({"round_to": round_to, "allocation": planned, "min_keep": min_keep}),
    )
    output = check_output(output, overwrite, local_inputs(model, scores_path, calibration))
    with console.status("loading model"):
        loaded = load_model(model, tokenizer)
    adapter = adapter_for(loaded.model.config, prune_kv_heads=prune_kv_heads)
    text_free = scores_path is not None or not criterion_spec(criterion).needs_calibration
    needs_text = selection != "scores" or allocation == ERRORS_ALLOCATION
    if compensate and loaded.tokenizer is None and text_free and not needs_text:
        compensate = False  # compensation runs whenever calibration text is available; without a tokenizer it is not
        console.print("note: the model has no tokenizer, so the cut is not re-fit (pass --tokenizer to re-fit it)")
    positions = getattr(loaded.model.config, "max_position_embeddings", calib.seq_len)
    calib = replace(calib, seq_len=min(calib.seq_len, positions))  # windows no longer than the model reads
    text = None if text_free and not (compensate or bias_compensation) else read_text(loaded, calib)
    if scores_path is not None:
        scores = GroupScores.load(scores_path)
        criterion = scores.criterion or criterion
    else:
        options = options_for(criterion, taylor, aggregation, criterion_options)
        scores = score_with_progress(loaded, adapter, criterion, calib, options, text)
    scores.check_matches(loaded.model, adapter)
    if selection == "obs" and not compensate:
        raise EdgepruneError("--selection obs chooses groups by their error after the re-fit: drop --no-compensate")
    before_cut = None
    if bias_compensation and not compensate:
        from edgeprune.compensate import compensate_bias, output_means

        with console.status("measuring mean activations for bias compensation"):
            means = output_means(loaded.model, adapter, text.sample(calib))

        def before_cut(keep):
            compensate_bias(loaded.model, adapter, keep, means)

    if compensate:
        import torch

        from edgeprune.calibration import REFIT_WINDOWS, disjoint_windows
        from edgeprune.compensate import CompensateOptions, allocate_by_errors, compensated_cut, resolved_target
        from edgeprune.run import RunConfig
        from edgeprune.structure import select_keep

        # prune measures no held-out text: the re-fit reads non-overlapping windows of all of it
        windows = refit_windows or REFIT_WINDOWS
        batch = disjoint_windows(torch.cat([text.head, text.heldout]), calib.seq_len, windows)
        asked = refit_target or RunConfig.refit_target
        refit_target = resolved_target(asked, len(batch), adapter, adapter.layers(loaded.model)[0])
        options = CompensateOptions(add_bias=bias_compensation, target=refit_target)

        def cut(model, adapter, keep, plan):
            if allocation == ERRORS_ALLOCATION:
                with console.status("allocating the cut across layers by re-fit error"):
                    plan = allocate_by_errors(model, adapter, batch, plan, spec.min_keep, options)
                keep = select_keep(model, adapter, scores, plan)
            with console.status(f"cutting and re-fitting layer by layer ({selection} selection)"):
                return compensated_cut(model, adapter, keep, plan, batch, selection, options)

    else:
        cut = None
    summary = prune_model(loaded.model, adapter, scores, spec, before_cut, cut)
    provenance = {
        "source": loaded.source,
        "source_sha256": loaded.source_hash,
        "criterion": criterion,
        "seed": seed,
        "calibration": {"source": calibration or "packaged", "samples": calib_samples, "seq_len": calib.seq_len},
        "bias_compensation": bias_compensation,
        "compensation": {"selection": selection, "target": refit_target, "windows": len(batch)} if compensate else None,
        "spec": {**spec.__dict__, "targets": list(spec.targets), "prune_kv_heads": prune_kv_heads},
        "params_before": summary.params_before,
        "params_after": summary.params_after,
        "prunable_removed": summary.prunable_removed,
        "total_removed": summary.total_removed,
    }
    with console.status(f"saving to {output}"), notices_logged_in(output):
        save_pruned(loaded.model, loaded.tokenizer, output, provenance, overwrite=overwrite, protect=loaded.folder)
    out.print(
        f"pruned {loaded.source} with {criterion}: {summary.prunable_removed:.1%} of prunable parameters, "
        f"{summary.total_removed:.1%} of all ({summary.params_before:,} -> {summary.params_after:,}) -> {output}"
    )


@main.command()
@click.argument("model", required=False)
@click.option(
    "--criterion", default="magnitude", show_default=True, cls=LazyHelp, more_help=criterion_names, help="criterion"
)
@click.option("--seed", default=0, show_default=True, help="seed for calibration windows and criteria that sample")
@calibration_options
@click.option("--prune-kv-heads", is_flag=True, help="score for a cut that may remove whole KV groups")
@TOKENIZER_OPTION
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="scores file (.safetensors)")
def score(
    model: str | None,
    criterion: str,
    seed: int,
    calibration: str | None,
    calib_samples: int | None,
    calib_seq_len: int | None,
    taylor: str | None,
    aggregation: str | None,
    criterion_options: tuple[str, ...],
    prune_kv_heads: bool,
    tokenizer: str | None,
    output: Path,
) -> None:
    """Score every FFN neuron and attention group of MODEL once; `prune --scores` reuses the file for any cut."""
    from edgeprune.calibration import CalibrationSettings
    from edgeprune.criteria import GroupScores
    from edgeprune.loading import load_model
    from edgeprune.models import adapter_for
    from edgeprune.outputs import check_output_file, local_inputs

    calib = CalibrationSettings(calibration, calib_samples, seed=seed, **given({"seq_len": calib_seq_len}))
    output = check_output_file(output, local_inputs(model, calibration), GroupScores.is_scores_file)
    with console.status("loading model"):
        loaded = load_model(model, tokenizer)
    adapter = adapter_for(loaded.model.config, prune_kv_heads=prune_kv_heads)
    options = options_for(criterion, taylor, aggregation, criterion_options)
    scores = score_with_progress(loaded, adapter, criterion, calib, options)
    output.parent.mkdir(parents=True, exist_ok=True)
    scores.save(output)
    table = Table(title=f"{criterion} scores of {loaded.source} (higher = keep)")
    for column in ("layer", "FFN min", "FFN median", "FFN max", "heads min", "heads median", "heads max"):
        table.add_column(column, justify="right")
    for i, (ffn, heads) in enumerate(zip(scores.ffn, scores.heads, strict=True)):
        cells = [f"{v:.3g}" for s in (ffn, heads) for v in (s.min(), s.median(), s.max())]
        table.add_row(str(i), *cells)
    out.print(table)
    n_ffn, n_heads = sum(len(s) for s in scores.ffn), sum(len(s) for s in scores.heads)
    out.print(f"saved {n_ffn} FFN and {n_heads} head scores -> {output}")


@main.command()
@click.argument("model", required=False)
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
def inspect(model: str | None, as_json: bool) -> None:
    """Per-layer widths, parameter count and size of MODEL (a pruned folder or any model)."""
    from edgeprune.checkpoint import read_provenance
    from edgeprune.loading import load_model
    from edgeprune.structure import describe_model

    loaded = load_model(model)
    info = describe_model(loaded.model)
    path = Path(loaded.source)
    if path.is_dir():
        info["size_mb"] = sum(p.stat().st_size for p in path.glob("*.safetensors")) / 1e6
        provenance = read_provenance(path)
        for key in ("source", "criterion", "params_before", "prunable_removed", "total_removed"):
            if key in provenance:
                info[key] = provenance[key]
    if as_json:
        out.print_json(json.dumps(info))
        return
    table = Table(title=f"{loaded.source} ({info['model_type']})")
    for column in ("layer", "FFN neurons", "query heads", "KV heads", "prunable params"):
        table.add_column(column, justify="right")
    for i, layer in enumerate(info["layers"]):
        table.add_row(str(i), str(layer["ffn"]), str(layer["heads"]), str(layer["kv_heads"]), f"{layer['params']:,}")
    out.print(table)
    out.print(f"parameters: {info['params']:,}  prunable: {info['prunable_params']:,}")
    if "size_mb" in info:
        out.print(f"size on disk: {info['size_mb']:.1f} MB")
    if "prunable_removed" in info:
        out.print(
            f"removed from {info['source']} by {info['criterion']}: {info['prunable_removed']:.1%} of prunable "
            f"parameters, {info['total_removed']:.1%} of all ({info['params_before']:,} before)"
        )


@main.command()
@click.argument("pruned_dir")
@click.option(
    "--data",
    help="Alpaca JSON/JSONL, text, labelled TSV/JSONL, or name[:config[:split]] (default with --teacher: "
    "text the teacher writes)",
)
@click.option("--teacher", help="distill from this model (the dense one the pruned model came from)")
@click.option("--method", cls=ConfigDefault, config=RECOVERY, choices=recovery_methods, help="what trains")
@click.option("--temperature", type=float, cls=ConfigDefault, config=RECOVERY, help="distillation temperature")
@click.option("--top-k", type=int, help="distill on the teacher's top-k tokens, the rest lumped (default: all)")
@click.option("--lm-weight", type=float, cls=ConfigDefault, config=RECOVERY, help="weight of the LM loss beside the KL")
@click.option("--steps", type=int, cls=LazyHelp, more_help=default_steps, help="optimizer steps")
@click.option("--epochs", type=float, help="passes over the training examples (instead of --steps)")
@click.option("--minutes", type=float, help="wall-time cap; stops at the first budget reached")
@click.option("--cpu-minutes", type=float, help="cap on this process's CPU time (all threads): load-independent")
@click.option("--rank", type=int, cls=ConfigDefault, config=RECOVERY, help="LoRA rank")
@click.option("--alpha", type=int, cls=ConfigDefault, config=RECOVERY, help="LoRA alpha")
@click.option("--lr", type=float, cls=ConfigDefault, config=RECOVERY, help="AdamW learning rate")
@click.option(
    "--schedule",
    cls=ConfigDefault,
    config=RECOVERY,
    choices=recovery_schedules,
    help="learning rate: constant, or linear (warm up, then decay to zero as the budget runs out)",
)
@click.option("--warmup-steps", type=int, cls=ConfigDefault, config=RECOVERY, help="steps of linear warm-up")
@click.option(
    "--precision",
    cls=ConfigDefault,
    config=RECOVERY,
    choices=recovery_precisions,
    help="matmuls of the training steps (auto: bfloat16 where the CPU has bf16 matmuls; see RESULTS)",
)
@click.option("--targets", cls=ConfigDefault, config=RECOVERY, help="auto (every projection), all-linear, or names")
@click.option(
    "--seq-len", type=int, cls=ConfigDefault, config=RECOVERY, help="tokens per example (longer ones are cut)"
)
@click.option("--batch-size", type=int, cls=ConfigDefault, config=RECOVERY, help="examples per micro-batch and process")
@click.option("--grad-accum", type=int, cls=ConfigDefault, config=RECOVERY, help="micro-batches per optimizer step")
@click.option("--eval-every", type=int, cls=ConfigDefault, config=RECOVERY, help="held-out loss every K steps")
@click.option("--save-every", type=int, cls=ConfigDefault, config=RECOVERY, help="resumable checkpoint every K steps")
@click.option(
    "--val-size", type=int, cls=ConfigDefault, config=RECOVERY, help="held-out examples for the validation loss"
)
@click.option(
    "--seed", type=int, cls=ConfigDefault, config=RECOVERY, help="seed for the split, the data order and LoRA init"
)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="folder for the recovered model")
@click.option("--overwrite", is_flag=True, help="replace an existing output (and an interrupted run's checkpoints)")
@click.option("--resume", is_flag=True, help="continue an interrupted run from its last checkpoint")
def recover(
    pruned_dir: str,
    data: str | None,
    teacher: str | None,
    output: Path,
    overwrite: bool,
    resume: bool,
    **settings,
) -> None:
    """Train PRUNED_DIR (LoRA adapters merged into the weights, or every parameter) and save a pruned folder.

    With --teacher the loss is the KL divergence to the teacher's next-token distribution. Runs alone
    or data-parallel under `accelerate launch --multi_gpu --num_processes N -m edgeprune.cli recover ...`
    (on CPUs too, with gloo). See README "Recovery" for the data formats.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from edgeprune.recover import RecoveryConfig, StepReport, process_state, recover_folder

    config = RecoveryConfig(**given(settings))
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not process_state().is_main_process,
    ) as progress:

        def on_step(report: StepReport) -> None:
            if not progress.task_ids:  # shown from the first step, so early errors stay one line
                progress.add_task("", total=report.total)
            note = f" val {report.val_loss:.3f}" if report.val_loss is not None else ""
            description = f"loss {report.train_loss:.3f}{note}, {report.tokens_per_s:.0f} tokens/s"
            progress.update(progress.task_ids[0], completed=report.step, total=report.total, description=description)

        result = recover_folder(
            pruned_dir, data, output, config, overwrite=overwrite, resume=resume, on_step=on_step, teacher_spec=teacher
        )
    if process_state().is_main_process:
        record = result.record
        rates = ", ".join(f"{r:.0f}" for r in record.tokens_per_s_per_process)
        out.print(
            f"recovered {pruned_dir} on {record.data}: {record.steps} steps in {record.seconds:.0f} s "
            f"({rates} tokens/s per process), best step {record.best_step}, validation loss "
            f"{record.val_loss_before:.4f} -> {record.val_loss_best:.4f} -> {output}"
        )


@main.command()
@click.argument("model", required=False)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="folder for the ONNX export")
@click.option("--task", default="auto", show_default=True, help="auto, text-generation-with-past, fill-mask, ...")
@click.option(
    "--quantize",
    type=click.Choice([p for p in PRECISIONS[1:] if p not in FITTED_PRECISIONS]),
    help="ship model.onnx at this precision (int8*/int4*: weight-only MatMulNBits), verified against PyTorch",
)
@click.option("--optimize", is_flag=True, help="save ONNX Runtime's graph fusions into model.onnx")
@click.option("--fused", is_flag=True, help="decoders: onnxruntime-genai's fused graph (+ genai_config.json)")
@click.option("--overwrite", is_flag=True, help="replace an existing output folder")
@click.option("--json", "json_file", type=click.Path(path_type=Path), help="also write the export record here")
@TOKENIZER_OPTION
def export(
    model: str | None,
    output: Path,
    task: str,
    quantize: str | None,
    optimize: bool,
    fused: bool,
    overwrite: bool,
    json_file: Path | None,
    tokenizer: str | None,
) -> None:
    """Export MODEL (or a pruned folder) to ONNX, verify it against PyTorch, and write the folder atomically."""
    from edgeprune.export import export_model
    from edgeprune.loading import load_model
    from edgeprune.outputs import check_output, local_inputs

    output = check_output(output, overwrite, local_inputs(model))
    with console.status("loading model"):
        loaded = load_model(model, tokenizer)
    provenance = {"source": loaded.source, "source_sha256": loaded.source_hash}
    with console.status(f"exporting to {output} and verifying"), notices_logged_in(output):
        result = export_model(
            loaded.model,
            loaded.tokenizer,
            output,
            task,
            quantize,
            optimize,
            overwrite,
            loaded.folder,
            provenance,
            fused=fused,
        )
    title = f"{output}/model.onnx: {result.precision} ({result.task}, exported in {result.export_seconds:.1f} s)"
    table = Table(title=title)
    for column in ("precision", "size MB", "max |ORT - PyTorch|", "max |logit|", "top-1 agreement", "positions"):
        table.add_column(column, justify="right")
    for precision, check in result.verification.items():
        table.add_row(
            precision + (" (shipped)" if precision == result.precision else ""),
            f"{result.sizes[precision] / 1e6:.1f}",
            f"{check.max_abs_diff:.2e}",
            f"{check.max_abs_logit:.1f}",
            f"{check.top1_agreement:.1%}",
            str(check.positions),
        )
    out.print(table)
    if json_file:
        Path(json_file).write_text(json.dumps(result.as_dict(), indent=2) + "\n")


TIMEOUT_HELP = (
    "seconds one profiling call (warm-up and timed runs) may take before the device counts as hung "
    "(default: a generous multiple of a slow board's time for the model and workload)"
)


EMULATED_TIMINGS = (
    "{name} is emulated: the model runs there with the board's instructions, but these timings (and speedups) "
    "are the emulator's, not the board's; only file size and the fact that it ran carry over. Time on the real board."
)


def stats_cell(stats) -> str:
    return "" if stats is None else f"{stats.p50:.2f} / {stats.p90:.2f} ({stats.mean:.2f} ± {stats.std:.2f})"


def rate_cell(value: float | None) -> str:
    return "" if value is None else f"{value:,.1f}"


@main.command()
@click.argument("onnx", type=click.Path(path_type=Path))
@click.option("--device", default="local", show_default=True, help="device profile name (see `edgeprune devices`)")
@click.option("--device-file", type=click.Path(path_type=Path), multiple=True, help="extra device profile YAML")
@click.option("--workload", help="prefill=128,decode=32 (decoders) or batch=1,sequence=128 (encoders)")
@click.option("--runs", default=10, show_default=True, help="timed runs")
@click.option("--warmup", default=2, show_default=True, help="untimed runs first")
@click.option("--against", type=click.Path(path_type=Path), help="a second export, alternated run by run: speedup")
@click.option("--json", "json_file", type=click.Path(path_type=Path), help="write the full result (with samples)")
@click.option("--timeout", type=POSITIVE, help=TIMEOUT_HELP)
def profile(
    onnx: Path, device: str, device_file, workload, runs: int, warmup: int, against, json_file, timeout
) -> None:
    """Latency, throughput and memory of ONNX (an export folder or .onnx file) on a device."""
    from edgeprune.devices.profiler import Workload, profiler_for
    from edgeprune.devices.profiles import get_device

    target = get_device(device, tuple(device_file))
    profiler = profiler_for(target, runs, warmup, timeout)
    load = Workload.parse(workload)
    with console.status(f"profiling on {target.name}"):
        if against:
            comparison = profiler.compare(onnx, against, load)
            results, record = [comparison.model, comparison.baseline], comparison.as_dict()
        else:
            results = [profiler.profile(onnx, load)]
            record = results[0].as_dict()
    first = results[0]
    title = f"{target.name}: ORT {first.ort_version}, {first.threads} threads, {first.providers[0]}"
    table = Table(title=title + (" (EMULATED: functional only)" if target.emulated else ""))
    table.add_column("")
    for r in results:
        table.add_column(Path(r.model).name if len(results) == 1 else r.model, justify="right")
    rows = [
        ("ms p50 / p90 (mean ± std)", lambda r: stats_cell(r.latency_ms)),
        ("prefill ms", lambda r: stats_cell(r.prefill_ms)),
        ("decode ms/token", lambda r: stats_cell(r.decode_ms_per_token)),
        ("prefill tokens/s", lambda r: rate_cell(r.prefill_tokens_per_s)),
        ("decode tokens/s", lambda r: rate_cell(r.decode_tokens_per_s)),
        ("tokens/s", lambda r: rate_cell(r.tokens_per_s)),
        ("file MB", lambda r: f"{r.file_size_mb:.1f}"),
        ("peak RSS MB (session)", lambda r: f"{r.peak_rss_mb:.0f} ({r.session_rss_mb:.0f})"),
        ("RSS after runs MB", lambda r: f"{r.rss_mb:.0f}"),
    ]
    for label, cell in rows:
        values = [cell(r) for r in results]
        if any(values):
            table.add_row(label, *values)
    out.print(table)
    if against:
        phases = [("prefill", comparison.prefill_speedup), ("decode", comparison.decode_speedup)]
        detail = ", ".join(f"{name} {value:.3f}x" for name, value in phases if value is not None)
        out.print(f"speedup of {onnx} over {against}: {comparison.speedup:.3f}x" + (f" ({detail})" if detail else ""))
    if target.emulated:
        out.print(EMULATED_TIMINGS.format(name=target.name))
    if json_file:
        Path(json_file).write_text(json.dumps(record, indent=2) + "\n")


def reach_cell(device) -> str:
    return (device.ssh or "local") + (" (emulated)" if device.emulated else "")


@main.command()
@click.option("--device-file", type=click.Path(path_type=Path), multiple=True, help="extra device profile YAML")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
def devices(device_file, as_json: bool) -> None:
    """Device profiles: shipped ones, $EDGEPRUNE_DEVICES (~/.config/edgeprune/devices) and --device-file."""
    from dataclasses import asdict

    from edgeprune.devices.profiles import available_devices

    found = available_devices(tuple(device_file))
    if as_json:
        out.print_json(json.dumps([asdict(d) for d in found.values()]))
        return
    table = Table(title="devices")
    for column in ("name", "arch", "cores", "threads", "memory MB", "reach"):
        table.add_column(column)
    for d in found.values():
        table.add_row(d.name, d.arch, str(d.cores), str(d.threads), str(d.memory_mb), reach_cell(d))
    out.print(table)
    out.print("providers, notes and file locations: `edgeprune devices --json`")


@main.command()
@click.argument("onnx", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--threads", type=int, help="intra-op threads (default: ONNX Runtime's choice)")
def generate(onnx: Path, prompt: str, max_new_tokens: int, threads: int | None) -> None:
    """Greedy text from an exported decoder, with ONNX Runtime only (no torch needed)."""
    from edgeprune.runtime import generate_text

    text, _ = generate_text(onnx, prompt, max_new_tokens, threads)
    out.print(text, markup=False, highlight=False)


DATA_DIR_HELP = "evaluation data folder (default: $EDGEPRUNE_DATA, else ../shared/data from the current directory)"


def write_json(path: Path, record: dict) -> None:
    path.expanduser().parent.mkdir(parents=True, exist_ok=True)
    path.expanduser().write_text(json.dumps(record, indent=2) + "\n")


@main.command(name="eval")
@click.argument("model", required=False)
@click.option(
    "--task",
    "tasks",
    required=True,
    multiple=True,
    help="wikitext2, boolq, piqa, winogrande, arc_easy, arc_challenge, sst2, mrpc, rte, cola, qnli, stsb, "
    "a text file (perplexity), a .jsonl of question/choices/gold, or name:config:split; repeat or comma-separate",
)
@click.option("--data-dir", type=click.Path(path_type=Path), help=DATA_DIR_HELP)
@click.option("--limit", type=int, help="perplexity: the first N windows; other tasks: a seeded random N items")
@click.option("--seq-len", default=128, show_default=True, help="perplexity window (LLM-Pruner 128); GLUE: max tokens")
@click.option("--stride", type=int, help="perplexity window step (default: --seq-len, non-overlapping)")
@click.option("--seed", default=0, show_default=True, help="seed of the --limit subset")
@click.option("--threads", type=int, help="torch / ONNX Runtime threads (1 is often fastest on a busy machine)")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="also write the results to this file")
@TOKENIZER_OPTION
def evaluate(
    model: str | None,
    tasks: tuple[str, ...],
    data_dir: Path | None,
    limit: int | None,
    seq_len: int,
    stride: int | None,
    seed: int,
    threads: int | None,
    json_path: Path | None,
    tokenizer: str | None,
) -> None:
    """Perplexity, zero-shot accuracy or GLUE metrics of MODEL (PyTorch, pruned, or an ONNX export folder)."""
    from datetime import datetime, timezone

    import torch

    from edgeprune.evaluate import evaluate_task, load_for_eval, resolve_data_dir, task_kind

    names = [t for value in tasks for t in parse_targets(value)]
    for name in names:
        task_kind(name)  # refuse unknown tasks before loading the model
    if threads:
        torch.set_num_threads(threads)
    with console.status("loading model"):
        loaded, text_tokenizer, source = load_for_eval(model, threads, tokenizer)
    results = []
    for name in names:
        with console.status(f"evaluating {name}"):
            results.append(evaluate_task(loaded, text_tokenizer, name, data_dir, limit, seq_len, stride, seed))
    table = Table(title=f"{source} ({type(loaded).__name__})")
    for column, justify in (("task", "left"), ("metric", "left"), ("value", "right"), ("n", "right")):
        table.add_column(column, justify=justify)
    table.add_column("what was measured")
    for result in results:
        for metric, value in result["metrics"].items():
            if not metric.endswith("_stderr"):
                stderr = result["metrics"].get(f"{metric}_stderr")
                shown = f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")
                table.add_row(result["task"], metric, shown, str(result["n"]), result["detail"])
    out.print(table)
    if json_path is not None:
        record = {
            "model": source,
            "data_dir": str(resolve_data_dir(data_dir).resolve()),
            "settings": {
                "limit": limit,
                "seq_len": seq_len,
                "stride": stride or seq_len,
                "seed": seed,
                "threads": torch.get_num_threads(),
            },
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "results": results,
        }
        write_json(json_path, record)


@main.command(name="finetune-head")
@click.argument("model", required=False)
@click.option("--task", default="sst2", show_default=True, help="GLUE task: sst2, mrpc, rte, cola, qnli, stsb")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="folder for the classifier")
@click.option("--steps", type=int, help="optimizer steps (default 300 unless --epochs)")
@click.option("--epochs", type=float, help="passes over the training examples instead of --steps")
@click.option("--lr", default=5e-5, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--max-train", type=int, help="train on a seeded random N of the training examples")
@click.option("--max-length", default=128, show_default=True, help="tokens per example")
@click.option("--seed", default=0, show_default=True)
@click.option("--data-dir", type=click.Path(path_type=Path), help=DATA_DIR_HELP)
@click.option("--overwrite", is_flag=True, help="replace an existing output folder")
@TOKENIZER_OPTION
def finetune_head(
    model: str | None,
    task: str,
    output: Path,
    steps: int | None,
    epochs: float | None,
    lr: float,
    batch_size: int,
    max_train: int | None,
    max_length: int,
    seed: int,
    data_dir: Path | None,
    overwrite: bool,
    tokenizer: str | None,
) -> None:
    """Train a classification head (and the encoder) of MODEL (default minilm-l6) on a GLUE task, then evaluate.

    SST-2 trains on train.tsv and is evaluated on dev.tsv; the other tasks train on dev's even rows
    and are evaluated on its odd rows. The output loads like any pruned folder (widths kept).
    """
    from edgeprune.checkpoint import save_pruned
    from edgeprune.evaluate import evaluate_glue
    from edgeprune.evaluate import finetune_head as train
    from edgeprune.loading import DEFAULT_ENCODER, load_model, require_tokenizer
    from edgeprune.outputs import check_output, local_inputs

    output = check_output(output, overwrite, local_inputs(model, data_dir))
    with console.status("loading model"):
        loaded = load_model(model or DEFAULT_ENCODER, tokenizer)
    text = require_tokenizer(loaded.tokenizer, loaded.source, "fine-tuning a head")
    classifier, record = train(
        loaded.model, text, task, data_dir, steps, epochs, lr, batch_size, max_train, max_length, seed
    )
    with console.status("evaluating"):
        result = evaluate_glue(classifier, text, task, data_dir, max_length=max_length)
    provenance = {"source": loaded.source, "source_sha256": loaded.source_hash, "head": record, "eval": result}
    save_pruned(classifier, text, output, provenance, overwrite=overwrite, protect=loaded.folder)
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items())
    out.print(
        f"fine-tuned {loaded.source} on {task} ({record['n_train']:,} examples from {record['train_split']}, "
        f"{record['steps']} steps, final loss {record['final_loss']:.3f}) -> {output}"
    )
    out.print(f"{task} on {result['split']}, {result['n']} examples: {metrics}")


def budgets_from_options(model: str | None, latency_ms, speedup, memory_mb, peak_mb, params) -> list:
    """The budgets given on the command line; with none, the run's default budget for the model."""
    from edgeprune.budget import Budget
    from edgeprune.run import default_budgets

    given = {"latency_ms": latency_ms, "speedup": speedup, "memory_mb": memory_mb, "peak_mb": peak_mb}
    budgets = [Budget(kind, limit) for kind, limit in given.items() if limit is not None]
    if params is not None:
        budgets.append(Budget("params", params))
    return budgets or default_budgets(model)


@main.command()
@click.argument("model", required=False)
@click.option("--device", cls=ConfigDefault, config=RUN, help="device profile name (see `edgeprune devices`)")
@click.option("--device-file", multiple=True, type=click.Path(path_type=Path), help="extra device profile YAML")
@click.option("--latency-ms", type=POSITIVE, help="budget: p50 latency of the workload on the device, at most")
@click.option(
    "--speedup", type=FiniteRange(min=1), help="budget: speedup over dense, at least (default for a MODEL given: 1.3)"
)
@click.option(
    "--memory-mb", type=POSITIVE, help="budget: ONNX file size in MB, at most (default for the default model: 120)"
)
@click.option("--peak-mb", type=POSITIVE, help="budget: peak resident memory while running, in MB, at most")
@click.option("--params", type=click.IntRange(min=1), help="budget: parameter count, at most")
@click.option("--criterion", cls=ConfigDefault, config=RUN, choices=criterion_names, help="criterion")
@click.option(
    "--criterion-option",
    "criterion_options",
    multiple=True,
    metavar="KEY=VALUE",
    cls=LazyHelp,
    more_help=criterion_option_names,
    help="a criterion option, e.g. selection=entropy (repeatable); each criterion's options",
)
@click.option("--targets", cls=ConfigDefault, config=RUN, help="groups to cut: ffn, heads or both")
@click.option("--allocation", cls=ConfigDefault, config=RUN, help="uniform per layer, or global ranking")
@REFIT_TARGET_OPTION
@click.option("--protect-first", type=int, cls=ConfigDefault, config=RUN, help="leave the first K layers whole")
@click.option("--protect-last", type=int, cls=ConfigDefault, config=RUN, help="leave the last K layers whole")
@click.option(
    "--round-to", type=int, cls=ConfigDefault, config=RUN, help="round each layer's FFN width to a multiple of M"
)
@click.option(
    "--precision",
    type=click.Choice(["auto", *PRECISIONS]),
    cls=ConfigDefault,
    config=RUN,
    help="precisions the search may ship (auto: fp32 and every weight-only int8/int4 one, the closest to dense wins)",
)
@click.option(
    "--block-size", type=int, cls=ConfigDefault, config=RUN, help="int8/int4/int4-mixed quantization block (int8-bN: N)"
)
@click.option(
    "--graph",
    type=click.Choice(["auto", "fused", "optimum"]),
    cls=ConfigDefault,
    config=RUN,
    help="auto: onnxruntime-genai's fused decoder graph where the family allows it (faster), else Optimum's",
)
@click.option("--workload", help="decoders: prefill=128,decode=32; encoders: batch=1,sequence=128")
@click.option("--calibration", help="calibration text file or dataset name (default: packaged text)")
@click.option(
    "--max-sparsity",
    type=FiniteRange(0, 1, min_open=True, max_open=True),
    cls=ConfigDefault,
    config=RUN,
    help="never cut more than this",
)
@click.option(
    "--max-probes",
    type=click.IntRange(min=1),
    cls=ConfigDefault,
    config=RUN,
    help="cut-export-profile probes after the dense one",
)
@click.option("--runs", type=int, cls=ConfigDefault, config=RUN, help="timed runs per profile")
@click.option("--warmup", type=int, cls=ConfigDefault, config=RUN, help="warm-up runs per profile")
@click.option(
    "--activation-scaling/--no-activation-scaling",
    cls=ConfigDefault,
    config=RUN,
    help="fold AWQ-style per-input-channel scales into the weights before rounding to 4 bits (int4, int4-mixed, "
    "int4-fit; Llama-family models; on by default)",
)
@click.option("--timeout", type=POSITIVE, help=TIMEOUT_HELP)
@TOKENIZER_OPTION
@click.option("--recover/--no-recover", cls=ConfigDefault, config=RUN, help="distill a pruned model from the dense one")
@click.option("--recover-data", help="recovery data: Alpaca JSON, text file (default: text the dense model writes)")
@click.option(
    "--recover-minutes", type=float, cls=ConfigDefault, config=RUN, field="recovery.minutes", help="recovery time"
)
@click.option(
    "--recover-lr", type=float, cls=ConfigDefault, config=RUN, field="recovery.lr", help="recovery learning rate"
)
@click.option("--seed", type=int, cls=ConfigDefault, config=RUN, help="seed of calibration windows and sampling")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("out/run"), show_default=True)
@click.option("--overwrite", is_flag=True, help="start afresh, replacing OUT if it is a run folder (default: resume)")
def run(model: str | None, output: Path, overwrite: bool, **options) -> None:
    """Prune MODEL until every budget holds on the device, then recover, export and report (resumable)."""
    from edgeprune.devices.profiler import Workload
    from edgeprune.run import RunConfig, run_job

    limits = [options.pop(kind) for kind in ("latency_ms", "speedup", "memory_mb", "peak_mb", "params")]
    budgets = budgets_from_options(model, *limits)
    recovery = {name.removeprefix("recover_"): options.pop(name) for name in RUN_RECOVERY}
    options["device_files"] = tuple(options.pop("device_file"))
    options["criterion_options"] = parse_criterion_options(options["criterion_options"])
    if options["targets"] is not None:
        options["targets"] = parse_targets(options["targets"])
    if options["workload"] is not None:
        options["workload"] = Workload.parse(options["workload"])
    cfg = RunConfig(budgets=budgets, model=model, **given(options))
    cfg.recovery = replace(cfg.recovery, **given(recovery))
    cfg.spec(0.0)  # refuse bad pruning options before any work
    with console.status("starting") as status, notices_logged_in(output):
        result = run_job(
            cfg, output, say=lambda message: (status.update(message), console.log(message)), overwrite=overwrite
        )
    print_run_result(result, output)


def print_run_result(result, output: Path) -> None:
    """Dense vs shipped table, the one-line reason, and any budget the final measurement missed."""
    from edgeprune.report import SUMMARY_ROWS, format_value

    final, dense = result.final, result.dense
    table = Table(title=f"{result.model} on {result.device}: dense vs shipped")
    for column in ("", "dense", "shipped"):
        table.add_column(column, justify="right")
    for key, label, fmt in SUMMARY_ROWS:
        table.add_row(label, format_value(dense.get(key), fmt), format_value(final.get(key), fmt))
    out.print(table)
    out.print(
        f"{final['precision']}, sparsity {final['sparsity']:.1%}, speedup {final['speedup_alternating']:.2f}x "
        f"(alternating runs), {result.probes_measured} probes measured; report: {output / 'report.md'}, "
        f"model: {output / 'onnx'}"
    )
    out.print(f"why: {result.reason}")
    for budget in result.budgets:
        if not budget.met:
            console.print(
                f"[yellow]warning: {budget.kind} {budget.final_value:.4g} misses the budget "
                f"{budget.limit:.4g} in the final alternating measurement (noisy machine? rerun with more --runs)"
                "[/yellow]"
            )


if __name__ == "__main__":  # `accelerate launch -m edgeprune.cli recover ...`
    main()
