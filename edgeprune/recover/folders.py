"""Folders: a recovered model saved as a pruned folder at OUT, its checkpoints in `.OUT.recover/` beside it.

The input is never written; OUT is refused if it exists unless asked; the work folder is removed
once the output is in place, and refused (or continued with `--resume`) when an interrupted run left one.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from accelerate import Accelerator

from edgeprune.errors import EdgepruneError
from edgeprune.recover.config import RecoveryConfig
from edgeprune.recover.data import load_recovery_data
from edgeprune.recover.processes import make_accelerator
from edgeprune.recover.train import RecoveryResult, recover


def work_dir_for(out: Path) -> Path:
    """Where an unfinished run's checkpoints live: beside OUT, so `--resume` finds them."""
    out = out.expanduser().absolute()
    return out.with_name(f".{out.name}.recover")


def run_signature(source_hash: str, data: str, config: RecoveryConfig, processes: int) -> dict:
    """What a resumed run must share with the interrupted one (budgets and schedules may change)."""
    free = ("steps", "epochs", "minutes", "eval_every", "save_every")
    fixed = {k: v for k, v in asdict(config).items() if k not in free}
    return {"input_sha256": source_hash, "data": data, "processes": processes, **fixed}


def prepare_work_dir(work: Path, signature: dict, resume: bool, overwrite: bool, accelerator: Accelerator) -> None:
    """Check or (re)create the work folder; refuses to silently discard an interrupted run."""
    run_file = work / "run.json"
    if resume:
        if not run_file.is_file():
            raise EdgepruneError(f"nothing to resume: {work} has no checkpoint; run without --resume")
        saved = json.loads(run_file.read_text())
        changed = [k for k in signature if saved.get(k) != signature[k]]
        if changed:
            key = changed[0]
            raise EdgepruneError(
                f"--resume with a different {key} ({saved.get(key)} before, {signature[key]} now): "
                "use the interrupted run's settings, or drop --resume and pass --overwrite"
            )
        return
    if (work / "checkpoint").exists() and not overwrite:
        raise EdgepruneError(
            f"an interrupted recovery is in {work}: pass --resume to continue or --overwrite to restart"
        )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        run_file.write_text(json.dumps(signature, indent=1) + "\n")
    accelerator.wait_for_everyone()


def recover_folder(
    model_spec: str,
    data_source: str,
    out: Path,
    config: RecoveryConfig,
    overwrite: bool = False,
    resume: bool = False,
    on_step: Callable[[int, int | None, float, float | None], None] | None = None,
) -> RecoveryResult:
    """Recover a pruned folder (or any model) and save it as a pruned folder at `out`, atomically.

    The input is never written; `out` is refused if it exists unless `overwrite`. Only the main
    process writes the output; the work folder is removed once the output is in place.
    """
    from edgeprune.checkpoint import read_provenance, refuse_existing_output, save_pruned
    from edgeprune.loading import load_model

    out = refuse_existing_output(out, overwrite)
    loaded = load_model(model_spec)
    if loaded.folder is not None and out.resolve() == loaded.folder.resolve():
        raise EdgepruneError(f"output {out} is the input model: choose another -o so the input stays intact")
    data = load_recovery_data(data_source, loaded.tokenizer, loaded.model, config)
    accelerator = make_accelerator(config)
    work = work_dir_for(out)
    signature = run_signature(loaded.source_hash, data.source, config, accelerator.num_processes)
    prepare_work_dir(work, signature, resume, overwrite, accelerator)
    try:
        result = recover(loaded.model, loaded.tokenizer, data, config, work_dir=work, resume=resume, on_step=on_step)
    except BaseException:
        if accelerator.is_main_process and not (work / "checkpoint").exists():
            shutil.rmtree(work, ignore_errors=True)  # nothing to resume: leave no trace
        raise
    if accelerator.is_main_process:
        previous = read_provenance(loaded.folder) if loaded.folder is not None else {}
        provenance = {**previous, "recovered_from": loaded.source, "recovered_from_sha256": loaded.source_hash}
        provenance.setdefault("source", loaded.source)
        provenance["recovery"] = result.record
        provenance = {k: v for k, v in provenance.items() if k not in ("layer_widths", "versions", "created")}
        save_pruned(result.model, loaded.tokenizer, out, provenance, overwrite=overwrite, protect=loaded.folder)
        shutil.rmtree(work, ignore_errors=True)
    accelerator.wait_for_everyone()
    return result
