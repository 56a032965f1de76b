"""`convert()`: the whole pipeline as small stages, data flowing one way:
plan -> pre-flight -> fetch -> load -> build (sanitize + strict load) -> cast / quantize -> save (staging)
-> validate -> card -> rename into place -> upload."""

import contextlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from mlx.utils import tree_flatten
from mlx_arch.core import containers
from mlx_arch.core.base import text_config

from . import affine, card, checks, quantize as q, save, source, validate
from .errors import ConvertError, ValidationFailed
from .plan import GB, ConvertPlan


@dataclass
class ConvertResult:
    path: Path
    size_bytes: int
    bits_per_weight: float
    parameters: int
    seconds: float
    quantization: Optional[dict] = None
    skipped_layers: list = field(default_factory=list)
    excluded_layers: list = field(default_factory=list)  # kept in full precision by the architecture (routers)
    quantization_method: str = ""  # how the codes were chosen and on which calibration text (quantized outputs)
    validation: Optional[validate.Report] = None
    published: Optional[object] = None
    container: Optional[dict] = None  # a multimodal source: its text model and the weights dropped (containers.py)
    dropped_by_rules: dict = field(default_factory=dict)  # {reason: tensors} the architecture drops by declaration


def convert(hf_path: str, mlx_path=None, *, revision: Optional[str] = None, quantize: bool = False,
            q_bits: Optional[int] = None, q_group_size: Optional[int] = None, q_mode: str = "affine",
            quant_recipe: Optional[str] = None, q_method: Optional[str] = None, calibration_file=None,
            target_bpw: Optional[float] = None,
            dtype: Optional[str] = None, dequantize: bool = False, upload_repo: Optional[str] = None, private: bool = False, skip_validation: bool = False,
            dry_run: bool = False, max_shard_size: int = 5 * GB, overwrite: bool = False,
            endpoint: Optional[str] = None, token: Optional[str] = None,
            progress: Optional[Callable] = None, log: Optional[Callable] = None) -> ConvertResult:
    """Convert `hf_path` (a Hub repo id or a local folder) to an MLX folder at `mlx_path`.

    The options mean what the CLI flags of the same name mean (`mlx-convert --help`). `q_bits`/`q_group_size`
    default to 4/64 for affine quantization and are fixed by the mxfp4/nvfp4/mxfp8 modes; `mlx_path` defaults
    to `./<Model>-mlx[-<variant>]`; `endpoint` and `token` default to HF_ENDPOINT and HF_TOKEN.
    `progress(iterable, desc=..., unit=...)` wraps the load and save loops (e.g. tqdm); `log(message)` receives
    stage messages. Raises ConvertError with a one-line message for anything the user can fix.
    """
    plan = ConvertPlan(hf_path=hf_path, mlx_path=mlx_path, revision=revision, quantize=quantize, q_bits=q_bits,
                       q_group_size=q_group_size, q_mode=q_mode, quant_recipe=quant_recipe, q_method=q_method,
                       calibration_file=calibration_file, target_bpw=target_bpw, dtype=dtype,
                       dequantize=dequantize, upload_repo=upload_repo, private=private,
                       skip_validation=skip_validation, dry_run=dry_run, max_shard_size=max_shard_size,
                       overwrite=overwrite, endpoint=endpoint, token=token)
    return run(plan, progress=progress, log=log)


def run(plan: ConvertPlan, progress: Optional[Callable] = None, log: Optional[Callable] = None) -> ConvertResult:
    """The stages in order; each takes what the previous ones produced. Nothing is written before `save`."""
    log = log or (lambda message: None)
    save.check_target(plan.mlx_path, plan.overwrite)
    with save.locked(plan.mlx_path):
        return _run(plan, progress, log)


def _run(plan: ConvertPlan, progress, log) -> ConvertResult:
    start = time.time()
    src = source.preflight(plan)
    preflight_checks(plan, src)
    log(f"pre-flight: {src.config['model_type']} from {src.repo_id or src.folder}, weights: "
        f"{len(src.weight_files)} file(s)")
    if src.ignored_code:
        log(f"ignoring the repo's own code ({src.ignored_code}): {src.config['model_type']} is native to transformers "
            "and mlx-convert; it is neither downloaded nor run")
    folder = source.fetch(plan, src)
    result = convert_one(plan, src, folder, progress, log)
    result.seconds = time.time() - start
    if plan.upload_repo:
        result.published = upload(plan, src, log)
    return result


def run_variants(plans: list, progress: Optional[Callable] = None, log: Optional[Callable] = None) -> list:
    """Several outputs of one source (`plan.variant_plans`, --variants): pre-flight and download once, then per
    variant convert, write and gate, the gate's source-only parts (the float original's pass, the shadow model, the
    held-out reference) computed once. Publishes only when every variant passed; a rejected variant is kept aside
    as `<path>.rejected` and named, the others stay in place."""
    log = log or (lambda message: None)
    for plan in plans:
        save.check_target(plan.mlx_path, plan.overwrite)
    with contextlib.ExitStack() as held:
        for plan in plans:
            held.enter_context(save.locked(plan.mlx_path))
        src = source.preflight(plans[0])
        for plan in plans:
            preflight_checks(plan, src)
        log(f"pre-flight: {src.config['model_type']} from {src.repo_id or src.folder}, "
            f"{len(plans)} variants: {', '.join(p.variant_name for p in plans)}")
        folder = source.fetch(plans[0], src)
        results, rejected = [], []
        with validate.sharing():
            for plan in plans:
                start = time.time()
                log(f"variant {plan.variant_name} -> {plan.mlx_path}")
                try:
                    results.append(convert_one(plan, src, folder, progress, log))
                except ValidationFailed as e:
                    rejected.append(f"{plan.variant_name}: {e}")
                    continue
                results[-1].seconds = time.time() - start
        if rejected:
            raise ConvertError(f"{len(rejected)} of {len(plans)} variants failed validation, nothing was published "
                               f"(the others are in place): {' | '.join(rejected)}")
        for plan, result in zip(plans, results):
            if plan.upload_repo:
                result.published = upload(plan, src, log)
    return results


def convert_one(plan: ConvertPlan, src, folder: Path, progress, log) -> ConvertResult:
    """Read, convert, write and gate one output of a fetched source (resumable: see `resume_key`)."""
    if not plan.skip_validation:
        affine.preload()  # the gate needs torch: with it imported, save rounds in torch (`affine.Rounding`)
    with save.scratch(plan.mlx_path) as scratch:  # .bin sources are rewritten here to be read lazily
        converted = convert_weights(plan, src, source_weights(folder, src, progress, scratch), log, progress, scratch)
        key = resume_key(plan, src)
        with save.staging(plan.mlx_path, plan.overwrite, key) as tmp:
            return write_output(plan, src, folder, tmp, converted, progress, log, save.Manifest(tmp, key))


def preflight_checks(plan: ConvertPlan, src):
    """What else can fail the run, checked before any weight is downloaded (convert/checks.py)."""
    checks.check_config(src.config)
    q.check_applicable(src.config, plan)
    checks.check_tokenizer_files(src.files, plan)
    weight_bytes = src.weight_bytes()
    if weight_bytes is not None:
        needed = checks.estimated_output_bytes(src.config, weight_bytes, plan, q.target_dtype(plan, src.config))
        if any(f.endswith(".bin") for f in src.weight_files):
            needed += weight_bytes  # .bin sources are rewritten beside the output to be read lazily
        checks.check_room(plan.mlx_path, needed, "the output")
    if plan.upload_repo:
        checks.check_publish_target(plan, src.repo_id, source.hub_endpoint(plan))


@dataclass
class Converted:
    """What goes into the output folder: lazy weights (evaluated while saving) and the output config."""

    weights: dict
    config: dict
    dtype: str
    quant: q.QuantReport
    n_params: int
    container: Optional[dict] = None
    dropped_by_rules: dict = field(default_factory=dict)


def convert_weights(plan: ConvertPlan, src, weights: dict, log, progress=None, scratch=None) -> Converted:
    """Sanitize, strict-load, cast and quantize; everything stays lazy (calibrated layers are written to the folder
    `scratch` and read again lazily, when given). A multimodal container gives its text model: its other towers'
    weights are dropped (reported) and the output config is the text model's."""
    container = containers.dropped_weights(src.config, weights)
    if container:
        log(containers.describe(container))
    model = q.build_model(src.config, weights)
    drops = declared_drops(model, weights)
    for why, count in drops.items():
        log(f"dropped by the architecture's rules: {count} tensor(s) ({why})")
    dtype = q.target_dtype(plan, src.config)
    quant = q.QuantReport()
    if plan.dequantize or plan.quantize:
        q.dequantize(model, dtype)  # layers that arrive quantized (MXFP4 experts) become floats first; else a cast
    else:
        q.cast(model, dtype)
    if plan.quantize:
        quant = q.quantize(model, plan, src.folder, log, scratch, progress)
    elif not plan.dequantize:
        quant = q.source_quantization(model)  # layers the source stores quantized stay as they are
    for skipped in quant.skipped:
        log(f"kept in full precision: {skipped}")
    config = model.export_config(dict(text_config(src.config)))
    config.pop("auto_map", None)  # the repo's code is not in the output (and was never needed: see pre-flight)
    # State the resolved head tying: readers default differently when the key is absent (mlx-lm assumes tied).
    tied = getattr(model.args, "tie_word_embeddings", None)
    if tied is not None:
        config.setdefault("tie_word_embeddings", tied)
    # Only the flat dict may keep the arrays alive: the shards evaluate and release them one by one.
    weights = dict(tree_flatten(model.parameters()))
    for path, job in quant.rounded.items():  # rounded by save in torch: MLX's lazy arrays give only their shapes
        for k, name in enumerate(("weight", "scales", "biases")):
            weights[f"{path}.{name}"] = affine.Deferred(job, k, weights[f"{path}.{name}"])
    quant.rounded = {}
    return Converted(weights, config, dtype, quant, q.parameter_count(model), container, drops)


def declared_drops(model, weights: dict) -> dict:
    """{reason: tensors} of the checkpoint that the architecture's weight rules drop by declaration (multi-token-
    prediction layers, heads tied to the embeddings, buffers), for the log and the card; a container's other towers
    are reported apart (`containers.dropped_weights`)."""
    from mlx_arch.core.weights import Drop

    rules = model.checkpoint_rules() if hasattr(model, "checkpoint_rules") else []
    first_own = len(model.container.rules()) if getattr(model, "container", None) else 0
    counts, w = {}, dict(weights)
    for i, rule in enumerate(rules):
        if isinstance(rule, Drop) and i >= first_own:
            n = sum(1 for k in w if rule.dropped(k))
            if n:
                counts[rule.why or "declared lossy"] = counts.get(rule.why or "declared lossy", 0) + n
        w = rule.apply(w)  # lazy: nothing is read
    return counts


def resume_key(plan: ConvertPlan, src) -> str:
    """What must match for a run to resume another's shards: every option that shapes the output files and the
    source's identity (its commit, or for a local folder its weight files' names, sizes and times)."""
    import hashlib

    options = {k: str(v) for k, v in sorted(vars(plan).items()) if k not in ("token", "upload_repo", "private",
                                                                            "dry_run", "overwrite", "endpoint")}
    if src.commit:
        identity = src.commit
    else:
        identity = [(f, (Path(src.folder) / f).stat().st_size, (Path(src.folder) / f).stat().st_mtime_ns)
                    for f in src.weight_files]
    return hashlib.sha256(json.dumps([options, identity], default=str).encode()).hexdigest()


def write_output(plan: ConvertPlan, src, folder: Path, tmp: Path, converted: Converted, progress, log,
                 manifest: Optional[save.Manifest] = None):
    """Shards, config, side files, then the gate on what was written, then the card (which reports the gate)."""
    shard_progress = (lambda it: progress(it, desc="save", unit="shard")) if progress else None
    quant = converted.quant
    size = save.write_weights(converted.weights, tmp, plan.max_shard_size, shard_progress, manifest)
    if manifest and manifest.reused:
        log(f"resumed: {manifest.reused} shard(s) written by an interrupted run were verified (size, SHA-256) and "
            "kept")
    config = save.output_config(converted.config, converted.dtype, quant.config)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    save.copy_side_files(folder, tmp)
    result = ConvertResult(plan.mlx_path, size, size * 8 / converted.n_params, converted.n_params, 0.0,
                           quant.config, quant.skipped, excluded_layers=quant.excluded,
                           quantization_method=quant.method_description, container=converted.container,
                           dropped_by_rules=converted.dropped_by_rules)
    result.validation = gate(plan, folder, tmp, progress, log)
    write_card(plan, src, folder, tmp, converted.dtype, result)
    return result


def validate_existing(plan: ConvertPlan, progress: Optional[Callable] = None,
                      log: Optional[Callable] = None) -> validate.Report:
    """Run the gate on an already converted folder (`plan.mlx_path`) against its source; writes validation.json."""
    return _validate_existing(plan, progress, log)[0]


def publish_existing(plan: ConvertPlan, progress: Optional[Callable] = None, log: Optional[Callable] = None):
    """Validate an already converted folder, then publish it to `plan.upload_repo` with its card's validation
    table refreshed: how a failed upload is retried without converting again."""
    report, src = _validate_existing(plan, progress, log)
    if not report.passed:
        raise ConvertError(f"validation failed: {'; '.join(report.failures)}; nothing was published")
    card.refresh(plan.mlx_path / "README.md", validate.summary_table(report), plan.upload_repo)
    return upload(plan, src, log or (lambda message: None))


def _validate_existing(plan, progress, log):
    log = log or (lambda message: None)
    if not (plan.mlx_path / "config.json").is_file():
        raise ConvertError(f"{plan.mlx_path} is not a converted MLX folder (no config.json)")
    src = source.preflight(plan)
    return validated(source.fetch(plan, src), plan.mlx_path, progress, log), src


def validated(source_folder: Path, out: Path, progress, log) -> validate.Report:
    """The gate's report on `out`, written to validation.json and shown as a table."""
    from .backend import setup_notes

    for note in setup_notes():
        log("note: " + note)
    report = validate.validate(source_folder, out, progress)
    validate.write_report(report, out)
    log(validate.summary_table(report))
    log("gate time by part: " + ", ".join(f"{name} {s:.1f} s" for name, s in report.seconds.items()))
    return report


def source_weights(folder, src, progress, scratch):
    from .load import load_weights

    wrap = (lambda files: progress(files, desc="load", unit="file")) if progress else None
    return load_weights(folder, src.weight_files, wrap, scratch)


def gate(plan: ConvertPlan, source_folder: Path, out: Path, progress, log) -> Optional[validate.Report]:
    """Validate the saved files; a failure keeps the output aside as `<path>.rejected` and stops the run."""
    if plan.skip_validation:
        log("validation skipped (--skip-validation): the card says so")
        return None
    log("validating against the transformers reference...")
    report = validated(source_folder, out, progress, log)
    if not report.passed:
        rejected = plan.mlx_path.absolute().with_name(plan.mlx_path.name + ".rejected")
        shutil.rmtree(rejected, ignore_errors=True)
        shutil.copytree(out, rejected)
        raise ValidationFailed(f"validation failed: {'; '.join(report.failures)}; nothing was published; the output "
                           f"is kept for inspection in {rejected}")
    return report


def write_card(plan, src, source_folder, out, dtype, result):
    meta = card.source_metadata(source_folder)
    base = src.repo_id  # a local folder has no Hub id to point at
    summary = (validate.summary_table(result.validation) if result.validation is not None else
               "**Not validated**: the conversion was run with `--skip-validation`.")
    text = card.render_card(repo_name=plan.mlx_path.name, base_model=base, source_meta=meta, commit=src.commit,
                            recipe=plan.recipe_name, dtype=dtype, bits_per_weight=result.bits_per_weight,
                            quantized=plan.quantize, validation=summary,
                            skipped_layers=result.skipped_layers + precise_note(result.excluded_layers),
                            upload_repo=plan.upload_repo, ignored_code=src.ignored_code,
                            model_type=src.config["model_type"], quantization_method=result.quantization_method,
                            container=containers.describe(result.container) if result.container else "",
                            notes=source_notes(src.config, result.dropped_by_rules))
    (out / "README.md").write_text(text)


def source_notes(config: dict, drops: dict) -> list:
    """Card lines on what the conversion did to the source beyond casting and quantizing."""
    from mlx_arch.core import fp8

    notes = []
    if fp8.is_source(config):
        notes.append("Source stored in FP8 with block scales: dequantized block by block on load, exactly as "
                     "transformers dequantizes it (the gate's float original is the same dequantized weights)")
    notes += [f"Dropped by the architecture's declared rules: {count} tensor(s) ({why})" for why, count in drops.items()]
    return notes


def precise_note(paths: list) -> list:
    """One card entry for the layers the architecture keeps in full precision (MoE routers and gates, small
    state-space projections)."""
    if not paths:
        return []
    names = sorted({p.rsplit(".", 1)[-1] for p in paths})
    return [f"{len(paths)} layers the architecture keeps in full precision ({', '.join(names)}: routers, gates, "
            "state-space projections), recorded as `false` in config.json's quantization"]


def upload(plan, src, log):
    from .publish import PublishError, publish

    message = f"Upload {plan.upload_repo}: MLX conversion of {src.repo_id or plan.mlx_path.name} ({plan.recipe_name})"
    try:
        published = publish(plan.mlx_path, plan.upload_repo, message, private=plan.private, token=plan.token,
                            endpoint=source.hub_endpoint(plan), dry_run=plan.dry_run,
                            description=f"Converted with mlx-convert from revision {src.commit or 'local'}.")
    except PublishError as e:
        raise ConvertError(f"{e}; the converted model is kept in {plan.mlx_path}: to publish it without converting "
                           f"again, run mlx-convert --hf-path {plan.hf_path} --mlx-path {plan.mlx_path} "
                           f"--validate-only --upload-repo {plan.upload_repo}") from None
    log(("would publish" if plan.dry_run else "published") + f" {len(published.files)} files to {published.url}")
    return published
